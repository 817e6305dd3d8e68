"""The package graph points one way: layers/common -> models -> training -> command-line scripts.

Every `.py` file of the packages is parsed (not imported), so the test sees each import statement,
including ones in functions, and needs none of the packages' dependencies.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"autoencoder", "ldm", "conditioning", "data", "metrics"}

# Which project packages each package may import (besides itself).
ALLOWED = {
    "common": set(),
    "layers": set(),
    "conditioning": {"common", "layers"},
    "data": {"common", "layers", "conditioning"},  # condition images (canny) are made with the data
    "metrics": {"common", "layers", "conditioning", "data"},
    "autoencoder": {"common", "layers", "data", "metrics"},  # data and metrics: its evaluate CLI
    "ldm": {"common", "layers", "autoencoder", "conditioning", "data", "metrics"},
    "training": {"common", "layers"} | MODELS,
}
PACKAGES = sorted(ALLOWED)

# Imports that may stay inside a function: optional or heavy dependencies loaded only when used.
LAZY_IMPORTS = {
    "transformers": "Hugging Face text encoders only; seconds to import",
    "open_clip": "OpenCLIP text encoder and CLIP score only",
    "huggingface_hub": "downloads CLIP-score weights only when asked to",
    "ftfy": "optional text clean-up of the CLIP tokenizer",
    "lpips": "perceptual loss only when its weight is non-zero (imports torchvision's model zoo)",
    "scipy": "FID's reference sqrtm only",
    "peft": "LoRA training only (training.lora); imports transformers, seconds",
    **dict.fromkeys(("data.folder", "data.webdataset_source", "data.emoji", "data.shapes", "data.fashion_mnist"),
                    "build_dataset imports the chosen source only, so the others' dependencies stay unloaded"),
}


def _package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def _top_level_modules() -> set[str]:
    """The scripts beside the packages (train_*.py, generate.py, demo.py): never imported by a package."""
    return {p.stem for p in ROOT.glob("*.py")}


def _imported_modules(node: ast.AST, file: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module]
    package = ".".join(file.relative_to(ROOT).with_suffix("").parts[:-node.level])  # relative import
    return [f"{package}.{node.module}" if node.module else package]


def _imports(file: Path) -> list[tuple[str, bool, bool]]:
    """(module, inside a function, guarded by `except ImportError`) for each import in `file`."""
    found = []

    def visit(node: ast.AST, in_function: bool, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((m, in_function, guarded) for m in _imported_modules(child, file))
            child_in_function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            child_guarded = guarded or (isinstance(child, ast.Try) and any(_catches_import_error(h)
                                                                           for h in child.handlers))
            visit(child, child_in_function, child_guarded)

    visit(ast.parse(file.read_text(), str(file)), False, False)
    return found


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def _lazy_allowed(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") and "." not in name for name in LAZY_IMPORTS)


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_lies_below_them(package):
    scripts = _top_level_modules()
    wrong = []
    for file in _package_files(package):
        for module, _, _ in _imports(file):
            top = module.split(".")[0]
            if top in scripts:
                wrong.append(f"{file.relative_to(ROOT)} imports the script {module}")
            elif top in ALLOWED and top != package and top not in ALLOWED[package]:
                wrong.append(f"{file.relative_to(ROOT)} imports {module}")
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}:\n" + "\n".join(wrong)


def test_no_package_imports_inside_functions_but_optional_dependencies():
    wrong = []
    for package in PACKAGES:
        for file in _package_files(package):
            where = file.relative_to(ROOT).as_posix()
            for module, in_function, guarded in _imports(file):
                if in_function and not guarded and not _lazy_allowed(module):
                    wrong.append(f"{where}: {module}")
    assert not wrong, "imports inside functions (move them to the top of the module):\n" + "\n".join(wrong)


def test_the_checker_sees_relative_guarded_and_nested_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "ldm").mkdir()
    file = tmp_path / "ldm" / "x.py"
    file.write_text("from .unet import A\nimport torch\n\ndef f():\n    try:\n        import xformers\n"
                    "    except ImportError:\n        pass\n    from training.loop import train\n")
    assert _imports(file) == [("ldm.unet", False, False), ("torch", False, False), ("xformers", True, True),
                              ("training.loop", True, False)]
    assert _lazy_allowed("open_clip.pretrained") and _lazy_allowed("data.emoji") and not _lazy_allowed("data")
