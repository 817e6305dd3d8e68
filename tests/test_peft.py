"""Every declared module is the one that runs: LoRA adapters injected by PEFT change the U-Net's,
the ControlNet's and the autoencoder's outputs exactly as merging them into the weights does, in
training mode, under no_grad and under inference_mode; every adapter parameter gets a gradient;
forward hooks on every Linear / Conv2d fire in every mode."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from autoencoder.config import DDConfig  # noqa: E402
from layers import Upsample  # noqa: E402
from autoencoder.kl import AutoencoderKL  # noqa: E402
from ldm.controlnet import ControlNet  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402

TINY_SD1 = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                num_res_blocks=1, channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True,
                transformer_depth=1, context_dim=24, legacy=False)
TINY_SD2 = dict(TINY_SD1, num_heads=-1, num_head_channels=8, use_linear_in_transformer=True)
TINY_VAE = DDConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16, norm_num_groups=8)
# What people target: the attention projections, the transformer's in/out projections, the MLP.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
VAE_TARGETS = ["q", "k", "v", "proj_out"]
MODES = {
    "train": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (zero-initialised output layers would hide a skipped module)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0))
    return model


def with_lora(model: nn.Module, targets: list[str]) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.inject_adapter_in_model(config, model)


def lora_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def unet_inputs(config: dict, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config["in_channels"], 8, 8, generator=generator)
    context = torch.randn(batch, 5, config["context_dim"], generator=generator)
    return x, torch.tensor([3, 917])[:batch], context


def hint_for(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], 3, x.shape[2] * 8, x.shape[3] * 8, generator=torch.Generator().manual_seed(2))


def run_in(mode: str, fn):
    with MODES[mode]():
        out = fn()
    return out.clone() if not isinstance(out, list) else torch.cat([o.flatten() for o in out])


def merged_copy(model: nn.Module) -> nn.Module:
    """The same weights with every LoRA folded in (W + B A * alpha / r) and plain layers put back."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, peft.tuners.lora.LoraLayer):
                child.merge()
                setattr(module, name, child.get_base_layer())
    return model


def check_lora_runs(model: nn.Module, targets: list[str], forward) -> None:
    """forward(model) -> tensor(s): LoRA changes it, identically in every mode, as merging does."""
    model.train()
    base = {mode: run_in(mode, lambda: forward(model)) for mode in MODES}
    with_lora(model, targets)
    adapters = lora_parameters(model)
    assert adapters, "PEFT found none of the targets"
    outputs = {mode: run_in(mode, lambda: forward(model)) for mode in MODES}
    merged = run_in("no_grad", lambda: forward(merged_copy(model)))
    scale = float(outputs["train"].detach().abs().max())
    for mode in MODES:
        assert (outputs[mode] - base[mode]).abs().max() > 1e-3 * scale, f"LoRA ignored under {mode}"
        torch.testing.assert_close(outputs[mode].detach(), merged, atol=2e-5 * scale, rtol=1e-4)
    # Every adapter takes part in training: each gets a non-zero gradient.
    out = forward(model)
    (torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out).square().mean().backward()
    missing = [n for n, p in adapters.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing[:3]}"


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2], ids=["sd1-conv-proj", "sd2-linear-proj"])
def test_lora_on_the_unet_runs_in_every_mode_and_equals_merging(config):
    torch.manual_seed(0)
    model = randomized(UNetModel(**config))
    x, t, context = unet_inputs(config)
    check_lora_runs(model, UNET_TARGETS, lambda m: m(x, t, context))


def test_lora_on_the_controlnet_runs_in_every_mode_and_equals_merging():
    torch.manual_seed(0)
    net = randomized(ControlNet.from_unet(UNetModel(**TINY_SD1)), seed=3)
    x, t, context = unet_inputs(TINY_SD1)
    hint = hint_for(x)
    check_lora_runs(net, UNET_TARGETS, lambda m: m(x, hint, t, context))


def test_lora_on_the_autoencoder_attention_runs_in_every_mode_and_equals_merging():
    torch.manual_seed(0)
    model = randomized(AutoencoderKL(ddconfig=TINY_VAE, embed_dim=4))
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    check_lora_runs(model, VAE_TARGETS, lambda m: m.decode(m.encode(image).mean))


def count_hook_calls(model: nn.Module, forward) -> dict[str, set[str]]:
    """For each mode, the names of the Linear / Conv2d modules whose forward hook fired."""
    fired: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: fired.add(name))
               for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    seen = {}
    for mode in MODES:
        fired.clear()
        run_in(mode, forward)
        seen[mode] = set(fired)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("which", ["unet", "controlnet", "autoencoder"])
def test_forward_hooks_on_every_linear_and_conv_fire_in_every_mode(which):
    torch.manual_seed(0)
    x, t, context = unet_inputs(TINY_SD1)
    if which == "unet":
        model = randomized(UNetModel(**TINY_SD1)).eval()
        forward = lambda: model(x, t, context)  # noqa: E731
    elif which == "controlnet":
        model = randomized(ControlNet.from_unet(UNetModel(**TINY_SD1))).eval()
        forward = lambda: model(x, hint_for(x), t, context)  # noqa: E731
    else:
        model = randomized(AutoencoderKL(ddconfig=TINY_VAE, embed_dim=4)).eval()
        image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        forward = lambda: model.decode(model.encode(image).mean)  # noqa: E731
    declared = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert len(declared) > 10
    for mode, fired in count_hook_calls(model, forward).items():
        assert fired == declared, f"{mode}: {sorted(declared - fired)[:5]} never ran"


def test_a_hook_that_changes_an_output_is_honoured_by_the_folded_upsampling():
    # The folded upsampling conv must step aside when its conv is hooked.
    torch.manual_seed(0)
    model = randomized(UNetModel(**TINY_SD1)).eval()
    x, t, context = unet_inputs(TINY_SD1)
    upsample_conv = next(m.conv for m in model.modules() if isinstance(m, Upsample) and m.use_conv)
    with torch.no_grad():
        before = model(x, t, context)
        handle = upsample_conv.register_forward_hook(lambda mod, args, out: out * 0)
        silenced = model(x, t, context)
        handle.remove()
        after = model(x, t, context)
    assert not torch.allclose(before, silenced)
    torch.testing.assert_close(before, after)


def test_the_readme_lora_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Adapters and hooks"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 3)]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    unet = namespace["unet"]
    assert isinstance(unet, UNetModel) and len(lora_parameters(unet)) > 0
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert unet(x, torch.tensor([10]), torch.randn(1, 7, 384)).shape == x.shape


class _Scaled(torch.Tensor):
    """A weight tensor subclass that overrides F.linear (as torchao's quantized weights do)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight, *rest = args
            return 2 * torch.nn.functional.linear(x, weight.as_subclass(torch.Tensor), *rest, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def test_a_weight_of_a_tensor_subclass_gets_the_op_it_overrides():
    from layers import Linear

    layer = Linear(16, 8)
    x = torch.randn(70, 16)  # enough rows for the oneDNN path
    with torch.no_grad():
        plain = layer(x)
        layer.weight = nn.Parameter(layer.weight.detach().as_subclass(_Scaled), requires_grad=False)
        torch.testing.assert_close(layer(x).as_subclass(torch.Tensor), 2 * plain)
