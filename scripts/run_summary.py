"""A training run's log as a short markdown summary: steps, training time, throughput, and each logged
loss averaged over windows of the run (read from its TensorBoard scalars, see training/run_log.py).

    python scripts/run_summary.py runs/default/stage2 [--windows 6] [--keys loss,mse]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.cli import ArgumentParser, run  # noqa: E402
from training.run_log import read_scalars, training_minutes  # noqa: E402


def summary(run_dir: Path, windows: int = 6, keys: list[str] | None = None) -> str:
    """Markdown: one line of totals, then a table of window means (steps in the first column)."""
    scalars = read_scalars(run_dir)
    keys = keys or [k for k in scalars if k != "samples_per_second" and not k.startswith("lr")]
    missing = [k for k in keys if k not in scalars]
    if missing:
        raise ValueError(f"{run_dir}: no scalars {missing}; logged: {', '.join(sorted(scalars))}")
    steps = [s for _, s, _ in scalars[keys[0]]]
    [minutes], _ = training_minutes(run_dir, [scalars[keys[0]][-1][0]])
    rate = scalars.get("samples_per_second", [])
    lines = [f"{run_dir}: {steps[-1]} steps in {minutes:.1f} min of training"
             + (f"; median {sorted(v for *_, v in rate)[len(rate) // 2]:.1f} samples/s" if rate else ""), "",
             "| steps | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    bounds = [round(i * steps[-1] / windows) for i in range(windows + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        cells = []
        for key in keys:
            values = [v for _, s, v in scalars[key] if lo < s <= hi]
            cells.append(f"{sum(values) / len(values):.4g}" if values else "-")
        lines.append(f"| {lo + 1}-{hi} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--windows", type=int, default=6, help="how many step ranges to average over")
    parser.add_argument("--keys", help="comma-separated scalar tags (default: all but throughput and lr)")
    args = parser.parse_args()
    if args.windows < 1:
        raise ValueError(f"--windows must be positive, got {args.windows}")
    print(summary(args.run_dir, args.windows, args.keys.split(",") if args.keys else None))


if __name__ == "__main__":
    run(main)
