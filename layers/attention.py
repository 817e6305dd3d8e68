"""Multi-head attention kernels, chosen globally with `set_attention_backend`:
  - "sdpa": `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels).
  - "xformers": `xformers.ops.memory_efficient_attention` (CUDA only).
  - "reference": softmax(Q K^T / sqrt(d)) V written out, for tests (and short contexts, below).
  - "auto" (default): xformers for CUDA tensors when it is installed, sdpa otherwise. On CPU
    (`cpu_kernel`) attention over a short context (text tokens, small feature maps) is written out
    instead, in inference (float32) and in training; training in bf16 / fp16 writes out attention over
    small feature maps too, and runs sdpa in float32 over larger ones.
Token tensors are [B, L, H, D] (batch, length, heads, head width), any strides.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from layers.fused import memory_format_of

BACKENDS = ("auto", "sdpa", "xformers", "reference")
_backend = "auto"

# The written-out path serves contexts of at most this many keys and head widths up to this, for
# samples whose score matrix (heads * queries * keys float32 values) fits in about L2 (1 MiB); it runs
# as many samples at a time as stay within that. Whether it runs never depends on the batch size, so
# a sample's attention is computed the same way alone and in any batch.
SHORT_CONTEXT_MAX_KEYS = 96
SHORT_CONTEXT_MAX_HEAD_DIM = 64
SHORT_CONTEXT_MAX_SCORES = 2**18
# In training the written-out path keeps a sample's scores for the backward pass: at most this many.
TRAINING_MAX_SCORES = 2**19

try:  # optional dependency (pip extra "xformers"); it only has CUDA kernels
    import xformers.ops as _xops
except ImportError:
    _xops = None


def set_attention_backend(name: str) -> None:
    """Select the attention kernel used by every attention layer: one of BACKENDS."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}' (choose from {', '.join(BACKENDS)})")
    if name == "xformers" and _xops is None:
        raise ValueError("attention backend 'xformers' requested but xformers is not installed")
    _backend = name


def get_attention_backend() -> str:
    """The currently selected attention backend name."""
    return _backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Context manager that selects backend `name` and restores the previous one on exit."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out, in float32 (under bf16 / fp16 autocast the products and the
    probabilities in that dtype, torch's softmax summing in float32). q: [B, Lq, H, D], k, v: [B, Lk, H, D]
    -> [B, Lq, H, D] in q's dtype.

    The inputs are copied head-major ([B, H, L, D], contiguous) first, so every (sample, head) product
    is one item of a batched matmul laid out alike at any batch size: a strided batch of one would
    otherwise take another kernel than the copied batch of several.
    """
    dtype = q.dtype
    q, k, v = (t.transpose(1, 2).float().contiguous() for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention with the selected backend.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] (any strides). Returns [B, Lq, H, D].
    """
    backend = _backend
    if backend == "auto":
        kernel = cpu_kernel(q, k) if q.device.type == "cpu" else None
        if kernel == "written-out":
            return short_context_attention(q, k, v) if not torch.is_grad_enabled() else reference_attention(q, k, v)
        if kernel == "sdpa-float32":
            return _sdpa(q.float(), k.float(), v.float()).to(q.dtype)
        backend = "xformers" if _xops is not None and q.is_cuda else "sdpa"
    if backend == "sdpa":
        return _sdpa(q, k, v)
    if backend == "xformers":
        if not q.is_cuda:
            raise ValueError("attention backend 'xformers' needs CUDA tensors; use 'sdpa' on CPU")
        return _xops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())
    return reference_attention(q, k, v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def cpu_kernel(q: torch.Tensor, k: torch.Tensor) -> str:
    """What "auto" runs on CPU tensors q: [B, Lq, H, D], k: [B, Lk, H, D]: "written-out", "sdpa-float32"
    or "sdpa". Chosen by measurement (bench/RESULTS.md, "Training step"); never by the batch size."""
    # With few keys the flash kernel's per-block work dominates the two matmuls and a softmax;
    # larger score matrices cost more in fresh allocations than they save. torch.compile traces
    # SDPA instead, which inductor lowers to its own kernel.
    if torch.compiler.is_compiling():
        return "sdpa"
    _, queries, heads, head_dim = q.shape
    scores = heads * queries * k.shape[1]  # one sample's
    short = k.shape[1] <= SHORT_CONTEXT_MAX_KEYS and head_dim <= SHORT_CONTEXT_MAX_HEAD_DIM
    if not torch.is_grad_enabled():
        return "written-out" if short and q.dtype == torch.float32 and scores <= SHORT_CONTEXT_MAX_SCORES else "sdpa"
    if q.dtype == torch.float32:
        return "written-out" if short and scores <= TRAINING_MAX_SCORES else "sdpa"
    # Training in bf16 / fp16: torch's CPU flash attention (forward + backward) measured up to 5x slower
    # than in float32 there, and the written-out products faster than either up to these score counts.
    return "written-out" if head_dim <= SHORT_CONTEXT_MAX_HEAD_DIM and scores <= TRAINING_MAX_SCORES else "sdpa-float32"


def short_context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`reference_attention` on as many samples at a time as keep their scores within
    SHORT_CONTEXT_MAX_SCORES (at least one). Shapes as `attention`."""
    b, queries, heads, _ = q.shape
    group = max(1, SHORT_CONTEXT_MAX_SCORES // (heads * queries * k.shape[1]))
    if b <= group:
        return reference_attention(q, k, v)
    return torch.cat([reference_attention(q[i:i + group], k[i:i + group], v[i:i + group]) for i in range(0, b, group)])


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] (a free view of channels_last memory, one copy for NCHW)."""
    b, c, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, height * width, c)


def image_view(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W], a channels_last view of contiguous tokens."""
    return tokens.reshape(tokens.shape[0], height, width, tokens.shape[-1]).permute(0, 3, 1, 2)


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W] in the memory format of the image `like`."""
    image = image_view(tokens, like.shape[2], like.shape[3])
    return image.contiguous(memory_format=memory_format_of(like))
