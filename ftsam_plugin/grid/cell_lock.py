"""One writer per cell across machines: a lock file in the cell's folder that names its holder, and a stale-lock
rule that asks Slurm.

`flock` (ftsam_plugin/lock.py) is local to one machine, and a cluster's nodes share a network file system, so the
grid keeps its own lock, `<cell folder>/.grid.lock`: one JSON line naming the host, PID (with the process's start
time and the host's boot id, so a reused PID is not mistaken for the holder), the Slurm job id once there is one,
and a random token. It is made with `link()` from a complete temp file, which is atomic on local and NFS file
systems alike, so exactly one of two racing submitters gets it and nobody reads half a lock.

    lock = CellLock(cell.folder)
    lock.take(Holder.here(), judge)     # CellBusy(holder, why) if a live (or possibly live) holder has it
    lock.set_job(token, "1234_5")       # the submitter, once sbatch named the job
    lock.adopt(token, Holder.here(...)) # the job, when it starts: only if the lock still carries its token
    lock.release(token)                 # only the token's holder removes it

The stale-lock rule (`judge`): a lock naming a Slurm job is live while Slurm lists the job as queued or running
(squeue), stale once it does not (CANCELLED, TIMEOUT, FAILED, ... or forgotten), and *unknown* when Slurm cannot be
asked; a lock without a job is live while its PID runs on this host, stale when that process is gone, and
unknown on another host. Only a stale lock is ever broken; unknown is treated as live and reported. Breaking is
serialised by a second lock file (`.grid.lock.break`, held for milliseconds; one older than BREAK_STALE_S is
taken as abandoned), and the breaker checks that the lock it judged is still the same file before removing it, so
two submitters judging one stale lock at once cannot both take the cell.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

from ftsam_plugin.errors import FtsamError

__all__ = ["CellLock", "Holder", "CellBusy", "Verdict", "judge", "LOCK_FILE", "pid_alive"]

LOCK_FILE = ".grid.lock"
BREAK_STALE_S = 60.0


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a cell: host, PID, the PID's start time and the host's boot id, the Slurm job id once
    known, the token that proves ownership, and since when."""

    host: str
    pid: int
    token: str
    pid_start: Optional[str] = None
    boot: Optional[str] = None
    job_id: Optional[str] = None
    since: Optional[str] = None
    role: str = "submitter"  # "submitter": the cell waits for its job; "job": the job runs it

    @classmethod
    def here(cls, token: Optional[str] = None, job_id: Optional[str] = None, role: str = "submitter") -> "Holder":
        """This process on this host (a new token unless one is given)."""
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, token=token or uuid.uuid4().hex, pid_start=_pid_start(pid),
                   boot=_boot_id(), job_id=job_id, since=time.strftime("%Y-%m-%d %H:%M:%S"), role=role)

    def describe(self) -> str:
        job = f"Slurm job {self.job_id}, " if self.job_id else ""
        return f"{job}PID {self.pid} on {self.host}, since {self.since or '?'}"


@dataclass(frozen=True)
class Verdict:
    """Whether a holder still lives: True, False (stale), or None (cannot tell: treated as live); and why."""

    alive: Optional[bool]
    why: str
    job_state: Optional[str] = None  # Slurm's word for the holder's job, when it was asked


class CellBusy(FtsamError):
    """The cell is held by another run (or one that may still live)."""

    def __init__(self, holder: Optional[Holder], why: str):
        super().__init__(why)
        self.holder = holder
        self.why = why


def judge(holder: Holder, job_state: Callable[[str], Tuple[Optional[bool], str]]) -> Verdict:
    """The stale-lock rule (module docstring). `job_state(job_id)` -> (alive or None, Slurm's state or the reason
    it could not be asked), e.g. `slurm.SlurmQuery().alive`."""
    if holder.job_id:
        alive, state = job_state(holder.job_id)
        if alive is None:
            return Verdict(None, f"held by {holder.describe()}; cannot ask Slurm whether it lives ({state})")
        word = "queued or running" if alive else "over"
        return Verdict(alive, f"held by {holder.describe()}: Slurm says {state} ({word})", state)
    if holder.host == socket.gethostname():
        alive = pid_alive(holder.pid, holder.pid_start, holder.boot)
        return Verdict(alive, f"held by {holder.describe()}" + ("" if alive else " (that process is gone)"))
    return Verdict(None, f"held by {holder.describe()}: another machine, whose processes cannot be checked from "
                         f"here; if no run uses the cell, remove its {LOCK_FILE}")


class CellLock:
    """The lock file of one cell folder (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)

    def read(self) -> Tuple[Optional[Holder], Optional[Tuple[int, int]]]:
        """(holder, (device, inode) of the file) or (None, None) when there is no lock; a lock that cannot be read
        is a holder on host '?' (never judged stale)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                stat = os.fstat(handle.fileno())
                text = handle.read()
        except FileNotFoundError:
            return None, None
        except OSError:
            return Holder(host="?", pid=0, token=""), None
        try:
            fields = json.loads(text)
            holder = Holder(**{k: fields[k] for k in Holder.__dataclass_fields__ if k in fields})
            if not isinstance(holder.pid, int) or not holder.host or not holder.token:
                raise ValueError
        except (ValueError, TypeError):
            holder = Holder(host="?", pid=0, token="", since="(unreadable lock file)")
        return holder, (stat.st_dev, stat.st_ino)

    def take(self, mine: Holder, judge_holder: Callable[[Holder], Verdict]) -> Optional[Verdict]:
        """Take the cell for `mine`. A stale holder's lock is broken (its verdict is returned); CellBusy if a live
        or possibly live holder has it, or another submitter is breaking it at this moment."""
        os.makedirs(self.folder, exist_ok=True)
        if self._create(mine):
            return None
        holder, ident = self.read()
        if holder is None:  # released between our try and our read: try once more
            if self._create(mine):
                return None
            holder, ident = self.read()
        verdict = judge_holder(holder) if holder is not None and holder.host != "?" else Verdict(
            None, f"held by a lock that cannot be read ({self.path}); remove it if no run uses the cell")
        if verdict.alive is not False:
            raise CellBusy(holder, verdict.why)
        breaker = Holder.here()
        if not _create_file(self.path + ".break", breaker, abandoned_after=BREAK_STALE_S):
            raise CellBusy(holder, f"another submitter is taking over {self.folder} at this moment")
        try:
            again, ident_again = self.read()
            if ident_again != ident or again != holder:
                raise CellBusy(again, f"{self.path} changed while it was judged; run again")
            os.unlink(self.path)
            if not self._create(mine):
                raise CellBusy(None, f"{self.path} was taken while it was broken; run again")
        finally:
            _remove_if(self.path + ".break", breaker.token)
        return verdict

    def set_job(self, token: str, job_id: str) -> bool:
        """Record the Slurm job of the lock holding `token` (unless its job already wrote one); False if the lock
        is no longer this token's."""
        holder, _ = self.read()
        if holder is None or holder.token != token:
            return False
        if holder.job_id is None:
            self._replace(Holder(**{**asdict(holder), "job_id": job_id}))
        return True

    def adopt(self, token: str, mine: Holder) -> bool:
        """The job starting: rewrite the lock with this process (keeping `token`); False if it is not ours."""
        holder, _ = self.read()
        if holder is None or holder.token != token:
            return False
        self._replace(Holder(**{**asdict(mine), "token": token, "job_id": mine.job_id or holder.job_id}))
        return True

    def release(self, token: str) -> bool:
        """Remove the lock if it carries `token`."""
        return _remove_if(self.path, token)

    def _create(self, holder: Holder) -> bool:
        return _create_file(self.path, holder)

    def _replace(self, holder: Holder) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(holder)) + "\n")
        os.replace(tmp, self.path)


def _create_file(path: str, holder: Holder, abandoned_after: Optional[float] = None) -> bool:
    """Create `path` holding `holder`, atomically and only if it does not exist (link of a complete temp file).
    With `abandoned_after`, a file older than that many seconds is removed first (its maker died)."""
    tmp = f"{path}.{holder.token[:8]}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(holder)) + "\n")
    try:
        if abandoned_after is not None:
            try:
                if time.time() - os.stat(path).st_mtime > abandoned_after:
                    os.unlink(path)
            except FileNotFoundError:
                pass
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)


def _remove_if(path: str, token: str) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            if json.loads(handle.read()).get("token") != token:
                return False
    except (OSError, ValueError, AttributeError):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- processes


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: Optional[str] = None, boot: Optional[str] = None) -> bool:
    """Whether process `pid` of this host still runs and is the same process (start time, boot id) as recorded."""
    if boot is not None and _boot_id() not in (None, boot):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _pid_start(pid)
    return start is None or now is None or now == start
