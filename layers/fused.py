"""`Linear` and `Conv2d`: `nn.Linear` / `nn.Conv2d` (same parameters, same results) that run oneDNN
kernels in CPU inference.

In inference on CPU (no autograd, float32 or bfloat16, no autocast, not traced by torch.compile)
their `forward` calls the oneDNN matmul / convolution behind torch.compile's CPU backend
(`torch.ops.mkldnn._linear_pointwise` / `_convolution_pointwise`), which beat `F.linear`'s MKL
sgemm on most U-Net shapes (bench/RESULTS.md). Everywhere else (training, CUDA, fp16, autocast,
torch.compile) they are the plain differentiable ops.

Batch invariance: in CPU inference a sample's output does not depend on what else is in its batch,
so an image drawn at --n 4 is the one drawn alone. The kernel a `Linear` runs is chosen by the rows
of one sample (x: [B, ..., in] has numel / (B * in) of them; a 2-D input [B, in] one), never by the
batch, and each kernel gives a row the same result for any number of rows it is handed:
  - one row per sample (time and class embeddings): each row is computed alone. MKL's sgemm and
    oneDNN compute a lone row differently from a row among others. (The U-Net computes the
    embedding once when a batch shares its timestep, as a sampler's does: one row.)
  - from MKL_MIN_ROWS to ONEDNN_MIN_ROWS rows: MKL's sgemm. With fewer than MKL_MIN_ROWS rows in a
    call it computes some of them differently (measured at 1, 2, 4 and 8 threads), so:
  - otherwise oneDNN's matmul, which gives a row the same result for any number of rows but one.
`Conv2d` needs nothing of the kind: oneDNN's convolutions run the same kernel at every batch size
(measured on AVX2 for every conv of the U-Net and the autoencoder; tests/test_batch_invariance.py).

`Conv2d.upsampled(x)` computes `conv(nearest_2x(x))` for a 3x3 conv without building the
upsampled image: the 3x3 taps fold into one 2x2 kernel per output phase, run on the
low-resolution input (16 instead of 36 multiply-adds per output and input channel); in CPU
training too, through differentiable ops.

An owner module may call such a fused method instead of calling the module only while
`runs_plain(module)` holds: the module is exactly one of these classes and nothing hooks it. A
module wrapped (PEFT LoRA), replaced (quantization) or hooked is always called as declared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_state

_mkldnn = torch.ops.mkldnn
_HAVE_ONEDNN = (torch.backends.mkldnn.is_available()
                and hasattr(_mkldnn, "_linear_pointwise") and hasattr(_mkldnn, "_convolution_pointwise"))
# oneDNN's bf16 kernels need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; elsewhere bf16 takes the plain ops.
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _HAVE_ONEDNN and _mkldnn._is_mkldnn_bf16_supported() \
    else (torch.float32,)


def cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a layer may run its own CPU inference kernels on (x, weight) instead of the plain op."""
    # Under torch.compile the plain ops are traced instead: inductor fuses (and pre-packs) them itself.
    # Weights of a tensor subclass (e.g. torchao's quantized ones) need the ops their subclass overrides.
    return (not torch.is_grad_enabled() and x.is_cpu and not torch.compiler.is_compiling()
            and (type(weight) is nn.Parameter or type(weight) is torch.Tensor)
            and x.dtype == weight.dtype and not torch.is_autocast_enabled("cpu"))


def onednn_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the oneDNN kernels may stand in for F.linear / F.conv2d on (x, weight)."""
    return _HAVE_ONEDNN and x.dtype in _ONEDNN_DTYPES and cpu_inference(x, weight)


# Samples of fewer rows than this go to F.linear (MKL), whose per-call cost is a fraction of oneDNN's...
ONEDNN_MIN_ROWS = 64
# ...unless they have fewer than this: MKL's sgemm computes a row differently when a call has fewer rows
# (some counts below 12 at 2 and 8 threads, below 4 at 1 and 4 threads), so a batch of one would differ.
MKL_MIN_ROWS = 12


def runs_plain(module: nn.Module) -> bool:
    """True when `module` is exactly `Linear` or `Conv2d` of this file with no hook on it (nor a
    global one), so a fused method of it computes what calling it would."""
    return (type(module) in (Linear, Conv2d) and not module._forward_hooks and not module._forward_pre_hooks
            and not _module_state._global_forward_hooks and not _module_state._global_forward_pre_hooks)


def rows_per_sample(x: torch.Tensor) -> int:
    """The rows of one sample of a Linear's input x: [B, ..., in] (at least 2-D, not empty): 1 for
    [B, in], numel / (B * in) otherwise."""
    return 1 if x.dim() == 2 else x.numel() // (x.shape[0] * x.shape[-1])


class Linear(nn.Linear):
    """`nn.Linear` whose CPU inference runs oneDNN's matmul, and gives a sample the same result at any
    batch size (module docstring). x: [..., in] -> [..., out].

    `geglu(x)` computes a * gelu(gate) with (a, gate) = self(x).chunk(2, -1) as two products, GELU
    fused into the gate's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel(x)
        if kernel == "onednn":
            return _mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if kernel == "rows":
            if x.dim() == 2:
                return self._row_by_row(x)
            return self._row_by_row(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def _kernel(self, x: torch.Tensor) -> str:
        """"onednn", "rows" (each row its own product) or "plain" (F.linear: MKL's sgemm on CPU)."""
        if x.dim() < 2 or x.numel() == 0:
            return "plain"
        rows = rows_per_sample(x)
        # A few rows per sample (4x4 feature maps, text contexts) are MKL's: oneDNN's per-call cost dominates there.
        if MKL_MIN_ROWS <= rows < ONEDNN_MIN_ROWS or not cpu_inference(x, self.weight):
            return "plain"
        if rows == 1:
            return "rows"
        return "onednn" if _HAVE_ONEDNN and x.dtype in _ONEDNN_DTYPES else "plain"

    def _row_by_row(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in] -> [N, out], every row computed as a batch of one."""
        if x.shape[0] == 1:
            return F.linear(x, self.weight, self.bias)
        return torch.cat([F.linear(row, self.weight, self.bias) for row in x.split(1)])

    def geglu(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel(x) != "onednn":
            a, gate = self(x).chunk(2, dim=-1)
            return F.gelu(gate).mul_(a) if not torch.is_grad_enabled() else a * F.gelu(gate)
        (w_a, w_gate), (b_a, b_gate) = self.weight.chunk(2), self.bias.chunk(2)
        gate = _mkldnn._linear_pointwise(x, w_gate, b_gate, "gelu", [], "none")
        return _mkldnn._linear_pointwise(x, w_a, b_a, "none", [], "").mul_(gate)


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


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` whose CPU inference runs oneDNN's convolution. Keeps x's memory format."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn_ok(x):
            return _mkldnn._convolution_pointwise(x, self.weight, self.bias, list(self.padding), list(self.stride),
                                                  list(self.dilation), self.groups, "none", [], "")
        return super().forward(x)

    def _onednn_ok(self, x: torch.Tensor) -> bool:
        return self.padding_mode == "zeros" and not isinstance(self.padding, str) and onednn_inference(x, self.weight)

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """self(nearest_upsample_2x(x)). x: [B, I, H, W] -> [B, O, 2H, 2W] in x's memory format.

        A 3x3, padding-1, stride-1 conv on CPU runs one 2x2 conv with 4 O output channels on x
        itself and interleaves its four phases into the output: in inference with oneDNN's kernel,
        in training (autograd) with the plain differentiable ops, 1.0-1.8x faster forward + backward
        than upsampling first (bench/RESULTS.md, "Training step"). Anything else runs the two ops as
        written.
        """
        foldable = (self.kernel_size == (3, 3) and self.padding == (1, 1) and self.stride == (1, 1)
                    and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros")
        if foldable and x.is_cpu and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._folded_differentiable(x)
        if not (foldable and self._onednn_ok(x)):
            return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        b, _, height, width = x.shape
        out_channels = self.out_channels
        bias = None if self.bias is None else self.bias.repeat(4)
        # Padded 2x2 conv: phase (a, c)'s value for output pixel (2i + a, 2j + c) sits at (i + a, j + c).
        y = _mkldnn._convolution_pointwise(x, self._phase_weights(), bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
        y = y.unflatten(1, (2, 2, out_channels))
        out = torch.empty(b, out_channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device,
                          memory_format=memory_format_of(x))
        out_phases = out.unflatten(3, (width, 2)).unflatten(2, (height, 2))  # [B, O, H, 2, W, 2], a view
        for a in (0, 1):
            for c in (0, 1):
                out_phases[:, :, :, a, :, c] = y[:, a, c, :, a:a + height, c:c + width]
        return out

    def _folded_differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """`upsampled` through autograd's ops: the phase weights are computed from the weight at each call."""
        b, _, height, width = x.shape
        bias = None if self.bias is None else self.bias.repeat(4)
        y = F.conv2d(x, upsample_phase_weights(self.weight), bias, padding=1).unflatten(1, (2, 2, self.out_channels))
        rows = [torch.stack([y[:, a, c, :, a:a + height, c:c + width] for c in (0, 1)], dim=-1) for a in (0, 1)]
        out = torch.stack(rows, dim=3).reshape(b, self.out_channels, 2 * height, 2 * width)  # [B, O, H, 2, W, 2]
        return out.contiguous(memory_format=memory_format_of(x))

    def _phase_weights(self) -> torch.Tensor:
        """`upsample_phase_weights(self.weight)`, kept until the weight's data changes (new storage or
        an in-place write: optimizer steps, EMA, `copy_`, `load_state_dict`)."""
        weight = self.weight
        try:
            stamp = (weight.data_ptr(), weight._version, weight.dtype, weight.shape)
        except RuntimeError:  # tensors made under inference_mode have no version counter to key on
            return upsample_phase_weights(weight)
        cached = getattr(self, "_phase_cache", None)
        if cached is None or cached[0] != stamp:
            cached = self._phase_cache = (stamp, upsample_phase_weights(weight))
        return cached[1]


def drop_phase_caches(module: nn.Module) -> int:
    """Forget the phase weights every `Conv2d` in `module` keeps for `upsampled` (16/9 of each upsampling
    conv's weight: 0.22 GiB in SD 1.x's float32 U-Net); the next call computes them again, once, a
    fraction of that one call's upsampling convs. For a network that waits while another runs: a sampler's
    U-Net while the autoencoder decodes. Returns the bytes let go."""
    freed = 0
    for conv in module.modules():
        cached = conv.__dict__.pop("_phase_cache", None) if isinstance(conv, Conv2d) else None
        if cached is not None:
            freed += cached[1].numel() * cached[1].element_size()
    return freed


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """torch.channels_last for a 4-D tensor laid out channels_last (and not also contiguous), else
    torch.contiguous_format: the layout an op's output should keep."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def compile_for_inference(model: nn.Module) -> nn.Module:
    """`torch.compile` (inductor) of `model` for inference, with its weights frozen as constants.

    Opt-in, for CUDA users and experiments (on CPU the eager oneDNN paths measured as fast or
    faster, bench/RESULTS.md). The first call compiles, and the result does not see later changes
    to the weights, so it is for sampling, not training. Call it under `torch.no_grad()` /
    `inference_mode()`; shapes are static (a new batch or image size compiles again). Inside the
    graph the layers trace their plain ops, which inductor fuses and pre-packs for oneDNN itself.
    """
    return torch.compile(model, dynamic=False, options={"freezing": True})
