"""Linear and conv layers with fused epilogues (bias, GELU, residual add, gating multiply).

In inference on CPU (no autograd, float32 or bfloat16, no autocast) these call oneDNN through
the `torch.ops.mkldnn` pointwise-fusion ops that torch.compile's CPU backend uses. Fusing the
epilogue saves a full read and write of the output per op, and oneDNN's matmul beats the MKL
sgemm behind `F.linear` on most U-Net shapes (up to 15% for wide layers); measured on the whole
U-Net, 5-10% faster than the same model on F.linear/F.conv2d. Everywhere else (training, CUDA,
fp16, autocast, tracing by torch.compile) they compute the same thing with ordinary differentiable
PyTorch ops. `compile_for_inference` is the opt-in torch.compile route (bench/RESULTS.md has numbers).
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
        if residual is not None:
            return _mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        if multiply is not None:
            return _mkldnn._linear_pointwise.binary(x, multiply, weight, bias, "mul")
        return _mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
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


def compile_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` (inductor) of `model` for inference, with its weights frozen as constants.

    Opt-in: the first call compiles (about 50 s for a 3 M-parameter U-Net on this 2-core CPU, with
    a C++ compiler), and the result does not see later changes to the weights, so it is for
    sampling, not training. Call it under `torch.no_grad()`/`inference_mode()`; shapes are static
    (a new batch or image size compiles again). Inside the compiled graph the layers use plain
    ops (see `_onednn_ok`), which inductor fuses and pre-packs for oneDNN itself.
    """
    return torch.compile(model, dynamic=False, options={"freezing": True})
