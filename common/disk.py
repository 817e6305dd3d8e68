"""Writes that fail for want of room or permission, as one-line errors that say what to change.

Libraries report a full disk in their own words: Python raises OSError(ENOSPC), safetensors a
SafetensorError ending "(os error 28)", and torch.save's zip writer a RuntimeError about an
"unexpected pos" or a failed file write, with no errno at all. These helpers read all three.
"""
from __future__ import annotations

import contextlib
import errno
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from common.cli import RunFailed
from common.config import ConfigError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}
# torch.save's zip writer loses the errno; these are its messages for a short write.
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")

MB = 1 << 20


class DiskFull(RunFailed):
    """A write ran out of space; what was written before it is intact."""


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the file system of `folder` (or of its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(folder: str | Path, needed: int, what: str, advice: str) -> None:
    """DiskFull before writing `needed` bytes into `folder` when the file system has less free."""
    free = free_bytes(folder)
    if free < needed:
        raise DiskFull(f"{what} needs about {needed / MB:.1f} MB but {folder} has {free / MB:.1f} MB free; {advice}")


def error_number(e: BaseException) -> int | None:
    """The errno behind an exception from open/write, safetensors or torch.save (None if unknown)."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    text = str(e)
    if isinstance(e, SafetensorError) and (m := re.search(r"os error (\d+)", text)):
        return int(m.group(1))
    if isinstance(e, RuntimeError) and any(s in text for s in _TORCH_SHORT_WRITE):
        return errno.ENOSPC
    return None


@contextlib.contextmanager
def write_errors_explained(what: str, folder: str | Path, advice: str) -> Iterator[None]:
    """Turn a full disk into DiskFull and a refused write into ConfigError, each one line naming `what`."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        number = error_number(e)
        if number in NO_SPACE:
            raise DiskFull(f"{what}: no space left on the device of {folder} "
                           f"({free_bytes(folder) / MB:.1f} MB free); {advice}") from None
        if number in NOT_ALLOWED:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not allowed"
            raise ConfigError(f"{what}: cannot write to {folder} ({reason}); choose a folder you can write to") from None
        raise
