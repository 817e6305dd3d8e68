"""When a run folder trained, and what it logged, from its TensorBoard event files.

The loop writes one event file per session (a resumed run has several); its name holds the Unix time
the session's loop started, and its last write is when that session stopped logging. A resumed
session restarts from the newest checkpoint, so the work an earlier session did after its last
checkpoint was thrown away: it counts neither in training minutes nor in the logged scalars.
"""
from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def sessions(run_dir: Path) -> list[tuple[float, float, Path]]:
    """(start, last write, event file) of each session, oldest first."""
    found = []
    for path in (Path(run_dir) / "tensorboard").glob("events.out.tfevents.*"):
        created = path.name.split(".")[3]
        if created.isdigit():
            found.append((float(created), path.stat().st_mtime, path))
    return sorted(found)


def checkpoint_times(run_dir: Path) -> list[float]:
    """Modification times of the run's checkpoints (their trainer_state.pt, the last file written)."""
    return sorted(p.stat().st_mtime for p in (Path(run_dir) / "checkpoints").glob("step_*/trainer_state.pt"))


def session_spans(run_dir: Path) -> list[tuple[float, float]]:
    """(start, end of the work kept) per session: an earlier session ends at its last checkpoint before
    the next session began (or, with that checkpoint pruned, at its last write); the last at its last write."""
    found, saved = sessions(run_dir), checkpoint_times(run_dir)
    spans = []
    for i, (start, last_write, _) in enumerate(found):
        if i + 1 < len(found):
            following = found[i + 1][0]
            kept = [t for t in saved if start <= t < following]
            last_write = kept[-1] if kept else min(last_write, following)
        spans.append((start, last_write))
    return spans


def training_minutes(run_dir: Path, times: list[float]) -> tuple[list[float], str]:
    """Minutes of kept training at the Unix times `times`, and how the start was found.

    Without event files the run folder's config.yaml (written before the model is built) is the start.
    """
    spans = session_spans(run_dir)
    if spans:
        minutes = []
        for t in times:
            current = max((i for i, (start, _) in enumerate(spans) if start <= t), default=None)
            if current is None:
                raise ValueError(f"{run_dir}: time {t:.0f} is before the run's first tensorboard event file")
            earlier = sum(end - start for start, end in spans[:current])
            minutes.append((earlier + t - spans[current][0]) / 60)
        return minutes, f"from the training loop's start ({len(spans)} session(s) in tensorboard/)"
    config = Path(run_dir) / "config.yaml"
    if config.is_file():
        start = config.stat().st_mtime
        return [(t - start) / 60 for t in times], "from config.yaml's time (includes model build and latent caching)"
    raise FileNotFoundError(f"{run_dir}: no tensorboard/ event files nor config.yaml to tell when training started")


def read_scalars(run_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """{tag: [(wall time, step, value)]} by step; where sessions overlap (a resume), the later one's value.

    Steps an earlier session logged after its last checkpoint and the later session never reached
    again are kept: the log cannot tell them from steps that count."""
    found = sessions(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard event files in {Path(run_dir) / 'tensorboard'}")
    by_step: dict[str, dict[int, tuple[float, int, float]]] = {}
    for _, _, path in found:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            by_step.setdefault(tag, {}).update((e.step, (e.wall_time, e.step, e.value)) for e in events.Scalars(tag))
    return {tag: [values[s] for s in sorted(values)] for tag, values in by_step.items()}
