"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net's encoder steered by a condition image.

`ControlNet` is the U-Net's encoder half (`UNetEncoder`: time embedding, input blocks, middle
block), started from a trained U-Net's weights (`ControlNet.from_unet`), plus
  - `input_hint_block`: a small conv net taking the condition image (the "hint", [B, 3, H, W] in
    [0, 1], `latent_factor` x the latent size) down to the latent size; its output is added after
    `input_blocks[0]`. Its last conv is zero-initialised;
  - `zero_convs.i`: a zero-initialised 1x1 conv on the output of input block i, and
    `middle_block_out` on the middle block's output.
Its forward returns those 13 (SD 1.x layout) residuals, which `UNetModel.forward(control=...)` adds
to the skip connections and the middle output. All zero at initialisation, so a fresh ControlNet
leaves the U-Net's prediction exactly unchanged. Constructor arguments and parameter names are the
original `cldm.ControlNet`'s, so ControlNet 1.0 / 1.1 weights (`control_model.*`) load strictly.

At sampling time `Control` pairs a ControlNet with its condition image and weights, and
`ControlledModel` runs several of them and adds up their scaled residuals (Multi-ControlNet).
ControlNet files (`save_controlnet` / `load_controlnet`) hold only the ControlNet (and, when it was
trained with `sd_locked: false`, the U-Net's output blocks) under the original key prefixes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn

from common.tensor_file import TensorFile
from common.weights import CheckpointError, load_state_dict_strict, read_metadata, save_weights
from layers import Conv2d, SiLU, zero_module
from ldm.precision import inference_dtypes
from ldm.unet import UNetConfig, UNetEncoder, UNetModel

# Widths of the original hint encoder: conv_in to 16, then (same-width conv, widening conv) pairs.
HINT_WIDTHS = (16, 32, 96, 256)
# Guess mode: residual i of n is scaled by GUESS_DECAY ** (n - 1 - i) (deep residuals count most).
GUESS_DECAY = 0.825
FILE_FORMAT = "ldm-controlnet"
CONTROL_PREFIX = "control_model."  # the original ControlLDM's prefixes, kept in our files too
UNET_PREFIX = "model.diffusion_model."
ENCODER_PARTS = ("time_embed", "label_emb", "input_blocks", "middle_block")
OWN_PARTS = ("input_hint_block.", "zero_convs.", "middle_block_out.")  # what the U-Net has no weights for
DECODER_PARTS = ("output_blocks", "out")


def hint_encoder(hint_channels: int, model_channels: int, latent_factor: int = 8) -> nn.Sequential:
    """The condition image encoder `input_hint_block`: [B, hint_channels, H, W] -> [B, model_channels, H/f, W/f].

    At latent_factor 8 this is the original: convs 3->16, 16->16, 16->32 (stride 2), 32->32, 32->96
    (s2), 96->96, 96->256 (s2), 256->model_channels (zero-initialised), SiLU between, at indices
    0, 2, ..., 14. For another factor f = 2^k the same eight convs are kept, with stride 2 on the
    first k widening convs only (f = 4: the last widening conv runs at stride 1); above 8, further
    256-wide (conv, stride-2 conv) pairs are inserted before the last conv. Keeping the layout
    keeps names, shapes and capacity the original's whatever the autoencoder (8x weights even load
    into a 4x encoder), and downsampling as early as possible keeps the full-resolution convs,
    which dominate the cost, as few as in the original.
    """
    downsamplings = round(math.log2(latent_factor)) if latent_factor >= 1 else -1
    if downsamplings < 0 or 2**downsamplings != latent_factor:
        raise ValueError(f"ControlNet: latent_factor must be a power of two (the autoencoder's downsampling), "
                         f"got {latent_factor}")
    widths = list(HINT_WIDTHS) + [HINT_WIDTHS[-1]] * max(0, downsamplings - (len(HINT_WIDTHS) - 1))
    layers: list[nn.Module] = [Conv2d(hint_channels, widths[0], 3, padding=1), SiLU()]
    for stage, (width, wider) in enumerate(zip(widths[:-1], widths[1:])):
        stride = 2 if stage < downsamplings else 1
        layers += [Conv2d(width, width, 3, padding=1), SiLU(),
                   Conv2d(width, wider, 3, padding=1, stride=stride), SiLU()]
    layers.append(zero_module(Conv2d(widths[-1], model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def zero_conv(channels: int) -> nn.Sequential:
    """A zero-initialised 1x1 conv, wrapped so that its parameters are named `.0.weight` / `.0.bias`."""
    return nn.Sequential(zero_module(Conv2d(channels, channels, 1)))


def controlnet_args(config: UNetConfig, hint_channels: int, latent_factor: int) -> dict:
    """A ControlNet's keyword arguments in the original's terms (what ControlNet files store)."""
    args = {k: v for k, v in asdict(config).items() if k not in ("out_channels", "n_embed")}
    return dict(args, hint_channels=hint_channels, latent_factor=latent_factor)


class ControlNet(UNetEncoder):
    """Trainable copy of a U-Net's encoder that turns a condition image into U-Net residuals.

    Built from the U-Net's `UNetConfig` (`ControlNet(config, hint_channels=3)`), or from the
    arguments of the original `cldm.ControlNet` (`control_stage_config.params`) as keywords, whose
    `n_embed` is accepted and ignored as there (there is no output head). `latent_factor`: the
    autoencoder's downsampling, 8 for SD's kl-f8 (see `hint_encoder`). Build it from a trained
    U-Net with `from_unet`.
    """

    def __init__(self, config: UNetConfig | None = None, /, *, hint_channels: int, latent_factor: int = 8,
                 **params):
        if config is None:
            config = UNetConfig.from_original(**{k: v for k, v in params.items() if k != "n_embed"})
        elif params:
            raise ValueError("ControlNet: pass a UNetConfig or keyword arguments, not both")
        super().__init__(config)
        if hint_channels < 1:
            raise ValueError(f"ControlNet: hint_channels must be positive, got {hint_channels}")
        self.hint_channels = hint_channels
        self.latent_factor = latent_factor
        self.input_hint_block = hint_encoder(hint_channels, config.model_channels, latent_factor)
        self.zero_convs = nn.ModuleList(zero_conv(ch) for ch in self.input_block_channels)
        self.middle_block_out = zero_conv(self.input_block_channels[-1])

    @property
    def constructor_args(self) -> dict:
        """The constructor arguments (JSON-serialisable): `ControlNet(**net.constructor_args)` rebuilds it."""
        return controlnet_args(self.config, self.hint_channels, self.latent_factor)

    @classmethod
    def from_unet(cls, unet: UNetEncoder, hint_channels: int = 3, latent_factor: int = 8) -> ControlNet:
        """A ControlNet whose encoder copy starts from `unet`'s weights, on its device and dtype.

        The zero convs and the hint encoder's last conv start at zero, so the controlled U-Net
        initially predicts exactly what `unet` alone does.
        """
        net = cls(unet.config, hint_channels=hint_channels, latent_factor=latent_factor)
        encoder = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in ENCODER_PARTS}
        load_state_dict_strict(net, encoder, "ControlNet.from_unet: the U-Net's encoder", allow_missing=OWN_PARTS)
        reference = next(unet.parameters())
        return net.to(device=reference.device, dtype=reference.dtype)

    def check_hint(self, hint: Tensor, x: Tensor) -> None:
        """Raise a clear ValueError unless hint is [B or 1, hint_channels, latent_factor * h, latent_factor * w]."""
        batch, _, h, w = x.shape
        expected = (self.hint_channels, h * self.latent_factor, w * self.latent_factor)
        if hint.ndim != 4 or tuple(hint.shape[1:]) != expected or hint.shape[0] not in (1, batch):
            raise ValueError(f"ControlNet: the condition image must be [{batch} or 1, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}] ({self.latent_factor}x the {h}x{w} latents), got {tuple(hint.shape)}")

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor | None = None,
                y: Tensor | None = None) -> list[Tensor]:
        """The control residuals for the U-Net.

        x: noisy latents [B, C, h, w]; hint: condition images [B or 1, hint_channels, f*h, f*w] in
        [0, 1]; timesteps [B] (or a scalar); context [B, L, context_dim]; y as for the U-Net.
        Returns len(input_blocks) + 1 tensors in the parameters' dtype: [B, c_i, h_i, w_i] shaped
        like input block i's output, then the middle block's.
        """
        self.check_hint(hint, x)
        dtype = self.dtype
        emb = self.embed(timesteps, x.shape[0], x.device, y)
        if isinstance(context, Tensor):
            context = context.to(dtype)
        guided_hint = self.input_hint_block(hint.to(dtype))
        h = x.to(dtype)
        residuals = []
        for index, (block, out_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + guided_hint
            residuals.append(out_conv(h))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h))
        return residuals


# -- several ControlNets at sampling time ---------------------------------------------------------

def control_scales(strength: float, count: int = 13, guess_mode: bool = False) -> list[float]:
    """Per-residual weights: `strength` for each, or in guess mode strength * 0.825 ** (count - 1 - i)."""
    if guess_mode:
        return [strength * GUESS_DECAY ** (count - 1 - i) for i in range(count)]
    return [float(strength)] * count


@dataclass
class Control:
    """One ControlNet with its condition image and weight, for `ControlledModel` / `generate_latents`.

    hint: [1 or B, hint_channels, H, W] in [0, 1] at the output image's size.
    scale: the strength (ControlNet's `control_strength`); residual_scales optionally weights each
    residual on top (one per input block, then the middle block).
    only_mid_control: use the middle residual alone, as a net trained with it expects (its file's
    metadata says so); the skip residuals get weight 0.
    guess_mode: the ControlNet sees only the conditional half of a classifier-free-guidance batch
    (the unconditional prediction stays uncontrolled) and its residuals decay from deep to shallow,
    so the condition alone can steer the image, e.g. with an empty prompt.
    """

    net: ControlNet
    hint: Tensor
    scale: float = 1.0
    guess_mode: bool = False
    residual_scales: list[float] | None = None
    only_mid_control: bool = False

    def weights(self) -> list[float]:
        count = len(self.net.zero_convs) + 1
        base = self.residual_scales if self.residual_scales is not None else [1.0] * count
        if len(base) != count:
            raise ValueError(f"residual_scales needs {count} values (one per input block, then the middle block), "
                             f"got {len(base)}")
        if self.only_mid_control:
            base = [0.0] * (count - 1) + [base[-1]]
        decay = control_scales(1.0, count, self.guess_mode)
        return [self.scale * b * d for b, d in zip(base, decay)]


class ControlledModel:
    """(x_t, t, context) -> `model(x_t, t, context, control=sum of the controls' scaled residuals)`.

    model: a `LatentDiffusion` (or anything taking `control=` like the U-Net).
    batch: the number of images B. A call with 2B samples is classifier-free guidance's batched
    [unconditional, conditional] call (`ldm.guidance`): hints are repeated for both halves, and
    guess-mode controls run on the conditional half only.
    """

    def __init__(self, model: Callable[..., Tensor], controls: Sequence[Control], batch: int):
        if not controls:
            raise ValueError("ControlledModel needs at least one Control")
        self.model, self.controls, self.batch = model, list(controls), batch
        self.weights = [c.weights() for c in self.controls]

    def residuals(self, x_t: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        """Sum over controls of weight_i * residual_i, one tensor per U-Net residual slot."""
        n = x_t.shape[0]
        if n not in (self.batch, 2 * self.batch):
            raise ValueError(f"ControlledModel: got {n} samples for {self.batch} images (expected B or 2B)")
        guided = n == 2 * self.batch
        total: list[Tensor] | None = None
        for control, weights in zip(self.controls, self.weights):
            hint = control.hint
            if control.guess_mode and guided:
                cond = control.net(x_t[self.batch:], hint, t[self.batch:], context[self.batch:])
                residuals = [torch.cat([torch.zeros_like(r), r]) for r in cond]
            else:
                if guided and hint.shape[0] != 1:
                    hint = torch.cat([hint, hint])
                residuals = control.net(x_t, hint, t, context)
            scaled = [w * r for w, r in zip(weights, residuals)]
            total = scaled if total is None else [a + b for a, b in zip(total, scaled)]
        return total

    def __call__(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.model(x_t, t, context, control=self.residuals(x_t, t, context))


# -- files ----------------------------------------------------------------------------------------

def save_controlnet(path: str | Path, net: ControlNet, state: dict[str, Tensor] | None = None,
                    unet_decoder: dict[str, Tensor] | None = None, metadata: dict | None = None) -> None:
    """Write a ControlNet file (safetensors): keys `control_model.*` (`state`, default the live
    weights), plus `model.diffusion_model.{output_blocks,out}.*` when the U-Net's decoder was trained
    (`unet_decoder`), and the config and `metadata` (e.g. the stage-2 file's sha256) as metadata."""
    tensors = {CONTROL_PREFIX + k: v for k, v in (state if state is not None else net.state_dict()).items()}
    for k, v in (unet_decoder or {}).items():
        if k.split(".")[0] not in DECODER_PARTS:
            raise ValueError(f"save_controlnet: unet_decoder holds '{k}', not a U-Net output block / out weight")
        tensors[UNET_PREFIX + k] = v
    meta = {"format": FILE_FORMAT, "config": net.constructor_args, "unet_decoder": bool(unet_decoder), **(metadata or {})}
    save_weights(tensors, path, meta)


@dataclass
class ControlNetFile:
    """What `load_controlnet` returns: the network, trained U-Net decoder weights (may be empty), metadata."""

    net: ControlNet
    unet_decoder: dict[str, Tensor]
    metadata: dict

    def control(self, hint: Tensor, scale: float = 1.0, guess_mode: bool = False) -> Control:
        """This net as a `Control` on condition `hint`, with the settings it was trained with (only_mid_control)."""
        return Control(self.net, hint, scale=scale, guess_mode=guess_mode,
                       only_mid_control=bool(self.metadata.get("only_mid_control", False)))


def load_controlnet(path: str | Path, unet: UNetModel | None = None, latent_factor: int = 8,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ControlNetFile:
    """Load a ControlNet file written by `save_controlnet`, or original ControlNet 1.0 / 1.1 weights.

    Original files (`.pth` / `.safetensors` with `control_model.*` keys, or the bare keys of
    stand-alone releases) carry no config: the architecture is `unet`'s (the model they control),
    hint_channels is read off the weights and `latent_factor` is the given one (8 for SD). Weights
    load strictly; a mismatch is a CheckpointError naming the keys. dtype: the net as
    `ldm.precision.cast_for_inference` leaves it in this dtype (GroupNorms float32), read straight in
    it, one tensor at a time into a network built without storage (`common.tensor_file.TensorFile`:
    no float32 copy is made); float32 by default, whatever the file's precision. The U-Net decoder
    weights come as the file stores them.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    tensors = TensorFile(path)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    prefixed = [k for k in tensors.keys() if k.startswith(CONTROL_PREFIX)]
    file_prefix = CONTROL_PREFIX if prefixed else ""
    names = {k[len(file_prefix):]: k for k in (prefixed or tensors.keys())}  # the net's key -> the file's
    if "input_hint_block.0.weight" not in names:
        raise CheckpointError(f"{path}: no ControlNet weights (neither control_model.* nor bare "
                              "input_hint_block.* keys)")
    if meta.get("format") == FILE_FORMAT:
        config = meta["config"]
        decoder = {k[len(UNET_PREFIX):]: tensors.get(k) for k in tensors.keys() if k.startswith(UNET_PREFIX)}
    else:
        if unet is None:
            raise CheckpointError(f"{path}: original ControlNet weights carry no config; pass the U-Net they control")
        hint_channels = int(tensors.get(names["input_hint_block.0.weight"]).shape[1])
        config = controlnet_args(unet.config, hint_channels, latent_factor)
        decoder = {}  # a 1.0 file's model.diffusion_model.* is the whole base model, not a trained decoder
    with init_empty_weights(include_buffers=False):
        net = ControlNet(**config)
    dtypes = inference_dtypes(net, dtype)
    state = {k: tensors.get(name, dtypes.get(k)) for k, name in names.items()}
    load_state_dict_strict(net, state, path, what="the ControlNet its config describes",
                           file_key=lambda k: file_prefix + k, assign=True)
    return ControlNetFile(net.to(device).eval(), decoder, meta)
