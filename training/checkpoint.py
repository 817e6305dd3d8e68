"""A training run's checkpoint folder: one complete `step_XXXXXXXX/` folder per saved step."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common.weights import shared_mode


class CheckpointDir:
    """`<run>/checkpoints/step_XXXXXXXX/` folders, each complete or absent; keeps the last `keep`."""

    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

    def steps(self) -> list[int]:
        """The steps with a complete folder, in increasing order."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and (d / "trainer_state.pt").is_file():
                found.append(int(d.name[len("step_"):]))
        return sorted(found)

    def latest(self) -> Path | None:
        """The folder of the last complete step, or None."""
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def path(self, step: int) -> Path:
        """Where `step`'s folder is (or would be)."""
        return self.root / f"step_{step:08d}"

    def write(self, step: int, fill) -> Path:
        """Call `fill(folder)` on a temporary folder, then rename it to step_XXXXXXXX and prune old ones."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".step_{step:08d}."))
        try:
            fill(tmp)
            os.chmod(tmp, shared_mode(directory=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final
