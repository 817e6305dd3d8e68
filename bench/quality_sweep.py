"""Quality of a stage-2 model against sampler, steps, guidance and training time (bench/RESULTS.md).

    # FID (and shapes adherence) per sampler and step count at one guidance, then against guidance:
    python bench/quality_sweep.py --checkpoint model.safetensors --data emoji --n 192 --out quality.json

    # FID against training minutes, over the checkpoints of a training run:
    python bench/quality_sweep.py --checkpoints-dir runs/emoji64 --data emoji --n 192 --out training.json

Every setting is scored by `ldm.evaluate.Evaluator` against the same n held-out images, whose
Inception statistics and data floor (n training images vs those held-out ones: what a perfect
model would score at this n) are computed once. The grid is `sampler:steps,...;sampler:...`; the
guidance sweep runs at `--sampler`/`--steps`. "evaluations" counts U-Net calls per image, as
measured: classifier-free guidance batches both halves into one call, Heun makes two per step
except the last (and the first, from pure noise, on a zero-terminal-SNR schedule), PLMS two in its
first step.

Results go to --out as JSON after every setting, and settings already in that file are skipped,
so an interrupted sweep continues where it stopped. Markdown tables go to stdout and beside --out.

Training minutes: the loop saves no clock, so a checkpoint's time is the modification time of its
trainer_state.pt (the last file written into it), counted from the start of the training loop as
its tensorboard event files tell (`training.run_log.training_minutes`: the gaps between the
sessions of a resumed run, and work a session did after its last checkpoint, are left out).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.denoiser import make_timesteps  # noqa: E402
from ldm.evaluate import Evaluator  # noqa: E402
from ldm.latent_diffusion import LatentDiffusion  # noqa: E402
from ldm.samplers import SAMPLERS  # noqa: E402
from metrics.clip_score import DEFAULT_ARCH, DEFAULT_WEIGHTS  # noqa: E402
from common.weights import CheckpointError, file_sha256, load_state_dict_strict, load_weights, write_text_atomic  # noqa: E402
from training.checkpoint import CheckpointDir  # noqa: E402
from common.cli import ArgumentParser, run  # noqa: E402
from training.run_log import training_minutes  # noqa: E402

log = logging.getLogger("quality_sweep")

# About 25 minutes at 1 thread for the default model at n=192 (see `estimate_seconds`).
DEFAULT_GRID = "ddim:10,25,50,100;dpmpp-2m:5,10,15,25;euler:10,25;heun:5,10;plms:10,25;ddpm:50"
DEFAULT_GUIDANCE = "1,2,3,5,7.5"
# Cost model for the plan printed before a sweep, measured at 1 thread on this 2-core CPU with the
# default model (7.2 M-parameter U-Net, 16x16x4 latents): a guided U-Net evaluation costs ~9 ms per
# image (an unguided one half that), Inception features, decoding and judging ~0.18 s per image.
GUIDED_EVALUATION_SECONDS_PER_IMAGE = 0.009
INCEPTION_SECONDS_PER_IMAGE = 0.18
ADHERENCE_COLUMNS = ("num_objects", "background", "shape", "color", "size", "position")

Setting = tuple[str, int, float]  # sampler, steps, guidance


def parse_grid(text: str) -> list[tuple[str, int]]:
    """"ddim:10,25;heun:5" -> [("ddim", 10), ("ddim", 25), ("heun", 5)]; "none" -> []."""
    if text.strip().lower() == "none":
        return []
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        sampler, colon, steps = part.partition(":")
        sampler = sampler.strip()
        if sampler not in SAMPLERS:
            raise ValueError(f"--grid: unknown sampler {sampler!r} in {part!r} (expected one of {', '.join(SAMPLERS)})")
        if not colon or not steps.strip():
            raise ValueError(f"--grid: {part!r} gives no step counts; write {sampler}:10,25")
        for value in steps.split(","):
            if not value.strip().isdigit() or int(value) < 1:
                raise ValueError(f"--grid: step count {value.strip()!r} for {sampler} is not a positive integer")
            if (sampler, int(value)) in pairs:
                raise ValueError(f"--grid: {sampler} with {int(value)} steps is listed twice")
            pairs.append((sampler, int(value)))
    if not pairs:
        raise ValueError(f"--grid {text!r} lists no settings; write e.g. 'ddim:10,25;euler:10' or 'none'")
    return pairs


def parse_guidance(text: str) -> list[float]:
    """"1,2,7.5" -> [1.0, 2.0, 7.5]; "none" -> []."""
    if text.strip().lower() == "none":
        return []
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--guidance {text!r} is not a comma-separated list of numbers") from None
    if not scales:
        raise ValueError(f"--guidance {text!r} lists no scales; write e.g. '1,3,5' or 'none'")
    return scales


def expected_evaluations(sampler: str, steps: int, num_timesteps: int = 1000) -> int:
    """U-Net calls per image the samplers make with their default spacing on a schedule of
    `num_timesteps` (`Evaluator.run` measures them; this plans the cost)."""
    spec = SAMPLERS[sampler]
    if spec.space == "timestep":  # LDM's "uniform" spacing may give more levels than steps
        steps = len(make_timesteps(num_timesteps, steps, spec.default_spacing))
    return spec.evaluations(steps)


def estimate_seconds(settings: list[Setting], n: int, references: bool = True) -> float:
    """Rough single-thread seconds for the settings (the module's cost model), plus the references."""
    sampling = sum(expected_evaluations(s, k) * (1 if g != 1 else 0.5) for s, k, g in settings)
    images = n * (len(settings) + 2 * references)
    return n * sampling * GUIDED_EVALUATION_SECONDS_PER_IMAGE + images * INCEPTION_SECONDS_PER_IMAGE


# -- training checkpoints -------------------------------------------------------------------------

def training_checkpoints(directory: Path) -> tuple[Path, list[tuple[int, Path]]]:
    """(run folder, [(step, checkpoint folder)]) for a run folder or its checkpoints/ folder."""
    root = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    found = [(step, CheckpointDir(root).path(step)) for step in CheckpointDir(root).steps()]
    if not found:
        raise FileNotFoundError(f"--checkpoints-dir {directory}: no step_XXXXXXXX checkpoint folders in {root}")
    return root.parent, found


def load_training_weights(model: LatentDiffusion, folder: Path) -> str:
    """Put a training checkpoint's EMA weights (else its live ones) into `model`; returns which."""
    kind = "ema" if (folder / "ema.safetensors").is_file() else "live"
    if kind == "ema":
        state = load_weights(folder / "ema.safetensors")
    else:
        state = {f"{name}.{k}": v for name in ("unet", "text_encoder") if (folder / f"{name}.safetensors").is_file()
                 for k, v in load_weights(folder / f"{name}.safetensors").items()}
    for prefix, module in (("unet.", model.unet), ("text_encoder.", model.text_encoder)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if prefix == "unet." and not part:
            raise CheckpointError(f"{folder}: no U-Net weights ('unet.*') in its {kind} weights")
        if part:
            load_state_dict_strict(module, part, folder, what=f"the --checkpoint model's {prefix[:-1]}",
                                   file_key=lambda k, prefix=prefix: prefix + k)
    return kind


# -- results file and tables ----------------------------------------------------------------------

def _key(result: dict) -> tuple:
    return result["checkpoint"], result["sampler"], result["steps"], float(result["cfg"]), float(result["eta"])


def load_results(path: Path, identity: dict) -> list[dict]:
    """Results already in `path` for the same sweep (`identity`: model file and its sha256, data, n, seed,
    size, threads, batch size, CLIP on or off), else []; another sweep in the file is an error."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("config") != identity:
        raise ValueError(f"--out {path} holds a sweep of another configuration ({saved.get('config')}); "
                         f"pass another --out or delete it")
    return saved.get("results", [])


def write_results(path: Path, identity: dict, results: list[dict]) -> None:
    floor = next((r["fid_data_floor"] for r in results), None)
    write_text_atomic(path, json.dumps({"config": identity, "fid_data_floor": floor, "results": results}, indent=2)
                      + "\n")


def markdown_table(first_columns: list[str], rows: list[tuple[list[str], dict]]) -> str:
    """Rows of (leading cells, result dict) -> a markdown table with FID, adherence, CLIP and seconds."""
    shapes = any(r["shapes"] for _, r in rows)
    clip = any(r["clip_score"] is not None for _, r in rows)
    header = [*first_columns, "FID"]
    header += [*ADHERENCE_COLUMNS, "all correct"] if shapes else []
    header += ["CLIP score"] if clip else []
    header += ["sampling CPU s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells, r in rows:
        cells = [*cells, f"{r['fid']:.2f}"]
        if shapes:
            cells += [f"{100 * r['shapes'][k]:.1f}%" for k in (*ADHERENCE_COLUMNS, "all_attributes")]
        cells += [f"{r['clip_score']:.2f}"] if clip else []
        cells += [f"{r['seconds']['sampling_cpu']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the sweep ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="model.safetensors to sweep; with --checkpoints-dir the "
                                                        "architecture (default: the run folder's model.safetensors)")
    parser.add_argument("--checkpoints-dir", type=Path,
                        help="a training run folder (or its checkpoints/): FID against training minutes instead")
    parser.add_argument("--data", required=True, help="shapes, emoji, fashion-mnist, or a folder / shard pattern")
    parser.add_argument("--train-data", help="training images for the data floor, when not --data's train split")
    parser.add_argument("--n", type=int, default=192, help="images per set (default 192)")
    parser.add_argument("--grid", default=DEFAULT_GRID, help=f"sampler:steps,...;... or none (default {DEFAULT_GRID})")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the grid (default 3)")
    parser.add_argument("--guidance", default=DEFAULT_GUIDANCE,
                        help=f"guidance scales to sweep at --sampler/--steps, or none (default {DEFAULT_GUIDANCE})")
    parser.add_argument("--sampler", default="dpmpp-2m", choices=sorted(SAMPLERS),
                        help="sampler of the guidance sweep and of the training curve")
    parser.add_argument("--steps", type=int, default=15, help="steps of the guidance sweep and of the training curve")
    parser.add_argument("--max-checkpoints", type=int, help="evaluate at most this many checkpoints, evenly spaced "
                                                            "(the last always included)")
    parser.add_argument("--size", type=int, help="image size (default: the model's training size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the numbers are quoted)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    parser.add_argument("--dry-run", action="store_true", help="print the settings and a time estimate, then stop")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (tables go beside it as .md)")
    return parser


def _select(items: list, count: int | None) -> list:
    if count is None or count >= len(items):
        return items
    if count < 1:
        raise ValueError(f"--max-checkpoints must be positive, got {count}")
    if count == 1:
        return items[-1:]
    picks = {round(i * (len(items) - 1) / max(count - 1, 1)) for i in range(count)} | {len(items) - 1}
    return [items[i] for i in sorted(picks)]


def plan(args: argparse.Namespace) -> tuple[Path, list[tuple[Setting, str, Path | None]]]:
    """(model file, [(setting, name of the weights, training checkpoint folder or None)]) of a sweep."""
    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    if args.checkpoints_dir is not None:
        run_dir, found = training_checkpoints(args.checkpoints_dir)
        checkpoint = args.checkpoint or run_dir / "model.safetensors"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint} not found: --checkpoints-dir needs a model file of the run's "
                                    f"architecture (the run writes model.safetensors when it ends); pass --checkpoint")
        setting = (args.sampler, args.steps, args.cfg)
        return checkpoint, [(setting, str(folder), folder) for _, folder in _select(found, args.max_checkpoints)]
    if args.checkpoint is None:
        raise ValueError("give --checkpoint (a model to sweep) or --checkpoints-dir (a training run)")
    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    grid = [(s, k, args.cfg) for s, k in parse_grid(args.grid)]
    guidance = [(args.sampler, args.steps, g) for g in parse_guidance(args.guidance)]
    settings = dict.fromkeys(grid + guidance)  # a guidance point on the grid runs once
    if not settings:
        raise ValueError("--grid none and --guidance none leave nothing to sweep")
    return args.checkpoint, [(setting, str(args.checkpoint), None) for setting in settings]


def tables(args: argparse.Namespace, evaluator: Evaluator, done: dict, checkpoint: Path,
           folders: list[Path]) -> str:
    """The sweep's markdown: a header line, then one table per sweep."""
    floor = next(iter(done.values()))["fid_data_floor"]  # not evaluator.data_floor(): a resumed sweep has it
    floor_text = f"data floor {floor:.2f}" if floor is not None else "no data floor"
    header = (f"FID against the n={evaluator.n} held-out images of `{args.data}` ({floor_text}: n training "
              f"images against the same held-out ones); seed {args.seed}; "
              f"sampling CPU seconds for all n images at {args.threads} thread(s).")
    parts = [header]
    if folders:
        picked = {str(f) for f in folders}
        rows = sorted((r for r in done.values() if r["checkpoint"] in picked), key=lambda r: r["step"])
        parts.append(f"Against training time ({args.sampler}, {args.steps} steps, guidance {args.cfg:g}; "
                     f"{rows[0]['weights']} weights; minutes {rows[0]['minutes_source']}):\n\n"
                     + markdown_table(["step", "minutes"], [([str(r["step"]), f"{r['minutes']:.1f}"], r)
                                                            for r in rows]))
        return "\n\n".join(parts) + "\n"

    def result(sampler: str, steps: int, g: float) -> dict:
        return done[(str(checkpoint), sampler, steps, float(g), 0.0)]

    grid = parse_grid(args.grid)
    if grid:
        rows = [([s, str(k), str(result(s, k, args.cfg)["model_evaluations"])], result(s, k, args.cfg))
                for s, k in grid]
        parts.append(f"Against sampler and steps (guidance {args.cfg:g}):\n\n"
                     + markdown_table(["sampler", "steps", "evaluations"], rows))
    scales = parse_guidance(args.guidance)
    if scales:
        rows = [([f"{g:g}", str(result(args.sampler, args.steps, g)["model_evaluations"])],
                 result(args.sampler, args.steps, g)) for g in scales]
        parts.append(f"Against guidance ({args.sampler}, {args.steps} steps):\n\n"
                     + markdown_table(["guidance", "evaluations"], rows))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out.suffix == ".md":
        raise ValueError(f"--out {args.out}: give the results file a .json name; the tables go beside it as .md")
    checkpoint, runs = plan(args)
    settings = [setting for setting, _, _ in runs]
    folders = [folder for _, _, folder in runs if folder is not None]
    if folders:  # before any generation, so that a run folder without a clock fails at once
        times, clock = training_minutes(folders[0].parent.parent,
                                        [(f / "trainer_state.pt").stat().st_mtime for f in folders])
        minutes = dict(zip(folders, times))
    log.info("%d settings, %d U-Net evaluations per image; roughly %.0f min at 1 thread on this CPU",
             len(settings), sum(expected_evaluations(s, k) for s, k, _ in settings),
             estimate_seconds(settings, args.n) / 60)
    if args.dry_run:
        for (sampler, steps, g), name, _ in runs:
            print(f"{name}: {sampler}, {steps} steps, guidance {g:g}: {expected_evaluations(sampler, steps)} "
                  f"evaluations per image")
        return {}

    model = LatentDiffusion.load(checkpoint, device=args.device)
    evaluator = Evaluator(model, args.data, n=args.n, batch_size=args.batch_size, seed=args.seed,
                          device=args.device, size=args.size, train_data=args.train_data,
                          clip=None if args.no_clip else (DEFAULT_ARCH, DEFAULT_WEIGHTS), checkpoint=str(checkpoint))
    identity = {"checkpoint": str(args.checkpoints_dir or checkpoint), "sha256": file_sha256(checkpoint)[:12],
                "data": args.data, "train_data": args.train_data or args.data, "n": evaluator.n, "seed": args.seed,
                "size": evaluator.size, "threads": args.threads, "batch_size": args.batch_size,
                "clip": not args.no_clip}
    results = load_results(args.out, identity)
    done = {_key(r): r for r in results}
    if done:
        log.info("%s: %d settings already done, skipping them", args.out, len(done))

    started, estimated_done = time.time(), 0.0
    for index, ((sampler, steps, g), name, folder) in enumerate(runs):
        if (name, sampler, steps, float(g), 0.0) in done:
            continue
        if folder is not None:
            weights = load_training_weights(model, folder)
            evaluator.set_model(model, checkpoint=name)
        result = evaluator.run(sampler, steps, g)
        if folder is not None:
            result.update(step=int(folder.name[len("step_"):]), minutes=round(minutes[folder], 2), minutes_source=clock,
                          weights=weights)
        results.append(result)
        done[_key(result)] = result
        write_results(args.out, identity, results)
        # Remaining time: the cost model, rescaled by how it has done on this machine so far.
        estimated_done += estimate_seconds([(sampler, steps, g)], evaluator.n, references=not estimated_done)
        remaining = [s for s, label, _ in runs[index + 1:] if (label, *s[:2], float(s[2]), 0.0) not in done]
        eta = estimate_seconds(remaining, evaluator.n, references=False) * (time.time() - started) / estimated_done
        log.info("setting %d/%d: %s, %d steps, guidance %g: FID %.2f (%.0f s); %.1f min so far, about %.0f min to go",
                 index + 1, len(runs), sampler, steps, g, result["fid"], result["seconds"]["total"],
                 (time.time() - started) / 60, eta / 60)

    text = tables(args, evaluator, done, checkpoint, folders)
    print(text)
    write_text_atomic(args.out.with_suffix(".md"), text)
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".md"))
    return {"config": identity, "results": results}


if __name__ == "__main__":
    run(main)
