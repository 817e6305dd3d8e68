"""Low-precision inference (generate.py --dtype, `Pipeline.from_file(dtype=)`): which networks run in which
dtype, and the default per device kind.

What is cast, once, when the model loads (`cast_for_inference`): the networks a sampler calls every step,
the U-Net and the ControlNets, whose weights become `dtype` except the GroupNorms' scale and shift
(`layers.GroupNorm32` computes in float32 whatever its input, so float32 parameters cost nothing and no
step casts them). The LoRA hooks cast their factors to the activations' dtype once and keep them
(`ldm.lora`); merged LoRAs are added to the float32 weights before the cast, so a merged weight is
rounded once.

What stays float32, and why:
  - the sampler's state: noise is drawn in float32 from the seeded per-image generators (the same
    starting noise in every dtype), and the x_t updates, sigmas and guidance combine in float32. The
    U-Net casts x_t to its dtype on the way in and its prediction back to x_t's on the way out
    (`ldm.unet.UNetModel.forward`), so only the network calls are low precision. A bfloat16 state would
    be rounded again at every step (relative error up to 2^-9 each time, piling up over the steps), and
    guidance u + s (c - u) amplifies the small difference of two close predictions by s; in float32 this
    arithmetic costs nothing next to a U-Net call.
  - the text encoder and the autoencoder: each runs once per image (the text encoder once per batch),
    against the U-Net's two calls per step, so their precision buys little time. The default model's
    decoder in bfloat16 would keep its quality too (32 images: PSNR 55.7 dB against float32's decode,
    54.0 at worst, at most 4/255 apart; bench/dtype_quality.py), but float32 adds no error at all and
    cannot overflow, as fp16 autoencoders are known to (SDXL's VAE decodes NaN images in fp16).

The default ("auto") is per device kind, `AUTO_DTYPE`: the fastest dtype whose images matched float32's
quality where it was measured (bench/RESULTS.md); a device kind not measured keeps float32.
"""
from __future__ import annotations

import torch
from torch import nn

from layers import GroupNorm32

__all__ = ["AUTO_DTYPE", "DTYPE_NAMES", "DTYPES", "cast_for_inference", "dtype_name", "dtype_note", "inference_dtypes",
           "resolve_dtype", "torch_dtype"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = ("auto", *DTYPES)
# The dtype "auto" resolves to per device kind. cpu: float32, although bfloat16 matched its FID and ran
# a U-Net call in 0.66-0.77 of its time where oneDNN has bf16 kernels (bench/RESULTS.md, "Low-precision
# inference"): CPUs without those kernels run bf16 slower, and a bf16 image differs from the fp32 one,
# so float32 keeps one seed's image the same on every CPU. cuda: not measured here (no GPU), so float32.
AUTO_DTYPE = {"cpu": "fp32", "cuda": "fp32"}


def resolve_dtype(name: str | torch.dtype, device: str, flag: str = "dtype") -> str:
    """The dtype name ("fp32", "bf16", "fp16") that `name` ("auto", one of those, or the torch dtype) means
    on `device` ("cpu", "cuda", "cuda:1"); anything else is a one-line ValueError naming `flag`."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return dtype_name(name)
    if name not in DTYPE_NAMES:
        raise ValueError(f"{flag} must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    if name != "auto":
        return name
    return AUTO_DTYPE.get(torch.device(device).type, "fp32")


def torch_dtype(name: str) -> torch.dtype:
    """torch.float32 / bfloat16 / float16 for "fp32" / "bf16" / "fp16"."""
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32" / "bf16" / "fp16" for a torch dtype of DTYPES."""
    return {v: k for k, v in DTYPES.items()}[dtype]


def dtype_note(name: str, device: str) -> str | None:
    """A note for a dtype that runs, but slowly, on `device` (None if there is nothing to say)."""
    if torch.device(device).type != "cpu":
        return None
    if name == "fp16" and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return ("fp16 on this CPU has no oneDNN kernels and runs the plain ops, many times slower than fp32; "
                "bf16 is the CPU's low-precision dtype")
    if name == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ("bf16 on this CPU has no oneDNN kernels (they need AVX-512 or AVX-NE-CONVERT) and runs the plain "
                "ops, possibly slower than fp32")
    return None


@torch.no_grad()
def cast_for_inference(networks: list[nn.Module], dtype: torch.dtype) -> None:
    """Cast each network (a U-Net, a ControlNet) to `dtype` in place, once, except the GroupNorms'
    parameters, which stay float32 as they are (`layers.GroupNorm32` computes in float32: see the module
    doc). Each module's own tensors are cast, so a GroupNorm's are never rounded to `dtype` on the way."""
    for network in networks:
        for module in network.modules():
            if not isinstance(module, GroupNorm32):
                module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)


def inference_dtypes(network: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`cast_for_inference(network, dtype)`, then the dtype each state-dict entry has: what a loader
    reads each tensor of a file as. Meant for a network built on the meta device (no storage to cast)."""
    cast_for_inference([network], dtype)
    return {key: value.dtype for key, value in network.state_dict().items()}
