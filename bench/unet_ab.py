"""U-Net forward of this tree against another git revision's, in ONE process with the same weights.

The other revision's packages are extracted (`git archive`) into a temporary folder under renamed
package names (`ldm` -> `base_ldm`, ...), so both versions import side by side. Both U-Nets are
built from the same `bench/unet_speed.py` config and load the same state dict; calls alternate,
and the figure is the median of paired base/ours time ratios (above 1: ours is faster). Outputs
are compared too. Machine drift between processes cancels, which separate runs cannot promise.

    HF_HUB_OFFLINE=1 python bench/unet_ab.py --base b79bfc8 --configs tiny small --threads 1
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from unet_speed import CONFIGS  # noqa: E402

from ldm.unet import UNetModel  # noqa: E402

PACKAGES = ("layers", "common", "ldm", "autoencoder", "conditioning", "data", "metrics", "training")


def import_base_unet(revision: str, folder: Path) -> type:
    """`UNetModel` of `revision`, its packages renamed `base_<name>` inside `folder`."""
    archive = folder / "base.tar"
    present = [p for p in PACKAGES if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{revision}:{p}"],
                                                     capture_output=True).returncode == 0]
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), revision, *present], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "src", filter="data")
    pattern = re.compile(rf"\b(from|import) ({'|'.join(present)})\b")
    for package in present:
        for source in (folder / "src" / package).rglob("*.py"):
            target = folder / f"base_{package}" / source.relative_to(folder / "src" / package)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(pattern.sub(r"\1 base_\2", source.read_text()))
    sys.path.insert(0, str(folder))
    from base_ldm.unet import UNetModel as BaseUNet
    return BaseUNet


def compare(name: str, base_cls: type, rounds: int, clock) -> str:
    params, batch, size, context_len = CONFIGS[name]
    torch.manual_seed(0)
    ours, base = UNetModel(**params).eval(), base_cls(**params).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)  # random everywhere, zero-init layers too
    base.load_state_dict(ours.state_dict())
    x = torch.randn(batch, params["in_channels"], size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, context_len, params["context_dim"], generator=generator)
    times: dict[str, list[float]] = {"base": [], "ours": []}
    with torch.inference_mode():
        outputs = {"base": base(x, t, context), "ours": ours(x, t, context)}  # warm-up
        for _ in range(rounds):
            for side, model in (("base", base), ("ours", ours)):
                start = clock()
                model(x, t, context)
                times[side].append(clock() - start)
    ratio = statistics.median(b / o for b, o in zip(times["base"], times["ours"]))
    diff = (outputs["base"] - outputs["ours"]).abs().max().item()
    return (f"| {name} | {statistics.median(times['base']) * 1e3:.1f} ms | {statistics.median(times['ours']) * 1e3:.1f} ms "
            f"| {ratio:.3f} | {len(times['ours'])} | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. a commit)")
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, help="timed pairs (default 24 at tiny, 6 otherwise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random weights make denormals; see speed_vs_diffusers.py
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"base {args.base}, {args.threads} thread(s), {'CPU' if args.threads == 1 else 'wall'} time")
    print("| config | base | ours | base/ours (median of pairs) | pairs | max abs diff |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        base_cls = import_base_unet(args.base, Path(folder))
        for name in args.configs:
            rounds = args.rounds or (24 if name == "tiny" else 6)
            print(compare(name, base_cls, rounds, clock), flush=True)


if __name__ == "__main__":
    main()
