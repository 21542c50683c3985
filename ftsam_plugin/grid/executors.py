"""Where the cells run, each through submitit (pinned in setup.cfg), chosen by name from `EXECUTORS`:

    slurm   one job array (sbatch): --partition, --time, --cpus_per_task, --gpus_per_task, --mem_gb,
            --array_parallelism, and any other sbatch option through --sbatch KEY=VALUE. Returns once submitted
            (--wait: watches until every cell ends). A task hitting its time limit is requeued by submitit and
            resumes from its last epoch.
    local   N processes on this machine (--workers, --threads each), submitit's LocalExecutor; runs to the end.
            Ctrl-C stops the running cells after their current epoch's checkpoint (a second one: at once); the
            next run resumes them.
    debug   in this process, one cell after another (submitit's DebugExecutor): with `ftsam --debug`, a failing
            cell's traceback (and pdb).

Each takes the cells whose locks the submission holds and returns once they are submitted (slurm) or done.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ftsam_plugin.errors import FtsamError

from .cell_lock import CellLock
from .worker import CellJob

__all__ = ["EXECUTORS", "Options", "register", "DEFAULT_EXECUTOR"]

DEFAULT_EXECUTOR = "local"
LOCAL_FOREVER_MIN = 60 * 24 * 365  # submitit's local jobs time out (2 minutes unless told): a year
POLL_S = 1.0


@dataclass
class Options:
    """The executor settings of one `ftsam grid` run (flags over the grid file's `executor:` section)."""

    executor: str = DEFAULT_EXECUTOR
    workers: int = 1
    threads: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[int] = None  # minutes per task
    cpus_per_task: Optional[int] = None
    gpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    array_parallelism: Optional[int] = None
    sbatch: Dict[str, str] = field(default_factory=dict)
    job_name: str = "ftsam-grid"
    debug: bool = False


EXECUTORS: Dict[str, type] = {}


def register(cls: type) -> type:
    EXECUTORS[cls.name] = cls
    return cls


def thread_setup(threads: int) -> List[str]:
    """Shell lines run before a job's Python starts: its BLAS / OpenMP thread counts."""
    return [f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"]


class _Executor:
    name = ""
    waits = True  # runs the cells to their end before returning

    def __init__(self, options: Options, folder: str):
        self.options, self.folder = options, folder

    def threads(self) -> int:
        return int(self.options.threads or 1)

    def check(self) -> None:
        """FtsamError if this executor cannot run here with these options (before any cell is locked)."""

    def run(self, jobs: List[CellJob], report) -> None:
        raise NotImplementedError


@register
class Slurm(_Executor):
    name = "slurm"
    waits = False

    def threads(self) -> int:
        return int(self.options.threads or self.options.cpus_per_task or 1)

    def check(self) -> None:
        import shutil

        if self.options.time is None:
            raise FtsamError("--executor slurm needs each task's time limit; pass --time MINUTES (or `time:` under "
                             "executor in the grid file): a cell that needs longer is requeued and resumes")
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise FtsamError("sbatch/srun not found: this is not a Slurm machine; use --executor local here")

    def run(self, jobs: List[CellJob], report) -> None:
        import submitit

        o = self.options
        executor = submitit.SlurmExecutor(folder=self.folder)
        params = dict(job_name=o.job_name, time=int(o.time), partition=o.partition, cpus_per_task=o.cpus_per_task,
                      gpus_per_task=o.gpus_per_task, mem=f"{o.mem_gb:g}GB" if o.mem_gb else None,
                      array_parallelism=o.array_parallelism, setup=thread_setup(self.threads()),
                      additional_parameters=dict(o.sbatch) or None)
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        try:
            submitted = executor.submit_array(jobs)
        except Exception as exc:  # sbatch refused it: nothing was queued, so nothing keeps the cells
            for job in jobs:
                CellLock(job.cell.folder).release(job.token)
            raise FtsamError(f"sbatch failed: {' '.join(str(exc).split())[:300]}; check the Slurm options "
                             f"(--partition, --time, --sbatch ...)") from None
        for job, slurm_job in zip(jobs, submitted):
            CellLock(job.cell.folder).set_job(job.token, slurm_job.job_id)
        first = submitted[0].job_id.split("_")[0]
        report(f"submitted {len(jobs)} cell(s) to Slurm as job {first}"
               + (f" (array of {len(jobs)}, at most {o.array_parallelism or len(jobs)} at once)" if len(jobs) > 1
                  else "") + f"; logs: {self.folder}/{first}_*")


@register
class Local(_Executor):
    name = "local"

    def threads(self) -> int:
        from ftsam_plugin.settings import usable_cores

        return int(self.options.threads or max(1, usable_cores() // max(1, self.options.workers)))

    def run(self, jobs: List[CellJob], report) -> None:
        import submitit

        executor = submitit.LocalExecutor(folder=self.folder)
        # no `setup` lines: they put a shell between submitit and the job, and a cancel (SIGINT) would stop there
        executor.update_parameters(timeout_min=self.options.time or LOCAL_FOREVER_MIN)
        threads = str(self.threads())
        guard, stopping, started = threading.Lock(), threading.Event(), {}

        def one(job: CellJob):  # a pool thread: start the cell's process, wait for it
            with guard:
                if stopping.is_set():
                    return
                with _environ(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads):  # the job's copy of it
                    started[job.token] = handle = executor.submit(job)
            while not handle.done():
                time.sleep(POLL_S)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.options.workers))
        futures = {pool.submit(one, job): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
                report(futures[future])
        except KeyboardInterrupt:  # stop the running cells at their next checkpoint; a second Ctrl-C: at once
            stopping.set()
            with guard:
                handles = list(started.values())
            for handle in handles:
                _signal(handle, signal.SIGTERM)  # submitit's controller forwards SIGTERM to its job
            try:
                pool.shutdown(wait=True, cancel_futures=True)
            except KeyboardInterrupt:
                for handle in handles:
                    handle.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            for job in jobs:
                if job.token not in started:  # never started: the cell is free again
                    CellLock(job.cell.folder).release(job.token)


@register
class Debug(_Executor):
    name = "debug"

    def run(self, jobs: List[CellJob], report) -> None:
        import submitit

        executor = submitit.DebugExecutor(folder=self.folder)
        for job in jobs:
            executor.submit(job).result()
            report(job)


def _signal(handle, signum: int) -> None:
    """Signal a local job's controller (its job id is the controller's PID)."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(handle.job_id), signum)


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_jobs(cells, tokens, stage_root: str, executor: _Executor) -> List[CellJob]:
    """One CellJob per cell (failures raise inside Slurm and local jobs, so their job reads as failed; in the debug
    executor only with --debug, where the traceback is the point)."""
    raising = executor.name != "debug" or executor.options.debug
    return [CellJob(cell, token, stage_root, executor.threads(), executor.name, debug=executor.options.debug,
                    raise_on_failure=raising) for cell, token in zip(cells, tokens)]


def folder_of(workdir: str) -> str:
    return os.path.join(workdir, "submitit")
