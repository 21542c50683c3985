"""A cell's state, from its lock, its summary and its result files (nothing is written here).

    done         finished with these settings; the defense's completion marker still matches its files
    running      its job runs it (a live lock)
    queued       submitted, its job not started yet (a live lock)
    interrupted  started and stopped before the end (cancelled, killed, time limit): the next run resumes it
    failed       ended with an error; run again only with --retry_failed
    pending      never started (or its result files changed since it finished)
    conflict     its folder holds another run (other settings, or not made by `ftsam grid`): never touched
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from .cell_lock import LOCK_FILE, CellLock, Holder, Verdict, judge
from .cells import SUMMARY_NAME, Cell, epochs_done, read_summary
from .slurm import SlurmQuery

__all__ = ["CellState", "STATES", "cell_state", "cell_states", "TO_RUN"]

STATES = ("done", "running", "queued", "interrupted", "failed", "pending", "conflict")
TO_RUN = ("interrupted", "pending")  # what a run submits (+ failed with --retry_failed)
QUEUED_WORDS = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"}


@dataclass
class CellState:
    cell: Cell
    state: str
    detail: str = ""
    holder: Optional[Holder] = None
    verdict: Optional[Verdict] = None  # of a lock that was found (stale ones too)
    summary: Optional[dict] = None


def cell_states(cells: List[Cell], query: Optional[SlurmQuery] = None) -> List[CellState]:
    query = query or SlurmQuery()
    return [cell_state(cell, query) for cell in cells]


def cell_state(cell: Cell, query: SlurmQuery) -> CellState:
    holder, _ = CellLock(cell.folder).read()
    summary = read_summary(cell)
    verdict = None
    if holder is not None:
        verdict = judge(holder, query.alive) if holder.host != "?" else Verdict(
            None, f"its {LOCK_FILE} cannot be read; remove it if no run uses the cell")
        if verdict.alive is not False:
            queued = verdict.job_state in QUEUED_WORDS or (verdict.job_state is None and holder.role == "submitter")
            return CellState(cell, "queued" if queued else "running", verdict.why + _progress(cell), holder, verdict,
                             summary)
    stale = f"; stale lock: {verdict.why}" if verdict is not None else ""
    state = _from_summary(cell, summary, query)
    state.holder, state.verdict = holder, verdict
    state.detail += stale
    return state


def _from_summary(cell: Cell, summary: Optional[dict], query: SlurmQuery) -> CellState:
    if summary is None:
        others = [n for n in _listing(cell.folder) if n != LOCK_FILE and not n.startswith(LOCK_FILE)]
        if others:
            return CellState(cell, "conflict", f"{cell.folder} holds files not made by `ftsam grid` "
                                               f"({', '.join(sorted(others)[:3])}); move them away to run the cell")
        return CellState(cell, "pending")
    if summary.get("settings_sha256") != cell.settings_digest:
        return CellState(cell, "conflict", _differs(cell, summary), summary=summary)
    word = summary.get("state")
    if word == "done":
        from ftsam_plugin.data.completion import is_complete

        names = ["defense_result.pt", f"{cell.defense}_df_summary.csv"]
        if is_complete(cell.folder, names):
            return CellState(cell, "done", _result_text(summary), summary=summary)
        return CellState(cell, "pending", "its result files changed since it finished: it runs again",
                         summary=summary)
    if word == "failed":
        return CellState(cell, "failed", f"exit code {summary.get('exit_code')}: {summary.get('error') or '?'}"
                                         f"{_job_text(summary, query)}", summary=summary)
    return CellState(cell, "interrupted", f"stopped{_progress(cell)}{_job_text(summary, query)}; the next run "
                                          f"resumes it", summary=summary)


def _listing(folder: str) -> List[str]:
    try:
        return [n for n in os.listdir(folder) if n != SUMMARY_NAME]
    except OSError:
        return []


def _progress(cell: Cell) -> str:
    done = epochs_done(cell)
    if done is None:
        return ""
    total = dict(cell.settings).get("epochs")
    return f", epoch {done}" + (f" of {total}" if total is not None else "") + " done"


def _job_text(summary: Dict, query: SlurmQuery) -> str:
    job = (summary.get("slurm") or {}).get("job_id")
    if not job:
        return ""
    ended = query.ended_state(job)
    return f" (Slurm job {job}{': ' + ended if ended else ''})"


def _result_text(summary: Dict) -> str:
    result = summary.get("result") or {}
    values = " ".join(f"{k.upper()} {100 * result[k]:.2f}" for k in ("acc", "asr", "ra") if result.get(k) is not None)
    where = (summary.get("slurm") or {}).get("job_id")
    minutes = summary.get("wall_s")
    bits = [values or "no metrics", f"{minutes / 60:.1f} min" if isinstance(minutes, (int, float)) else None,
            f"Slurm job {where}" if where else None, summary.get("host")]
    return ", ".join(b for b in bits if b)


def _differs(cell: Cell, summary: Dict) -> str:
    theirs = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    mine = {k: cell.text(v) for k, v in cell.settings}
    keys = [k for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)]
    if summary.get("defense") not in (None, cell.defense):
        keys.insert(0, "defense")
    shown = ", ".join(f"{k}: {theirs.get(k, '-')} there, {mine.get(k, '-')} here" for k in keys[:3]) or "unreadable"
    return (f"{cell.folder} holds a run with other settings ({shown}); move it away, or give the entry its own "
            f"`name`")
