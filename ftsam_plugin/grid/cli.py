"""`ftsam grid GRID.yaml`: run every cell of a grid that is not done; `--status` lists each cell's state.

    ftsam grid grid.yaml                               # here, 1 process (--workers N --threads T)
    ftsam grid grid.yaml --executor slurm --time 240 --gpus_per_task 1 --partition gpu --array_parallelism 16
    ftsam grid grid.yaml --status                      # done / running / queued / interrupted / failed / pending
    ftsam grid grid.yaml --retry_failed                # failed cells too
    ftsam leaderboard record/                          # the results

A run takes each cell that is pending or interrupted (and failed with --retry_failed): it locks the cell (a cell
already locked by a live run, queued or running, is left alone and named), submits them all, and for the slurm
executor returns (--wait watches until they end). Running it again is always safe: done cells are skipped,
interrupted ones resume from their checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from typing import Dict

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.settings import Number, quote

__all__ = ["add_arguments", "run"]

EXECUTOR_FLAGS = ("executor", "workers", "threads", "partition", "time", "cpus_per_task", "gpus_per_task", "mem_gb",
                  "array_parallelism", "sbatch", "job_name")
POSITIVE = Number(integer=True, low=1)
WAIT_POLL_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .executors import DEFAULT_EXECUTOR, EXECUTORS

    add = parser.add_argument
    add("grid", help="the grid file (YAML: records, seeds, common, defenses, executor; see docs/cluster.md)")
    add("--status", action="store_true", help="list each cell's state and exit (runs nothing)")
    add("--retry_failed", action="store_true", help="also run the cells that failed")
    add("--wait", action="store_true", help="slurm: after submitting, watch until every submitted cell ends")
    add("--only", action="append", metavar="PATTERN",
        help="only the cells whose label (RECORD/CELL, as --status lists them) matches this shell pattern, e.g. "
             "'*_lf_e15/ft_e100_s*'; repeatable (a cell matching any is kept)")
    add("--workdir", help="submitit's logs and the cells' record views (default: <grid>.grid/ beside the file)")
    group = parser.add_argument_group("executor (each also `executor:` in the grid file; a flag wins)")
    group.add_argument("--executor", choices=sorted(EXECUTORS),
                       help=f"slurm (one job array), local (processes on this machine) or debug (in process); "
                            f"default {DEFAULT_EXECUTOR}")
    group.add_argument("--workers", type=int, help="local: cells run at once (default 1)")
    group.add_argument("--threads", type=int, help="torch threads per cell (default: local, the usable cores / "
                                                   "--workers; slurm, --cpus_per_task or 1)")
    group.add_argument("--partition", help="slurm: partition")
    group.add_argument("--time", type=int, help="slurm: each task's time limit in minutes (needed); a longer cell "
                                                "is requeued and resumes")
    group.add_argument("--cpus_per_task", type=int, help="slurm: CPUs per task")
    group.add_argument("--gpus_per_task", type=int, help="slurm: GPUs per task (give --device cuda to the cells)")
    group.add_argument("--mem_gb", type=float, help="slurm: memory per task in GB")
    group.add_argument("--array_parallelism", type=int, help="slurm: tasks of the array running at once")
    group.add_argument("--sbatch", action="append", metavar="KEY=VALUE",
                       help="slurm: any other sbatch option, e.g. --sbatch qos=high --sbatch account=lab (repeat)")
    group.add_argument("--job_name", help="slurm: the job's name (default ftsam-grid)")
    return parser


def run(args: argparse.Namespace) -> int:
    from .executors import folder_of
    from .spec import load_grid
    from .state import cell_states

    spec = load_grid(args.grid)
    options = _options(args, spec.executor, os.path.basename(spec.path))
    workdir = os.path.abspath(args.workdir or os.path.join(spec.folder, _stem(spec.path) + ".grid"))
    cells = spec.cells
    if args.only:
        import fnmatch

        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.label, p) for p in args.only)]
        if not cells:
            raise FtsamError(f"no cell of {spec.path} matches --only {' '.join(args.only)}; see the labels with "
                             f"--status")
    states = cell_states(cells)
    if args.status:
        _print_table(states)
        return 0
    _print_counts(spec.path, states)
    failed = [s for s in states if s.state == "failed"]
    wanted = [s for s in states if s.state in ("pending", "interrupted") or (args.retry_failed and s.state == "failed")]
    if failed and not args.retry_failed:
        print(f"{len(failed)} failed cell(s) left as they are (see --status); --retry_failed runs them again")
    if not wanted:
        print("nothing to run")
        return 0
    return _submit(spec, wanted, options, workdir, folder_of(workdir), args.wait)


def _submit(spec, wanted, options, workdir: str, folder: str, wait: bool) -> int:
    from .cell_lock import CellBusy, CellLock, Holder, judge
    from .executors import EXECUTORS, make_jobs
    from .slurm import SlurmQuery

    executor = EXECUTORS[options.executor](options, folder)
    executor.check()
    query = SlurmQuery()
    cells, tokens = [], []
    for state in wanted:
        mine = Holder.here()
        try:
            broken = CellLock(state.cell.folder).take(mine, lambda h: judge(h, query.alive))
        except CellBusy as busy:  # taken since the states were read (another submission): never a second writer
            print(f"skipped  {state.cell.label}: {busy.why}")
            continue
        if broken is not None:
            print(f"took over {state.cell.label} from a stale lock ({broken.why})")
        cells.append(state.cell)
        tokens.append(mine.token)
    if not cells:
        print("nothing to run")
        return 0
    jobs = make_jobs(cells, tokens, os.path.join(workdir, ".stage"), executor)
    what = Counter(s.state for s in wanted if s.cell in cells)
    print(f"running {len(cells)} cell(s) ({', '.join(f'{n} {k}' for k, n in what.items())}) with the "
          f"{executor.name} executor, {executor.threads()} thread(s) each")
    try:
        executor.run(jobs, lambda item: _report(item))
    except KeyboardInterrupt:
        print("interrupted: the running cells stop after their current epoch's checkpoint (or at once); run the "
              "same command again to resume them", file=sys.stderr)
        raise
    if not executor.waits and not wait:
        print(f"watch: ftsam grid {spec.path} --status")
        return 0
    if not executor.waits:
        _watch(cells)
    return _final(cells)


def _report(item) -> None:
    """One line per finished cell (local, debug) or the executor's own message (slurm)."""
    if isinstance(item, str):
        print(item)
        return
    from .state import cell_state
    from .slurm import SlurmQuery

    state = cell_state(item.cell, SlurmQuery())
    print(f"{state.state:<11} {item.cell.label}  {state.detail}", flush=True)


def _watch(cells) -> None:
    from .state import cell_states

    last = None
    while True:
        states = cell_states(cells)
        counts = Counter(s.state for s in states)
        if counts != last:
            print(time.strftime("%H:%M:%S ") + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), flush=True)
            last = counts
        if not counts.keys() & {"running", "queued"}:
            return
        time.sleep(WAIT_POLL_S)


def _final(cells) -> int:
    from .state import cell_states

    states = cell_states(cells)
    bad = [s for s in states if s.state != "done"]
    for s in bad:
        print(f"{s.state:<11} {s.cell.label}  {s.detail}")
    failed = sum(s.state == "failed" for s in states)
    print(f"{len(states) - len(bad)} of {len(states)} cell(s) done" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- helpers


def _options(args: argparse.Namespace, section: Dict, where: str):
    from .executors import EXECUTORS, Options

    unknown = [k for k in section if k not in EXECUTOR_FLAGS]
    if unknown:
        raise FtsamError(f"{where}: executor: unknown key {quote(unknown[0])}; the keys are "
                         f"{', '.join(EXECUTOR_FLAGS)}")
    values = {k: section[k] for k in EXECUTOR_FLAGS if k in section}
    values.update({k: getattr(args, k) for k in EXECUTOR_FLAGS if getattr(args, k, None) is not None})
    if "executor" in values and values["executor"] not in EXECUTORS:
        raise FtsamError(f"executor must be one of {', '.join(sorted(EXECUTORS))}, got {quote(values['executor'])}; "
                         f"fix --executor (or executor: in {where})")
    for key in ("workers", "threads", "time", "cpus_per_task", "gpus_per_task", "array_parallelism"):
        if key in values and POSITIVE.parse(values[key]) is None:
            raise FtsamError(f"{key} must be a whole number >= 1, got {quote(values[key])}; fix --{key}")
    if values.get("executor", "local") in ("local", "debug"):  # on this machine: threads beyond its cores contend
        from ftsam_plugin.settings import usable_cores

        workers = int(values.get("workers", 1)) if values.get("executor", "local") == "local" else 1
        threads, cores = values.get("threads"), usable_cores()
        if threads is not None and workers * int(threads) > cores:
            raise FtsamError(f"{workers} worker(s) x {threads} thread(s) = {workers * int(threads)} threads on "
                             f"{cores} usable CPU core(s); lower --workers or --threads")
    if "mem_gb" in values and Number(low=0, low_open=True).parse(values["mem_gb"]) is None:
        raise FtsamError(f"mem_gb must be a positive number, got {quote(values['mem_gb'])}; fix --mem_gb")
    values["sbatch"] = _sbatch(values.get("sbatch"))
    return Options(debug=bool(getattr(args, "debug", False)), **values)


def _sbatch(value) -> Dict[str, str]:
    """--sbatch KEY=VALUE (repeated) or the file's mapping, as sbatch options (`qos=high` -> --qos=high)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    out = {}
    for item in value:
        key, sep, val = str(item).partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise FtsamError(f"--sbatch takes KEY=VALUE (or KEY alone for a switch), got {quote(item)}; fix --sbatch")
        out[key] = val if sep else True
    return out


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _print_counts(path: str, states) -> None:
    counts = Counter(s.state for s in states)
    from .state import STATES

    print(f"grid {path}: {len(states)} cell(s): " + ", ".join(f"{counts[k]} {k}" for k in STATES if counts[k]))
    for s in states:
        if s.state in ("running", "queued", "conflict"):
            print(f"{s.state:<11} {s.cell.label}  {s.detail}")


def _print_table(states) -> None:
    from .state import STATES

    counts = Counter(s.state for s in states)
    print(f"{len(states)} cell(s): " + ", ".join(f"{counts[k]} {k}" for k in STATES if counts[k]))
    width = max((len(s.cell.label) for s in states), default=4)
    for s in states:
        group = f"[{s.cell.group}] " if s.cell.group else ""
        print(f"{s.state:<11} {s.cell.label:<{width}}  {group}{s.detail}".rstrip())
