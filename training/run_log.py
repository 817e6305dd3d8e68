"""When a run folder trained, and what it logged, from its TensorBoard event files.

The loop writes one event file per session (a resumed run has several); its name holds the Unix time
the session's loop started, and its last write is when that session stopped logging. Training minutes
count only the work the run's final state is built on; time whose work was thrown away does not count.

Which work was kept is traced back from the last session. A session starts from a step: the checkpoint
`--resume` loaded (the highest step), or 0. The last session's time counts to its last write. Before it, the
run needed the steps up to where that session started (`need`); going back session by session:
  - a session that started at or after `need` did nothing that was kept (it crashed before saving, or
    its checkpoints were never resumed from): it counts 0 minutes, and `need` stays;
  - a session that started below `need` did the steps up to `need`: it counts from its start to the
    moment it reached step `need` (that checkpoint's write, or its scalar at that step), and `need`
    becomes the step it started from.
So a crash before the first checkpoint, several crashes in a row, a restart from scratch over an old
run, and a session whose tail after its last checkpoint was lost all count only what was kept.

Where a session started is read from the run folder, best first:
  1. the highest-step checkpoint written before it started, if its first logged step is above it
     (that is the one `--resume` loaded; pruning removes the lowest steps first, so it is either still
     there or every checkpoint written before the session is gone);
  2. otherwise the highest step an earlier session logged below the session's first logged step
     (scalars are logged every `log_every` steps and checkpoints fall on logged steps in our configs,
     so this is the checkpoint's step; otherwise, or when a killed session had not yet flushed that
     scalar (TensorBoard flushes every 2 minutes), it is earlier: less time is counted, never more),
     or 0 when no earlier session logged that low (a start from scratch);
  3. a session that logged no scalar and had no checkpoint before it: unknown. The session before it
     then counts to its last write (as if nothing was lost), and `training_minutes` says how many
     sessions were counted so.
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


def checkpoint_steps(run_dir: Path) -> dict[int, float]:
    """{step: time written} of the run's checkpoints (their trainer_state.pt, the last file written)."""
    found = {}
    for state in (Path(run_dir) / "checkpoints").glob("step_*/trainer_state.pt"):
        step = state.parent.name[len("step_"):]
        if step.isdigit():
            found[int(step)] = state.stat().st_mtime
    return found


def logged_steps(event_file: Path) -> dict[int, float]:
    """{step: wall time} of the scalars in one event file (the latest time over the tags of a step)."""
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    events.Reload()
    steps: dict[int, float] = {}
    for tag in events.Tags()["scalars"]:
        for e in events.Scalars(tag):
            steps[e.step] = max(e.wall_time, steps.get(e.step, e.wall_time))
    return steps


def session_spans(run_dir: Path) -> tuple[list[tuple[float, float]], int]:
    """(start, end of the work kept) per session, oldest first, by the rule in the module docstring;
    and how many sessions were counted to their last write because the next one's start is unknown."""
    found, saved = sessions(run_dir), checkpoint_steps(run_dir)
    logged = [logged_steps(path) for _, _, path in found]
    starts = [_start_step(i, found[i][0], saved, logged) for i in range(len(found))]
    ends, need, unknown = [0.0] * len(found), None, 0
    for i in reversed(range(len(found))):
        start, last_write, _ = found[i]
        if i == len(found) - 1:
            ends[i] = last_write
        elif need is None:  # where the next session started is unknown: assume nothing was lost
            ends[i] = min(last_write, found[i + 1][0])
            unknown += 1
        elif starts[i] is not None and starts[i] >= need:
            ends[i] = start  # all it did was thrown away
        else:
            ends[i] = _reached(need, start, found[i + 1][0], saved, logged[i])
        if need is None or starts[i] is None or starts[i] < need:
            need = starts[i]
    return [(start, end) for (start, _, _), end in zip(found, ends)], unknown


def _start_step(i: int, start: float, saved: dict[int, float], logged: list[dict[int, float]]) -> int | None:
    """The step session `i` started from (see the module docstring), or None when nothing tells."""
    first = min(logged[i], default=None)
    before = [step for step, written in saved.items() if written < start]
    if before and (first is None or max(before) < first):
        return max(before)
    if first is None:
        return None
    return max((step for steps in logged[:i] for step in steps if step < first), default=0)


def _reached(need: int, start: float, following: float, saved: dict[int, float], logged: dict[int, float]) -> float:
    """When a session (from `start` until `following`) reached step `need`: the time of its checkpoint or
    scalar at the highest step up to `need`; its start when it left no record that far (counts nothing)."""
    known = [(step, t) for step, t in saved.items() if start <= t < following and step <= need]
    known += [(step, t) for step, t in logged.items() if step <= need]
    return max(known)[1] if known else start


def training_minutes(run_dir: Path, times: list[float]) -> tuple[list[float], str]:
    """Minutes of kept training at the Unix times `times`, and how the start was found.

    A time in a session's lost work counts as the end of what it kept. Without event files the run
    folder's config.yaml (written before the model is built) is the start.
    """
    spans, unknown = session_spans(run_dir)
    if spans:
        minutes = []
        for t in times:
            current = max((i for i, (start, _) in enumerate(spans) if start <= t), default=None)
            if current is None:
                raise ValueError(f"{run_dir}: time {t:.0f} is before the run's first tensorboard event file")
            earlier = sum(end - start for start, end in spans[:current])
            start, end = spans[current]
            minutes.append((earlier + (t if current == len(spans) - 1 else min(t, end)) - start) / 60)
        source = f"from the training loop's start ({len(spans)} session(s) in tensorboard/)"
        if unknown:
            source += (f"; {unknown} session(s) counted to their last write: neither a checkpoint nor a "
                       f"scalar tells where the session after them started")
        return minutes, source
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
