"""Handing malloc's free heap back to the system (glibc), where a phase of work would otherwise add it to its peak.

torch's CPU tensors come from malloc. glibc serves a block under its mmap threshold from its heap and
keeps it there when freed, for reuse; the threshold follows the largest block freed so far, up to 32
MiB, so after a few U-Net calls every activation of up to 32 MiB lives in the heap, and the heap, with
blocks still in use between its holes, does not shrink. After sampling SD 1.x at 512 px about 0.37 GiB
of free heap stayed resident, and the autoencoder's decode, whose maps grow 4x per level up to 256 MiB,
cannot reuse holes smaller than its next maps: without a trim they add to the decode's peak
(`ldm.pipeline.Pipeline` trims once between a batch's sampling and its decode). `trim_heap`
(malloc_trim(0)) returns the free pages; a hole reused afterwards comes back as fresh pages, which is
why it is not called often: trimming before each of the decoder's stages made the tiny default
model's decode 2.9x slower (95 against 33 ms).

A low fixed mmap threshold instead (MALLOC_MMAP_THRESHOLD_=1048576) would return every large block when
freed, but every U-Net activation would then be a fresh mapping: one SD 1.x U-Net call at 512 px (batch
2, float32) faulted in 5.9 GiB of fresh zeroed pages instead of 40 MiB, at every step.

Elsewhere than glibc (macOS, musl, Windows) `trim_heap` does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["trim_heap"]


def _glibc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl and others have no such function
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()


def trim_heap() -> bool:
    """Give the free pages of malloc's heaps back to the system (glibc's malloc_trim(0)); True when
    anything was given back, False also where there is no malloc_trim."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False
