"""Mutation testing, module by module, each against only the test files that cover it (`make mutation`).

    python scripts/mutation.py [MODULE ...] [--survivors] [--report] [--fresh] [--jobs N]

The plan (module -> test files) is scripts/mutation.toml; with no MODULE every module in it runs. Each
module gets a work folder .mutation/<module>/ holding a mutmut 3 set-up: links to this checkout's sources,
a pyproject.toml with the [tool.mutmut] section for that module, and mutmut's copy of the sources
(mutants/) with the module's mutants compiled in. The checkout itself is never modified, so other work
can go on in it while mutants run. Results stay in the work folder: a second run only tests mutants
that have no result yet (new or changed functions), plus the not-killed ones again when the module or
one of its test files (or tests/conftest.py, tests/*_helpers.py) changed since the last run.

Score per module: killed / (mutants - equivalent), where timeouts count as killed and "no tests" (a
function none of the module's tests calls) as survived. Every timeout is first run again on its own
under a wall-clock limit (`recheck_timeouts`): only a mutant whose tests still overrun stays a timeout.
Equivalent mutants are listed, each with its changed line and a one-line reason, in
bench/mutation-equivalent.md; an entry whose mutant a test kills,
that is gone, or whose line no longer matches is reported as stale (a listed mutant that timed out stays
equivalent: on a loaded machine a survivor's full test run can overrun mutmut's CPU-time limit).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.cli import ArgumentParser, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "scripts" / "mutation.toml"
WORK = ROOT / ".mutation"
EQUIVALENT = ROOT / "bench" / "mutation-equivalent.md"
# Test files every module's tests may use besides their own: a change in them re-tests the survivors.
SHARED_TEST_FILES = ("tests/conftest.py", "tests/*_helpers.py")
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
TIMEOUT_CODES = {-24, 24, 36, 152, 255}  # mutmut's exit codes for a run stopped by its CPU-time limit
# Wall-clock limit of a timed-out mutant's run on its own: 10x the slowest clean run (training/loop.py's, ~20 s).
RECHECK_SECONDS = 240
# One thread (mutants run one at a time beside other work) and no hub look-ups, for mutmut and the re-checks.
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# A changed line holding backticks is quoted in double backticks (Markdown's way): ``a `b` c``.
ENTRY = re.compile(r"^- `(?P<name>[^`]+__mutmut_\d+)`: (?:``(?P<ticked>.+?)``|`(?P<line>[^`]*)`) (?P<reason>.+)$")


@dataclass
class Plan:
    copy: list[str]
    timeout_multiplier: float
    tests: dict[str, list[str]]  # module path -> test files


@dataclass
class Row:
    module: str
    status: dict[str, str]  # mutant name -> mutmut's status
    equivalent: list[str] = field(default_factory=list)

    @property
    def killed(self) -> int:
        return sum(s in KILLED and n not in self.equivalent for n, s in self.status.items())

    @property
    def not_run(self) -> int:
        return sum(s == "not checked" for s in self.status.values())

    @property
    def not_killed(self) -> list[str]:
        return sorted((n for n, s in self.status.items()
                       if s not in KILLED and s != "not checked" and n not in self.equivalent), key=_natural)

    def score(self) -> float | None:
        """killed / (mutants run - equivalent), in percent."""
        counted = len(self.status) - len(self.equivalent) - self.not_run
        return 100.0 * self.killed / counted if counted else None


def load_plan() -> Plan:
    data = tomllib.loads(PLAN.read_text())
    tests = {module: list(files) for module, files in data["modules"].items()}
    for module, files in tests.items():
        missing = [p for p in [module, *files] if not (ROOT / p).is_file()]
        if missing:
            raise FileNotFoundError(f"{PLAN.relative_to(ROOT)}: {module}: no such file {', '.join(missing)}")
    return Plan(copy=list(data["run"]["copy"]), timeout_multiplier=float(data["run"]["timeout_multiplier"]),
                tests=tests)


def source_roots() -> list[str]:
    """The project's top-level packages and scripts (pyproject's setuptools lists): mutmut copies them all
    so every import in a test resolves to the copy, next to the one mutated module."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = sorted({p.split(".")[0] for p in setuptools["packages"]})
    return packages + [f"{m}.py" for m in setuptools["py-modules"]]


def dotted(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def work_dir(module: str) -> Path:
    return WORK / dotted(module)


def prepare(module: str, plan: Plan) -> Path:
    """The module's mutmut folder: links to the sources and copied folders, and its pyproject.toml."""
    work = work_dir(module)
    work.mkdir(parents=True, exist_ok=True)
    for name in source_roots() + plan.copy:
        parts = Path(module).parts
        _link(work / name, ROOT / name, parts if name == parts[0] else ())
    mutmut = {
        "source_paths": source_roots(),
        "only_mutate": [module],
        "also_copy": plan.copy,
        "pytest_add_cli_args_test_selection": plan.tests[module],
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
        "timeout_multiplier": plan.timeout_multiplier,
        # The work folder is inside this checkout: git's view of changes is the whole repository's.
        "use_git_change_detection": False,
    }
    section = "\n".join(f"{key} = {_toml(value)}" for key, value in mutmut.items())
    text = (ROOT / "pyproject.toml").read_text() + f"\n[tool.mutmut]\n{section}\n"
    if not (work / "pyproject.toml").is_file() or (work / "pyproject.toml").read_text() != text:
        (work / "pyproject.toml").write_text(text)
    _refresh_copies(work, module)
    return work


def _link(target: Path, source: Path, path: tuple[str, ...]) -> None:
    """A link to `source`, except along `path` (the mutated module's path from here): there a folder of
    links, and the module itself as `undecorated` source."""
    if not path:
        if not target.is_symlink():
            target.symlink_to(source)
        return
    if len(path) == 1:
        text = undecorated(source.read_text())
        if target.is_symlink() or not target.is_file() or target.read_text() != text:
            target.unlink(missing_ok=True)
            target.write_text(text)
        return
    if target.is_symlink():
        target.unlink()
    target.mkdir(exist_ok=True)
    for stale in target.iterdir():
        if stale.is_symlink() and not stale.exists():
            stale.unlink()  # its source was deleted
    for entry in source.iterdir():
        if entry.name != "__pycache__":
            _link(target / entry.name, entry, path[1:] if entry.name == path[1] else ())


def undecorated(source: str) -> str:
    """`source` with each decorated function's decorators moved below it as `name = deco(name)`: the same
    program, but mutmut 3 leaves decorated functions unmutated (all samplers are @torch.no_grad()), and
    this way it mutates their bodies too. staticmethod / classmethod alone it handles itself; a property's
    setter or deleter needs the decorator form, so those functions stay as they are."""
    lines = source.splitlines(keepends=True)
    inserts: list[tuple[int, int, str]] = []  # (after line, -indent, text)
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.decorator_list:
            continue
        names = [ast.get_source_segment(source, d) for d in node.decorator_list]
        if names in (["staticmethod"], ["classmethod"]) or any(n.endswith((".setter", ".deleter")) for n in names):
            continue
        for decorator in node.decorator_list:
            for i in range(decorator.lineno - 1, decorator.end_lineno):
                lines[i] = "\n"  # blank, so the function keeps its line numbers
        indent = lines[node.lineno - 1][: len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())]
        wrapped = node.name
        for name in reversed(names):
            wrapped = f"{name}({wrapped})"
        inserts.append((node.end_lineno, -len(indent), f"{indent}{node.name} = {wrapped}\n"))
    for after, _, text in sorted(inserts, reverse=True):  # bottom up; an inner function's line first
        lines.insert(after, text)
    return "".join(lines)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return repr(value) if isinstance(value, float) else f'"{value}"'


def _refresh_copies(work: Path, module: str) -> None:
    """mutmut copies a source file once; later edits of the unmutated files must reach its copy too."""
    copies = work / "mutants"
    if not copies.is_dir():
        return
    for root in source_roots():
        files = [ROOT / root] if root.endswith(".py") else (ROOT / root).rglob("*")
        for source in files:
            rel = source.relative_to(ROOT)
            target = copies / rel
            if (rel.as_posix() == module or not source.is_file() or "__pycache__" in rel.parts
                    or not target.is_file()):
                continue
            if target.read_bytes() != source.read_bytes():
                shutil.copy2(source, target)


def fingerprint(module: str, plan: Plan) -> str:
    """A hash of the module and of the test files its mutants meet."""
    files = [ROOT / module] + [ROOT / p for p in plan.tests[module]]
    files += [f for pattern in SHARED_TEST_FILES for f in sorted(ROOT.glob(pattern))]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def mutmut(work: Path, *args: str, capture: bool = False) -> str:
    env = dict(os.environ, **RUN_ENV)
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "mutmut", *args], cwd=work, env=env,
                          text=True, capture_output=capture)
    if done.returncode != 0:
        raise RuntimeError(f"mutmut {args[0]} failed in {work} (exit {done.returncode})"
                           + (f": {done.stdout[-2000:]}{done.stderr[-2000:]}" if capture else ""))
    return done.stdout if capture else ""


def statuses(work: Path, module: str) -> dict[str, str]:
    """mutant name -> status (killed, survived, no tests, timeout, ...) for the module's mutants."""
    prefix = dotted(module) + "."
    found = {}
    for line in mutmut(work, "results", "--all", "true", capture=True).splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name.startswith(prefix):
            found[name] = status
    return found


def run_module(module: str, plan: Plan, jobs: int) -> None:
    work = prepare(module, plan)
    stamp = work / "tests.sha256"
    current = " ".join([fingerprint(module, plan), *plan.tests[module]])
    before = stamp.read_text().split() if stamp.is_file() else None
    # A changed test list makes mutmut itself start the module over; changed contents need this:
    changed = (before is not None and before[0] != current.split()[0]
               and before[1:] in ([], plan.tests[module]))  # [] : a stamp of an earlier version, hash only
    if changed:
        # mutmut records once which tests call which function; a new function, or a test calling one
        # differently, needs that record again (else its mutants are reported as having no tests).
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    print(f"== {module}: {' '.join(plan.tests[module])}", flush=True)
    mutmut(work, "run", "--max-children", str(jobs))
    if changed:
        again = [n for n, s in statuses(work, module).items() if s not in KILLED]
        if again:
            print(f"   module or tests changed: re-testing {len(again)} mutants that were not killed", flush=True)
            mutmut(work, "run", "--max-children", str(jobs), *again)
    recheck_timeouts(work, module, plan)
    stamp.write_text(current)


def recheck_timeouts(work: Path, module: str, plan: Plan) -> None:
    """Run each mutant that mutmut stopped at its CPU-time limit again on its own, under a wall-clock limit,
    and record what that run says: failing tests a kill, passing tests a survivor, and only a run that
    overruns RECHECK_SECONDS stays a timeout. mutmut's limit also fires on survivors (seen on
    training/checkpoint.py: mutants whose tests pass in 10 s alone were stopped as timeouts), and a
    timeout counts as killed, so an unchecked one could hide a gap in the tests."""
    meta_path = work / "mutants" / f"{module}.meta"
    meta = json.loads(meta_path.read_text())
    codes = meta["exit_code_by_key"]
    timeouts = [name for name, code in codes.items() if code in TIMEOUT_CODES]
    if timeouts:
        print(f"   re-running {len(timeouts)} timed-out mutants alone, {RECHECK_SECONDS} s wall-clock limit each",
              flush=True)
    tests = [sys.executable, "-m", "pytest", *plan.tests[module], "-x", "-q", "-p", "no:cacheprovider"]
    for name in timeouts:
        try:
            done = subprocess.run(tests, cwd=work / "mutants", env=dict(os.environ, **RUN_ENV, MUTANT_UNDER_TEST=name),
                                  capture_output=True, timeout=RECHECK_SECONDS)
        except subprocess.TimeoutExpired:
            continue
        codes[name] = 1 if done.returncode else 0
        meta_path.write_text(json.dumps(meta))  # after each, so that an interrupted re-check keeps what it found


def read_equivalent() -> dict[str, tuple[str, str]]:
    """bench/mutation-equivalent.md: mutant name -> (its changed line, why no test can kill it)."""
    if not EQUIVALENT.is_file():
        return {}
    entries = {}
    for line in EQUIVALENT.read_text().splitlines():
        match = ENTRY.match(line)
        if match:
            entries[match["name"]] = (match["ticked"] or match["line"], match["reason"])
    return entries


def mutated_line(work: Path, name: str) -> str:
    """The first added line of the mutant's diff (mutmut show), stripped: what an equivalence entry quotes."""
    diff = mutmut(work, "show", name, capture=True)
    return next((l[1:].strip() for l in diff.splitlines() if l.startswith("+") and not l.startswith("+++")), "")


def summarise(module: str, work: Path, equivalent: dict[str, tuple[str, str]]) -> tuple[Row, list[str]]:
    """The module's counts, and the equivalence entries for it that no longer hold."""
    status = statuses(work, module)
    row, stale = Row(module, status), []
    for name, (line, _) in equivalent.items():
        if not name.startswith(dotted(module) + "."):
            continue
        if name not in status:
            stale.append(f"{name}: no such mutant (its function changed? review it again)")
        elif status[name] in KILLED - {"timeout"}:  # a timeout of an equivalent mutant is a loaded machine
            stale.append(f"{name}: listed as equivalent but a test kills it")
        elif mutated_line(work, name) != line:
            stale.append(f"{name}: its changed line is now `{mutated_line(work, name)}`, the entry says `{line}`")
        else:
            row.equivalent.append(name)
    return row, stale


def _natural(name: str) -> tuple[str, int]:
    head, _, number = name.rpartition("_")
    return head, int(number) if number.isdigit() else 0


def table(rows: list[Row]) -> str:
    lines = ["| module | mutants | killed | equivalent | not killed | not run | score |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        score = r.score()
        lines.append(f"| {r.module} | {len(r.status)} | {r.killed} | {len(r.equivalent)} | {len(r.not_killed)} "
                     f"| {r.not_run} | {'-' if score is None else f'{score:.1f}%'} |")
    return "\n".join(lines)


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="module paths from scripts/mutation.toml (default: all)")
    parser.add_argument("--report", action="store_true", help="only summarise the stored results, run nothing")
    parser.add_argument("--survivors", action="store_true", help="print each not-killed mutant's diff")
    parser.add_argument("--fresh", action="store_true", help="drop the modules' stored results first")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    args = parser.parse_args()
    plan = load_plan()
    unknown = [m for m in args.modules if m not in plan.tests]
    if unknown:
        raise ValueError(f"not in {PLAN.relative_to(ROOT)}: {', '.join(unknown)} (known: {', '.join(plan.tests)})")
    modules = args.modules or list(plan.tests)
    equivalent = read_equivalent()
    rows, stale = [], []
    for module in modules:
        if args.fresh:
            shutil.rmtree(work_dir(module), ignore_errors=True)
        if args.report and not (work_dir(module) / "mutants").is_dir():
            print(f"{module}: not run yet")
            continue
        if not args.report:
            run_module(module, plan, args.jobs)
        row, module_stale = summarise(module, prepare(module, plan), equivalent)
        rows.append(row)
        stale += module_stale
        if args.survivors:
            for name in row.not_killed:
                print(f"-- {row.status[name]}\n" + mutmut(work_dir(module), "show", name, capture=True), flush=True)
    print(table(rows))
    for line in stale:
        print(f"stale equivalence entry: {line}")


if __name__ == "__main__":
    run(main)
