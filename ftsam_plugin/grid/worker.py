"""The job of one cell: what a Slurm array task, a local process or the debug executor runs.

It checks that the cell's lock still carries its submission's token (else another submission owns the cell and
this job does nothing), writes itself into the lock (host, PID, Slurm job), runs `ftsam defend` in this process
(`--resume` when the cell has a checkpoint) at the grid's thread count, and writes the cell's summary before and
after. Stop signals are the defense's: SIGTERM (scancel) or Ctrl-C finish the current epoch's checkpoint and end
the run with 143 / 130, which the summary records as interrupted. Slurm's time limit or a preemption (submitit's
USR2) requeues the same job (`CellJob` is `Checkpointable`): it keeps the lock and resumes from the last epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import socket
import sys
import time
from typing import Any, Dict, Optional, Tuple

from submitit.helpers import Checkpointable

from .cell_lock import CellLock, Holder
from .cells import Cell, epochs_done, final_metrics, read_summary, stage_record, write_summary

__all__ = ["CellJob", "CellFailed", "slurm_identity", "run_cell"]

STOPPED = {130: "SIGINT", 143: "SIGTERM"}


class CellFailed(RuntimeError):
    """A cell's run ended with an error (raised so that Slurm marks the job FAILED)."""


class CellJob(Checkpointable):
    """One cell as a submitit job (picklable; `checkpoint` requeues it on Slurm's time limit or a preemption).

    Args:
        cell: the cell.
        token: the token of the lock its submission took.
        stage_root: where its record view goes (`cells.stage_record`).
        threads: torch threads for the run.
        executor: the executor's name, for the summary.
        debug: re-raise the defense's exception (a traceback; the debug executor opens pdb on it).
        raise_on_failure: raise CellFailed when the run fails (so the scheduler marks the job failed).
    """

    def __init__(self, cell: Cell, token: str, stage_root: str, threads: int, executor: str, debug: bool = False,
                 raise_on_failure: bool = True):
        self.cell, self.token, self.stage_root = cell, token, stage_root
        self.threads, self.executor, self.debug, self.raise_on_failure = threads, executor, debug, raise_on_failure

    def __call__(self) -> Dict[str, Any]:
        return run_cell(self)


def slurm_identity() -> Optional[Dict[str, Optional[str]]]:
    """This process's Slurm job ({job_id: '12_3' for an array task, array ids, node, ...}), None outside Slurm."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    return {"job_id": f"{array}_{task}" if array and task else env["SLURM_JOB_ID"], "raw_job_id": env["SLURM_JOB_ID"],
            "array_job_id": array, "array_task_id": task, "node": env.get("SLURMD_NODENAME"),
            "partition": env.get("SLURM_JOB_PARTITION"), "cpus_per_task": env.get("SLURM_CPUS_PER_TASK"),
            "restart_count": env.get("SLURM_RESTART_COUNT")}


def run_cell(job: CellJob) -> Dict[str, Any]:
    """Run the cell of `job` (module docstring); returns {cell, state, exit_code, error}."""
    cell = job.cell
    lock = CellLock(cell.folder)
    slurm = slurm_identity()
    if not lock.adopt(job.token, Holder.here(token=job.token, job_id=slurm and slurm["job_id"], role="job")):
        holder, _ = lock.read()
        why = f"held by {holder.describe()}" if holder else "its lock is gone"
        print(f"{cell.label}: not run: the cell is no longer this submission's ({why})", file=sys.stderr)
        return {"cell": cell.label, "state": "skipped", "exit_code": None, "error": why}
    previous = read_summary(cell) or {}
    if previous.get("settings_sha256") != cell.settings_digest:
        previous = {}
    view = stage_record(cell, job.stage_root)
    resumed = os.path.isfile(os.path.join(cell.folder, "checkpoint", "last.pt"))
    argv = cell.argv(view) + (["--resume", "true"] if resumed else [])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    fields = dict(attempts=int(previous.get("attempts") or 0) + 1, executor=job.executor,
                  host=socket.gethostname(), pid=os.getpid(), slurm=slurm, machine=_machine(job.threads),
                  commit=_commit(),
                  first_started=previous.get("first_started") or stamp, started=stamp, resumed=resumed,
                  resumed_from_epoch=epochs_done(cell) if resumed else None)
    write_summary(cell, state="running", **fields)
    start = time.time()
    ended = dict(fields)
    try:
        code, error = _run_defense(argv, job.threads, job.debug)
    except SystemExit:  # submitit's USR2 handler requeued the job: it keeps the lock and resumes
        write_summary(cell, state="interrupted", exit_code=None, error="requeued (time limit or preemption)",
                      wall_s=time.time() - start, epochs_done=epochs_done(cell), **ended)
        raise
    except BaseException as exc:  # --debug: the defense's own exception, for its traceback
        write_summary(cell, state="failed", exit_code=1, error=f"{type(exc).__name__}: {exc}"[:300],
                      wall_s=time.time() - start, epochs_done=epochs_done(cell), **ended)
        lock.release(job.token)
        raise
    state = _state(cell, code)
    if state == "interrupted":
        error = error or f"stopped by {STOPPED[code]}"
    write_summary(cell, state=state, exit_code=code, error=None if state == "done" else error or f"exit code {code}",
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_s=time.time() - start,
                  epochs_done=epochs_done(cell), result=final_metrics(cell) if state == "done" else None, **ended)
    lock.release(job.token)
    if state == "failed" and job.raise_on_failure:
        raise CellFailed(f"{cell.label}: {error or f'exit code {code}'}")
    return {"cell": cell.label, "state": state, "exit_code": code, "error": error}


def _state(cell: Cell, code: int) -> str:
    from ftsam_plugin.data.completion import is_complete

    if code in STOPPED:
        return "interrupted"
    if code == 0 and is_complete(cell.folder, ["defense_result.pt", f"{cell.defense}_df_summary.csv"]):
        return "done"
    return "failed"


def _run_defense(argv, threads: int, debug: bool) -> Tuple[int, Optional[str]]:
    """`ftsam defend argv` in this process with the CLI's error contract; (exit code, its error line or None)."""
    import torch

    from ftsam_plugin.cli import run_reporting_errors
    from ftsam_plugin.defense import cli as defense_cli

    torch.set_num_threads(int(threads))
    parser = argparse.ArgumentParser(prog="ftsam defend")
    parser.add_argument("--debug", action="store_true")
    defense_cli.add_arguments(parser)
    args = parser.parse_args(list(argv) + (["--debug"] if debug else []))
    tee = _ErrorLine(sys.stderr)
    with contextlib.redirect_stderr(tee):
        code = run_reporting_errors(defense_cli.run, args)
    return code, tee.line


class _ErrorLine(io.TextIOBase):
    """Writes through to `stream` and keeps the last `error: ...` or `interrupted: ...` line."""

    def __init__(self, stream):
        self.stream, self.line, self._part = stream, None, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self._part += text
        *lines, self._part = self._part.split("\n")
        for line in lines:
            if line.startswith(("error: ", "interrupted: ")):
                self.line = line.strip()[:300]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@functools.lru_cache(maxsize=None)
def _commit() -> str:
    """The code this worker runs: the commit of the checkout holding ftsam_plugin when the worker first asks ('unknown'
    outside one); read once, as the worker's code was imported once."""
    from ftsam_plugin.provenance import git_commit

    return git_commit(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _machine(threads: int) -> Dict[str, Any]:
    """Where the cell runs: CPU, logical CPUs, torch, threads, Python (provenance.machine), and the GPU if any."""
    import torch

    from ftsam_plugin.provenance import machine

    info = dict(machine(threads))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
