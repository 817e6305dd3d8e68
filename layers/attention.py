"""Multi-head attention kernels, chosen globally with `set_attention_backend`:
  - "sdpa": `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels).
  - "xformers": `xformers.ops.memory_efficient_attention` (CUDA only).
  - "reference": softmax(Q K^T / sqrt(d)) V written out, for tests (and short contexts, below).
  - "auto" (default): xformers for CUDA tensors when it is installed, sdpa otherwise; in CPU
    float32 inference, attention over a short context (text tokens) is written out instead.
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
    """softmax(Q K^T / sqrt(d)) V written out, in float32. q: [B, Lq, H, D], k, v: [B, Lk, H, D] -> [B, Lq, H, D].

    The inputs are copied head-major ([B, H, L, D], contiguous) first, so every (sample, head) product
    is one item of a batched matmul laid out alike at any batch size: a strided batch of one would
    otherwise take another kernel than the copied batch of several.
    """
    q, k, v = (t.transpose(1, 2).float().contiguous() for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention with the selected backend.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] (any strides). Returns [B, Lq, H, D].
    """
    backend = _backend
    if backend == "auto":
        if short_context_on_cpu(q, k):
            return short_context_attention(q, k, v)
        backend = "xformers" if _xops is not None and q.is_cuda else "sdpa"
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "xformers":
        if not q.is_cuda:
            raise ValueError("attention backend 'xformers' needs CUDA tensors; use 'sdpa' on CPU")
        return _xops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())
    return reference_attention(q, k, v)


def short_context_on_cpu(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether "auto" writes attention out: CPU float32 inference over a short context."""
    # With few keys the flash kernel's per-block work dominates the two matmuls and a softmax;
    # larger score matrices cost more in fresh allocations than they save. torch.compile traces
    # SDPA instead, which inductor lowers to its own kernel.
    _, queries, heads, _ = q.shape
    return (q.device.type == "cpu" and q.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and k.shape[1] <= SHORT_CONTEXT_MAX_KEYS
            and q.shape[-1] <= SHORT_CONTEXT_MAX_HEAD_DIM
            and heads * queries * k.shape[1] <= SHORT_CONTEXT_MAX_SCORES)


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
