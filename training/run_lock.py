"""One writer per run folder: an OS lock that a second trainer on the same `output_dir` cannot take.

The lock is `flock` on `<output_dir>/.run.lock`, so the kernel releases it when its process ends
in any way (exit, crash, kill -9): a lock left by a dead process is never mistaken for a live one.
The file also names its holder (pid, host, start time) for the message a second trainer prints.
The file is never deleted: unlinking a lock file races with a process that has just opened it.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

from common.config import ConfigError

LOCK_NAME = ".run.lock"

_held: dict[Path, int] = {}  # folder -> open descriptor holding its lock, for this process's lifetime


class RunLocked(ConfigError):
    """Another live process trains into the same output folder."""


def lock_run_folder(folder: str | Path) -> Path:
    """Take `folder`'s run lock for the rest of this process (creating the folder); return the lock file.

    Taking it again in the same process is a no-op. Raises RunLocked naming the holder when another
    process has it, and ConfigError when the folder cannot be written.
    """
    folder = Path(folder).resolve()
    if folder in _held:
        return folder / LOCK_NAME
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write to the output folder {folder}: {e.strerror}; "
                          f"choose another train.output_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunLocked(f"{folder} is in use by {holder}: wait for that run to end, or choose another "
                        f"train.output_dir") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record = f"pid {os.getpid()} on {socket.gethostname()} (since {started})".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    _held[folder] = fd
    return path


def release_run_folder(folder: str | Path) -> None:
    """Give up `folder`'s lock before this process ends (tests; a process exit releases it anyway)."""
    fd = _held.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file releases the flock
