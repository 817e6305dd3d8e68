"""Attention layers of the U-Net: cross-attention, the SpatialTransformer and AttentionBlock.

Module and parameter names are the original LDM `attention.py` / `openaimodel.py` ones (`to_q`,
`to_out.0`, `ff.net.0.proj`, `proj_in`, `qkv`, ...). Token tensors are [B, L, C]; the kernel
behind `attention` is chosen with `layers.set_attention_backend`. SpatialTransformer and
AttentionBlock take images [B, C, H, W].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from layers import (Conv2d, Linear, add, attention, from_tokens, image_view, memory_format_of, runs_plain, to_tokens,
                    zero_module)
from ldm.blocks import normalization


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
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, heads, d = x.shape[0], self.heads, self.dim_head
        context = x if context is None else context
        q = self.to_q(x).view(b, -1, heads, d)
        k = self.to_k(context).view(b, -1, heads, d)
        v = self.to_v(context).view(b, -1, heads, d)
        return self.to_out(attention(q, k, v).reshape(b, -1, heads * d))


class GEGLU(nn.Module):
    """Gated GELU: (a, gate) = proj(x).chunk(2); a * gelu(gate). [..., dim_in] -> [..., dim_out]."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_plain(self.proj):
            return self.proj.geglu(x)
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: `net.0` GEGLU (or Linear + GELU), `net.1` dropout, `net.2` Linear back to dim."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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
        x = add(self.attn1(self.norm1(x), context if self.disable_self_attn else None), x)
        x = add(self.attn2(self.norm2(x), context), x)
        return add(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a token context.

    norm -> proj_in -> `depth` BasicTransformerBlocks -> proj_out (zero-initialised) -> + input.
    proj_in/proj_out are 1x1 convs on the image (SD 1.x) or Linear layers on the tokens
    (`use_linear`, SD 2.x). `context_dim` may be a list with one entry per block.

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
            self.proj_in = Linear(in_channels, inner_dim)
            self.proj_out = zero_module(Linear(inner_dim, in_channels))
        else:
            self.proj_in = Conv2d(in_channels, inner_dim, 1)
            self.proj_out = zero_module(Conv2d(inner_dim, in_channels, 1))
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dims[d],
                                  checkpoint=use_checkpoint, disable_self_attn=disable_self_attn)
            for d in range(depth)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
        contexts = context if isinstance(context, list) else [context] * len(self.transformer_blocks)
        h = self.norm(x)
        if self.use_linear:
            tokens = self.proj_in(to_tokens(h))
            for block, ctx in zip(self.transformer_blocks, contexts):
                tokens = block(tokens, ctx)
            return add(from_tokens(self.proj_out(tokens), like=x), x)
        # The 1x1 convs run on channels_last images, whose token view is free: the layout changes
        # once on the way in and once on the way out, as around the Linear projections.
        tokens = to_tokens(self.proj_in(h.contiguous(memory_format=torch.channels_last)))
        for block, ctx in zip(self.transformer_blocks, contexts):
            tokens = block(tokens, ctx)
        h = self.proj_out(image_view(tokens, x.shape[2], x.shape[3]))
        return add(h.contiguous(memory_format=memory_format_of(x)), x)  # an add of like layouts is the fast one


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of a feature map (LDM configs without a SpatialTransformer).

    `qkv` and `proj_out` are 1-D convs over the flattened pixels, as in the original checkpoints
    ([3C, C, 1], [C, C, 1]). The legacy channel order of qkv is per head [q_h, k_h, v_h];
    `use_new_attention_order` means [q_all_heads, k_all_heads, v_all_heads].
    x: [B, C, H, W] -> [B, C, H, W].
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
        b, c, height, width = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))  # [B, 3C, L]
        if self.use_new_attention_order:
            q, k, v = qkv.view(b, 3, heads, c // heads, -1).unbind(1)
        else:
            q, k, v = qkv.view(b, heads, 3, c // heads, -1).unbind(2)
        q, k, v = (t.permute(0, 3, 1, 2) for t in (q, k, v))  # [B, H, D, L] -> [B, L, H, D] views
        out = attention(q, k, v).reshape(b, -1, c).transpose(1, 2)  # [B, C, L]
        out = add(self.proj_out(out), x.reshape(b, c, -1)).view(b, c, height, width)
        return out.contiguous(memory_format=memory_format_of(x))
