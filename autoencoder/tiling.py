"""Decoding latents in overlapping tiles (generate.py --vae-tiling), so that the decoder's memory follows the
tile, not the image: an image too large to decode whole still decodes.

The latents are cut into tiles of `tile` x `tile` latent pixels, `overlap` of them shared with each
neighbour (the last tile of a row or column starts `tile` before the end, so it may share more); each is
decoded alone, and the decoded tiles are blended: every pixel is the weighted mean of the tiles covering
it, a tile's weight ramping up linearly across the `overlap` band at each side where it has a neighbour
(1 elsewhere, and never 0), so no seam is a hard cut. A decoder that maps each latent pixel to its own
block of pixels gives the whole decode exactly; a real one differs, as diffusers' `enable_vae_tiling`
does: a tile's convolutions see zero padding in place of its neighbour, and its GroupNorms the tile's
statistics only, which differ the more from the image's the smaller the tile. The shipped default
model's 256-pixel images (tests/test_vae_tiling.py) decode in 192-pixel tiles at a PSNR of 34-46 dB
against the whole decode, in 128-pixel ones at 31-43 dB, in 64-pixel ones at 24-34 dB.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["VAE_TILE", "decode_tiled", "tile_starts"]

# generate.py --vae-tiling's tile side in pixels: diffusers' for SD's autoencoder (`tile_sample_min_size`),
# whose decode at this size fits a consumer GPU; images up to it decode whole.
VAE_TILE = 512


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles of one side start: every `tile - overlap`, the last one ending at `size` (a single
    tile at 0 when the side fits in one)."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def _blend_weights(length: int, band: int, before: bool, after: bool) -> Tensor:
    """A tile's weights [length] along one side: rising over the first `band` pixels when a tile comes
    before it, falling over the last `band` when one comes after, 1 elsewhere; all positive."""
    weights = torch.ones(length)
    rise = (torch.arange(band) + 0.5) / band
    if before:
        weights[:band] = rise
    if after:
        weights[length - band:] = torch.minimum(weights[length - band:], rise.flip(0))
    return weights


def decode_tiled(decode: Callable[[Tensor], Tensor], z: Tensor, tile: int, overlap: int, factor: int) -> Tensor:
    """`decode(z)` computed tile by tile (module doc). z: latents [B, C, h, w]; decode: latents
    [B, C, th, tw] -> images [B, 3, th * factor, tw * factor]; tile: the tiles' side in latent pixels,
    overlap (< tile): the band neighbours share. Returns [B, 3, h * factor, w * factor] in decode's dtype.
    Latents that fit in one tile are decoded whole, as `decode(z)`."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must lie in [0, tile), got overlap {overlap} for tile {tile}")
    height, width = z.shape[2:]
    if height <= tile and width <= tile:
        return decode(z)
    rows, columns = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = total = None
    band = overlap * factor
    for r, top in enumerate(rows):
        for c, left in enumerate(columns):
            piece = decode(z[:, :, top:top + tile, left:left + tile]).float()
            if out is None:
                out = piece.new_zeros(piece.shape[0], piece.shape[1], height * factor, width * factor)
                total = piece.new_zeros(height * factor, width * factor)
            th, tw = piece.shape[2:]
            weights = (_blend_weights(th, band, r > 0, r < len(rows) - 1)[:, None]
                       * _blend_weights(tw, band, c > 0, c < len(columns) - 1)[None]).to(piece.device)
            y, x = top * factor, left * factor
            out[:, :, y:y + th, x:x + tw] += piece * weights
            total[y:y + th, x:x + tw] += weights
    return (out / total).to(piece.dtype)
