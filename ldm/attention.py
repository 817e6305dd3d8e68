"""Attention for the U-Net: selectable kernels, cross-attention, SpatialTransformer, AttentionBlock.

Kernels ("backends"), chosen globally with `set_attention_backend`:
  - "sdpa": `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels).
  - "xformers": `xformers.ops.memory_efficient_attention` (CUDA only).
  - "reference": softmax(Q K^T / sqrt(d)) V written out, for tests (and short contexts, below).
  - "auto" (default): xformers for CUDA tensors when it is installed, sdpa otherwise; in CPU
    float32 inference, attention over a short context (text tokens) is written out instead.

Token tensors are [B, L, C]. SpatialTransformer and AttentionBlock take images [B, C, H, W],
run their 1x1 projections as matrix products on the token view [B, H*W, C] (a free view for
channels_last images, one transposing copy for NCHW ones) and fuse the residual add into the
output projection (see ldm.kernels).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.blocks import normalization, zero_module
from ldm.kernels import linear, memory_format_of

BACKENDS = ("auto", "sdpa", "xformers", "reference")
_backend = "auto"

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
    """softmax(Q K^T / sqrt(d)) V written out, with matmuls over head-major views and the softmax in
    float32. q: [B, Lq, H, D], k, v: [B, Lk, H, D] -> [B, Lq, H, D]."""
    scores = torch.matmul(q.transpose(1, 2).float(), k.permute(0, 2, 3, 1).float()).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(dim=-1), v.transpose(1, 2).float()).transpose(1, 2).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention with the selected backend.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] (any strides). Returns [B, Lq, H, D].
    """
    backend = _backend
    if backend == "auto":
        if _short_context_on_cpu(q, k):
            return reference_attention(q, k, v)
        backend = "xformers" if _xops is not None and q.is_cuda else "sdpa"
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "xformers":
        if not q.is_cuda:
            raise ValueError("attention backend 'xformers' needs CUDA tensors; use 'sdpa' on CPU")
        return _xops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())
    return reference_attention(q, k, v)


def _short_context_on_cpu(q: torch.Tensor, k: torch.Tensor) -> bool:
    # With few keys the flash kernel's per-block work dominates: two matmuls and a softmax over
    # the score matrix measured 10-55% faster for 16-77 keys at head widths <= 32 (cross-attention
    # to text tokens), on par at head widths 40-160. Only while the scores stay within about L2
    # (1 MiB): larger ones cost more in fresh allocations than they save (5 MiB: 2x slower in-model).
    # torch.compile traces SDPA instead, which inductor lowers to its own kernel.
    b, queries, heads, _ = q.shape
    return (q.device.type == "cpu" and q.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and k.shape[1] <= 96 and q.shape[-1] <= 64 and b * heads * queries * k.shape[1] <= 2**18)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] as a view (for NCHW memory its channel stride is H*W)."""
    b, c, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, height * width, c)


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W] in the memory format of the image `like`."""
    b, _, height, width = like.shape
    image = tokens.reshape(b, height, width, tokens.shape[-1]).permute(0, 3, 1, 2)  # channels_last view
    return image.contiguous(memory_format=memory_format_of(like))


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when context is None).

    x: [B, L, query_dim], context: [B, Lc, context_dim] -> [B, L, query_dim].
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output, plus `residual` ([B, L, query_dim]) when given (fused into to_out)."""
        b, heads, d = x.shape[0], self.heads, self.dim_head
        context = x if context is None else context
        q = linear(x, self.to_q.weight).view(b, -1, heads, d)
        k = linear(context, self.to_k.weight).view(b, -1, heads, d)
        v = linear(context, self.to_v.weight).view(b, -1, heads, d)
        out = attention(q, k, v).reshape(b, -1, heads * d)
        proj, dropout = self.to_out
        if dropout.p > 0 and self.training:  # dropout sits between the projection and the residual
            out = dropout(proj(out))
            return out if residual is None else out + residual
        return linear(out, proj.weight, proj.bias, residual=residual)


class GEGLU(nn.Module):
    """Gated GELU: (a, gate) = proj(x).chunk(2); a * gelu(gate). [..., dim_in] -> [..., dim_out]."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two products on the weight halves, so GELU and the gating fuse into them.
        w_a, w_gate = self.proj.weight.chunk(2)
        b_a, b_gate = self.proj.bias.chunk(2)
        gate = linear(x, w_gate, b_gate, gelu=True)
        return linear(x, w_a, b_a, multiply=gate)


class FeedForward(nn.Module):
    """Transformer MLP: `net.0` GEGLU (or Linear + GELU), `net.1` dropout, `net.2` Linear back to dim."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """MLP output, plus `residual` when given (fused into the last projection)."""
        project_in, dropout, project_out = self.net
        h = dropout(project_in(x))
        return linear(h, project_out.weight, project_out.bias, residual=residual)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the context, GEGLU MLP.

    With `disable_self_attn`, attn1 also attends to the context. x: [B, L, dim] -> [B, L, dim].
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True, checkpoint: bool = False, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None, residual=x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a token context.

    norm -> proj_in -> `depth` BasicTransformerBlocks -> proj_out (zero-initialised) -> + input.
    proj_in/proj_out are 1x1 convs (SD 1.x) or Linear layers (`use_linear`, SD 2.x); both are
    the same matrix product, applied here to the token view of the map.
    `context_dim` may be a list with one entry per block.

    x: [B, C, H, W], context: [B, L, context_dim] or None -> [B, C, H, W].
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | list[int] | None = None, disable_self_attn: bool = False,
                 use_linear: bool = False, use_checkpoint: bool = False):
        super().__init__()
        context_dims = context_dim if isinstance(context_dim, (list, tuple)) else [context_dim] * depth
        if len(context_dims) != depth:
            raise ValueError(f"SpatialTransformer: {len(context_dims)} context dims for depth {depth}")
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = normalization(in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dims[d],
                                  checkpoint=use_checkpoint, disable_self_attn=disable_self_attn)
            for d in range(depth)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
        contexts = context if isinstance(context, list) else [context] * len(self.transformer_blocks)
        tokens = to_tokens(self.norm(x))
        tokens = linear(tokens, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block, ctx in zip(self.transformer_blocks, contexts):
            tokens = block(tokens, ctx)
        tokens = linear(tokens, self.proj_out.weight.flatten(1), self.proj_out.bias, residual=to_tokens(x))
        return from_tokens(tokens, like=x)


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of a feature map (LDM configs without a SpatialTransformer).

    `qkv` and `proj_out` are 1-D convs as in the original checkpoints ([3C, C, 1], [C, C, 1]).
    The legacy channel order of qkv is per head [q_h, k_h, v_h]; `use_new_attention_order`
    means [q_all_heads, k_all_heads, v_all_heads]. x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
        else:
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {self.num_heads}")
        self.channels = channels
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        heads = self.num_heads
        qkv = linear(to_tokens(self.norm(x)), self.qkv.weight.squeeze(-1), self.qkv.bias)
        if self.use_new_attention_order:
            q, k, v = qkv.view(b, -1, 3, heads, c // heads).unbind(2)
        else:
            q, k, v = qkv.view(b, -1, heads, 3, c // heads).unbind(3)
        out = attention(q, k, v).reshape(b, -1, c)
        out = linear(out, self.proj_out.weight.squeeze(-1), self.proj_out.bias, residual=to_tokens(x))
        return from_tokens(out, like=x)
