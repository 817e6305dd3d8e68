"""Linear and conv layers with fused epilogues (bias, GELU, residual add), and the upsampling
conv folded onto the low-resolution input.

In inference on CPU (no autograd, float32 or bfloat16, no autocast) these call oneDNN through
the `torch.ops.mkldnn` pointwise-fusion ops that torch.compile's CPU backend uses. A fused
epilogue saves a full read and write of the output, and oneDNN's matmul beats the MKL sgemm
behind `F.linear` on most U-Net shapes (up to 2x for narrow layers); measured on the whole U-Net,
5-10% faster than the same model on F.linear/F.conv2d. `upsample_conv2d` computes nearest 2x
upsampling + 3x3 conv with 16 instead of 36 multiply-adds per output. Everywhere else (training,
CUDA, fp16, autocast, tracing by torch.compile) they compute the same thing with ordinary
differentiable PyTorch ops. `compile_for_inference` is the opt-in torch.compile route
(bench/RESULTS.md has numbers; on CPU it no longer beats these eager paths).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_mkldnn = torch.ops.mkldnn
_HAVE_ONEDNN = (torch.backends.mkldnn.is_available()
                and hasattr(_mkldnn, "_linear_pointwise") and hasattr(_mkldnn, "_convolution_pointwise"))


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Under torch.compile the plain ops are traced instead: inductor fuses (and pre-packs) them itself.
    return (_HAVE_ONEDNN and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gelu: bool = False,
           multiply: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b, then optionally gelu(y) or y * multiply, then + residual.

    x: [..., in], weight: [out, in]; multiply/residual: [..., out] (any strides). At most one of
    gelu / multiply / residual may be given.
    """
    if gelu + (multiply is not None) + (residual is not None) > 1:
        raise ValueError("linear: fuse at most one of gelu, multiply, residual")
    if _onednn_ok(x, weight):
        # The multiply / add run in place on the fresh product: oneDNN's binary post-ops measured
        # 1-4% slower per transformer block (2x per GEMM at 256+ output columns).
        y = _mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
        if multiply is not None:
            return y.mul_(multiply)
        return y if residual is None else y.add_(residual)
    y = F.linear(x, weight, bias)
    if gelu:
        return F.gelu(y)
    if multiply is not None:
        return y * multiply
    return y if residual is None else y + residual


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           padding: int = 0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x) (+ residual). x: [B, C, H, W] in any memory format; the output keeps it."""
    if _onednn_ok(x, weight):
        pad, step, dilation = [padding, padding], [stride, stride], [1, 1]
        if residual is not None:
            return _mkldnn._convolution_pointwise.binary(
                x, residual, weight, bias, pad, step, dilation, 1, "add", None, None, [], None)
        return _mkldnn._convolution_pointwise(x, weight, bias, pad, step, dilation, 1, "none", [], "")
    y = F.conv2d(x, weight, bias, stride, padding)
    return y if residual is None else y + residual


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """torch.channels_last for a 4-D tensor laid out channels_last (and not also contiguous), else
    torch.contiguous_format: the layout an op's output should keep."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# Output pixel 2i + a of a nearest 2x upsampling followed by a 3x3 conv (padding 1) sees input rows
# {i - 1, i} for a = 0 and {i, i + 1} for a = 1 (likewise columns), so the 3x3 taps fold into one
# 2x2 kernel per output phase (a, b). _PHASE_TAPS[a, s, k]: does tap k land on row s of phase a.
_PHASE_TAPS = torch.tensor([[[1., 0., 0.], [0., 1., 1.]],
                            [[1., 1., 0.], [0., 0., 1.]]])


def upsample_phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """[O, I, 3, 3] -> [4 O, I, 2, 2]: the 2x2 kernel of each output phase, phases (a, b) major."""
    taps = _PHASE_TAPS.to(weight.device)
    phases = torch.einsum("ask,btl,oikl->aboist", taps, taps, weight.float())  # sums in float32 for bf16 weights
    return phases.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype).contiguous()


def _cached_upsample_phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """`upsample_phase_weights(weight)`, kept on the weight tensor until its data changes (new
    storage or an in-place write: optimizer steps, EMA, `copy_`, `load_state_dict`)."""
    try:
        stamp = (weight.data_ptr(), weight._version, weight.dtype, weight.shape)
    except RuntimeError:  # tensors made under inference_mode have no version counter to key on
        return upsample_phase_weights(weight)
    cached = getattr(weight, "_upsample_phase_weights", None)
    if cached is None or cached[0] != stamp:
        cached = weight._upsample_phase_weights = (stamp, upsample_phase_weights(weight))
    return cached[1]


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(nearest_upsample_2x(x), weight, bias, padding=1) for a 3x3 `weight`.

    x: [B, I, H, W] -> [B, O, 2H, 2W] in x's memory format. In CPU inference one 2x2 conv with 4 O
    output channels runs on x itself (16 instead of 36 multiply-adds per output and input channel,
    and the upsampled image is never built; measured 1.2-2.2x faster per layer at U-Net sizes) and
    its four phases are interleaved into the output. Elsewhere (training, CUDA, torch.compile):
    the two ops as written.
    """
    if not _onednn_ok(x, weight) or weight.shape[-2:] != (3, 3):
        return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    b, _, height, width = x.shape
    out_channels = weight.shape[0]
    phases = _cached_upsample_phase_weights(weight)
    # Padded 2x2 conv: phase (a, b)'s value for output pixel (2i + a, 2j + b) sits at (i + a, j + b).
    y = conv2d(x, phases, None if bias is None else bias.repeat(4), padding=1).unflatten(1, (2, 2, out_channels))
    out = torch.empty(b, out_channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device,
                      memory_format=memory_format_of(x))
    out_phases = out.unflatten(3, (width, 2)).unflatten(2, (height, 2))  # [B, O, H, 2, W, 2], a view
    for a in (0, 1):
        for c in (0, 1):
            out_phases[:, :, :, a, :, c] = y[:, a, c, :, a:a + height, c:c + width]
    return out


def compile_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` (inductor) of `model` for inference, with its weights frozen as constants.

    Opt-in: the first call compiles (about 50 s for a 3 M-parameter U-Net on this 2-core CPU, with
    a C++ compiler), and the result does not see later changes to the weights, so it is for
    sampling, not training. Call it under `torch.no_grad()`/`inference_mode()`; shapes are static
    (a new batch or image size compiles again). Inside the compiled graph the layers use plain
    ops (see `_onednn_ok`), which inductor fuses and pre-packs for oneDNN itself. On this CPU the
    eager fast paths are now as fast or faster (U-Net against diffusers, 2 threads: tiny 1.40x eager,
    1.35x compiled; small 1.38x against 1.11x), so this is for CUDA users and experiments.
    """
    return torch.compile(model, dynamic=False, options={"freezing": True})
