"""Text encoders: prompts in, cross-attention context [B, L, D] out.

Every encoder is an `nn.Module` with the same surface:
    tokenize(prompts) -> LongTensor [B, L]       (CPU; fixed L = max_length)
    encode_token_ids(ids) -> Tensor [B, L, D]    (on the module's device)
    forward(prompts) -> Tensor [B, L, D]         (the two above)
    context_dim (D), max_length (L)
The empty prompt "" is the unconditional input for classifier-free guidance.

This file holds the common base and `TransformerTextEncoder`, the trainable encoder this project uses
by default. The pretrained, usually frozen ones (CLIP, OpenCLIP, any Hugging Face encoder) live in
`pretrained_text_encoders.py`.
"""
from __future__ import annotations

import abc
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import CONTEXT_LENGTH, END_OF_TEXT_ID, VOCAB_SIZE, CLIPBPETokenizer


class TextEncoder(nn.Module, abc.ABC):
    """Common base: turns prompts into context and keeps frozen encoders frozen."""

    context_dim: int
    max_length: int

    def __init__(self):
        super().__init__()
        self.frozen = False

    @abc.abstractmethod
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, max_length] (int64, CPU)."""

    @abc.abstractmethod
    def encode_token_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Context [B, L, context_dim] of token ids [B, L] on this module's device."""

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """Context [B, max_length, context_dim] for a list of B prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.encode_token_ids(self.tokenize(prompts).to(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def freeze(self) -> TextEncoder:
        """No gradients and evaluation mode for good: `train()` on a parent leaves this in eval."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        # A frozen encoder must not turn its dropout back on when the diffusion model enters training.
        return super().train(mode and not self.frozen)


class _EncoderBlock(nn.Module):
    """Pre-norm transformer layer: x + attn(LN x), then x + MLP(LN x); bidirectional attention."""

    def __init__(self, dim: int, n_head: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]."""
        b, length, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.n_head, dim // self.n_head).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.resid_dropout(self.attn_out(attn.transpose(1, 2).reshape(b, length, dim)))
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))


class TransformerTextEncoder(TextEncoder):
    """A transformer over CLIP BPE tokens trained jointly with the U-Net (LDM's BERTEmbedder recipe).

    Token and learned position embeddings, `n_layer` pre-norm layers with bidirectional attention,
    a final LayerNorm; every position of the padded sequence is context, as in LDM (no padding mask:
    the padding is the end token by default, which the model learns to read as "nothing more").

    Args:
        n_embed: width D, also `context_dim`.
        n_layer, n_head: depth and attention heads (n_embed must divide by n_head).
        max_length: tokens per prompt including start and end (77 as in CLIP).
        pad_token_id: id after the end token (CLIP end token by default).
        mlp_ratio, dropout: MLP width factor and dropout inside the layers.
    """

    def __init__(self, n_embed: int = 512, n_layer: int = 4, n_head: int = 8, max_length: int = CONTEXT_LENGTH,
                 pad_token_id: int = END_OF_TEXT_ID, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if n_embed <= 0 or n_layer < 0 or n_head <= 0 or n_embed % n_head:
            raise ValueError(f"need n_embed > 0 divisible by n_head > 0 and n_layer >= 0, "
                             f"got n_embed={n_embed}, n_head={n_head}, n_layer={n_layer}")
        self.tokenizer = CLIPBPETokenizer(context_length=max_length, pad_token_id=pad_token_id)
        self.context_dim = n_embed
        self.max_length = max_length
        self.token_embedding = nn.Embedding(VOCAB_SIZE, n_embed)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, n_embed))
        self.layers = nn.ModuleList([_EncoderBlock(n_embed, n_head, mlp_ratio, dropout) for _ in range(n_layer)])
        self.final_norm = nn.LayerNorm(n_embed)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small embeddings and weights (GPT-2/CLIP scale) keep the residual stream near unit norm at the start.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(prompts)

    def encode_token_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L<=max_length] -> context [B, L, n_embed]."""
        if ids.ndim != 2 or ids.shape[1] > self.max_length:
            raise ValueError(f"token ids must be [B, L<={self.max_length}], got {tuple(ids.shape)}")
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)
