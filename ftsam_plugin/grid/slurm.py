"""Asking Slurm whether a job still lives: `squeue` for what is queued or running, `sacct` for how a job ended.

Job ids are Slurm's (`1234` or an array task `1234_5`). squeue lists a job while it is pending, running, suspended
or completing, so a job it lists is alive; one it no longer lists (or calls an invalid id) is over, and sacct (with
accounting) says how: CANCELLED, TIMEOUT, FAILED, COMPLETED, ... When the commands are missing or the controller
does not answer, Slurm cannot be asked, which callers treat as "may still live".
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Dict, Optional, Tuple

__all__ = ["SlurmQuery", "available", "TIMEOUT_S"]

TIMEOUT_S = 60
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "TIMEOUT", "REVOKED", "SPECIAL_EXIT"}


def available() -> bool:
    return shutil.which("squeue") is not None


class SlurmQuery:
    """Job states from squeue and sacct, one call per array (cached for this object's life)."""

    def __init__(self, run=subprocess.run):
        self._run = run
        self._queued: Dict[str, Optional[Dict[str, str]]] = {}  # base id -> {job id: state}, None: cannot ask
        self._ended: Dict[str, Dict[str, str]] = {}
        self._why: Dict[str, str] = {}

    def alive(self, job_id: str) -> Tuple[Optional[bool], str]:
        """(True, state) while queued or running; (False, how it ended, or 'gone'); (None, why Slurm cannot be
        asked)."""
        base = job_id.split("_")[0]
        queued = self._squeue(base)
        if queued is None:
            return None, self._why.get(base, "squeue failed")
        state = queued.get(job_id)
        if state is not None and state not in ENDED:
            return True, state
        return False, state or self.ended_state(job_id) or "gone from the queue"

    def ended_state(self, job_id: str) -> Optional[str]:
        """How sacct says the job ended (CANCELLED, TIMEOUT, ...), None when it has no record (no accounting)."""
        base = job_id.split("_")[0]
        if base not in self._ended:
            self._ended[base] = self._sacct(base)
        return self._ended[base].get(job_id)

    def _call(self, argv) -> Tuple[Optional[int], str, str]:
        try:
            done = self._run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, "", str(exc)
        return done.returncode, done.stdout, done.stderr

    def _squeue(self, base: str) -> Optional[Dict[str, str]]:
        if base not in self._queued:
            code, out, err = self._call(["squeue", "-h", "--array", "-j", base, "-o", "%i|%T"])
            if code == 0:
                self._queued[base] = dict(line.split("|", 1) for line in out.split() if "|" in line)
            elif code is not None and "invalid job id" in err.lower():
                self._queued[base] = {}  # the controller no longer knows it: over
            else:
                self._queued[base] = None
                self._why[base] = (err.strip().splitlines() or ["squeue failed"])[-1]
        return self._queued[base]

    def _sacct(self, base: str) -> Dict[str, str]:
        code, out, _ = self._call(["sacct", "-X", "-n", "-P", "-j", base, "-o", "JobID,State"])
        states: Dict[str, str] = {}
        if code != 0:
            return states
        for line in out.splitlines():
            if "|" not in line:
                continue
            job, state = line.split("|", 1)
            state = state.split()[0] if state.split() else "?"  # 'CANCELLED by 0'
            for one in _expand(job):
                states[one] = state
        return states


def _expand(job: str):
    """'12_[1-3%2]' -> 12_1, 12_2, 12_3; '12_4' and '12' as they are."""
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(%\d+)?\]", job)
    if not match:
        return [job]
    out = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        out += [f"{match.group(1)}_{k}" for k in range(int(low), int(high or low) + 1)]
    return out
