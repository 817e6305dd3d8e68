"""Images with captions from a directory tree.

Captions come from, in order of precedence:
  * `metadata.jsonl` files (Hugging Face imagefolder convention: one JSON object per line with
    "file_name" and "text"; "image" / "caption" are accepted too), anywhere in the tree, with
    file names relative to the metadata file's directory;
  * `metadata.csv` files with the same columns;
  * a sidecar `<image stem>.txt` next to an image.
`path` may also be a single .jsonl or .csv file, which then lists the images. When the directory
has a `train/` or `test/` subfolder, `split` picks it.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

from PIL import Image

from data.config import DataConfig
from data.keyed import KeyedImageDataset, RawSample

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILE_COLUMNS = ("file_name", "image", "file")
TEXT_COLUMNS = ("text", "caption")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


def read_metadata(path: Path) -> dict[str, str]:
    """{absolute image path: caption} from one .jsonl or .csv metadata file."""
    if path.suffix.lower() == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON: {error}") from None
    elif path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as table:
            rows = list(csv.DictReader(table))
    else:
        raise ValueError(f"caption metadata must be a .jsonl or .csv file, got {path}")
    captions = {}
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {number} is not an object with file_name and text")
        file_key = next((k for k in FILE_COLUMNS if k in row), None)
        text_key = next((k for k in TEXT_COLUMNS if k in row), None)
        if file_key is None or text_key is None:
            raise ValueError(
                f"{path}: row {number} needs a file column ({'/'.join(FILE_COLUMNS)}) and a caption column "
                f"({'/'.join(TEXT_COLUMNS)}); it has {sorted(row)}"
            )
        captions[os.path.normpath(path.parent / str(row[file_key]))] = str(row[text_key] or "").strip()
    return captions


class FolderDataset(KeyedImageDataset):
    """Every image under `cfg.path` (recursively), sorted by path, with its caption.

    Split "train" / "test" takes the `train/` / `test/` subfolder when there is one; without a
    `train/` subfolder, the train split is everything but `test/`.
    """

    def __init__(self, cfg: DataConfig):
        root = Path(cfg.path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data.path {root} does not exist")
        if root.is_file():
            self.images, self.captions, self.sidecars = self._scan_metadata_file(root)
        else:
            skip = None
            if (root / cfg.split).is_dir():
                root = root / cfg.split
            elif cfg.split == "test":
                raise FileNotFoundError(f"split 'test' asks for a test/ subfolder, and {root} has none")
            elif (root / "test").is_dir():
                skip = root / "test"  # train = everything but the held-out images
            self.images, self.captions, self.sidecars = self._scan_directory(root, skip)
        super().__init__(cfg, where=str(root))
        if not self.images:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
        uncaptioned = sum(1 for p in self.images if p not in self.captions and p not in self.sidecars)
        if uncaptioned:
            log.warning(
                "%d of %d images under %s have no caption (no metadata entry, no .txt sidecar); "
                "they get the empty caption",
                uncaptioned, len(self.images), root,
            )

    @staticmethod
    def _scan_directory(root: Path, skip: Path | None = None) -> tuple[list[str], dict[str, str], set[str]]:
        images, texts, metadata = [], set(), []
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if skip is None or Path(directory, d) != skip)
            for name in files:
                path = os.path.normpath(os.path.join(directory, name))
                lower = name.lower()
                if lower.endswith(IMAGE_SUFFIXES):
                    images.append(path)
                elif lower.endswith(".txt"):
                    texts.add(path)
                elif lower in METADATA_NAMES:
                    metadata.append(Path(path))
        captions: dict[str, str] = {}
        # csv before jsonl so that jsonl wins where both describe an image
        for meta in sorted(metadata, key=lambda p: (p.suffix != ".csv", str(p))):
            captions.update(read_metadata(meta))
        images.sort()
        sidecars = {p for p in images if os.path.splitext(p)[0] + ".txt" in texts}
        return images, captions, sidecars

    @staticmethod
    def _scan_metadata_file(path: Path) -> tuple[list[str], dict[str, str], set[str]]:
        captions = read_metadata(path)
        images = sorted(p for p in captions if os.path.isfile(p))
        missing = len(captions) - len(images)
        if missing:
            log.warning("%d of %d images listed in %s do not exist; they are left out", missing, len(captions), path)
        return images, captions, set()

    def num_samples(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return self.images[index]

    def content_key(self, index: int) -> str:
        path = self.images[index]
        stat = os.stat(path)
        if path in self.captions:
            caption = self.captions[path]
        elif path in self.sidecars:  # read at load time: its file's time stands for its text
            caption = f"sidecar {os.stat(os.path.splitext(path)[0] + '.txt').st_mtime_ns}"
        else:
            caption = ""
        return f"{path} {stat.st_size} {stat.st_mtime_ns} {caption}"

    def load(self, index: int) -> RawSample:
        path = self.images[index]
        caption = self.captions.get(path)
        if caption is None and path in self.sidecars:
            with open(os.path.splitext(path)[0] + ".txt", encoding="utf-8") as sidecar:
                caption = sidecar.read().strip()
        with Image.open(path) as file:
            image = file.convert("RGB")
        return RawSample(image=image, caption=caption or "")
