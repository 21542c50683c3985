"""Time to purify: how long a defense run took until the backdoor was gone for good.

A run's per-epoch CSV (`<name>_df.csv`) holds, besides BackdoorBench's columns, the cumulative seconds of the run
(`RunClock`): `train_time_s`, the training passes only, and `wall_time_s`, training plus evaluation and checkpoints
(both from the start of the epoch loop; setup such as loading the record or `--rho auto`'s probes is not counted,
`--unlearn`'s scan before the first epoch is, in both; a resumed run continues from the checkpoint's totals, the
lost part of an interrupted epoch is not counted).

`time_to_purify(rows)` finds the first evaluated epoch from which ASR stays <= the threshold (5%) at every later
evaluation; "never" when the last evaluation is above it. ASR is only known at the evaluated epochs (every
`--eval_every` epochs and the last), so the epoch is an upper bound, exact to within that granularity, which is
reported with it. Works on BackdoorBench's own per-epoch CSVs too (without the time columns: epochs only).
Epochs are 1-based (our CSVs' `epoch` column: the first epoch is 1); BackdoorBench's trainer writes a 0-based
`epoch` (`ft_df.csv`), read here as the same 1-based count.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["PURIFIED_ASR", "TRAIN_TIME", "WALL_TIME", "TIME_COLUMNS", "SUMMARY_COLUMNS", "CLOCK_COLUMNS",
           "RunClock",
           "TimeToPurify", "time_to_purify", "read_history", "history_problem"]

PURIFIED_ASR = 0.05
TRAIN_TIME, WALL_TIME = "train_time_s", "wall_time_s"
TIME_COLUMNS = (TRAIN_TIME, WALL_TIME)
# what a defense adds to its `<name>_df_summary.csv` (a run-level value in each of the three rows)
SUMMARY_COLUMNS = ("purify_epoch", "purify_train_time_s", "purify_wall_time_s", "purify_eval_every")
CLOCK_COLUMNS = (*TIME_COLUMNS, "purify_train_time_s", "purify_wall_time_s")  # differ between equal runs
NEVER = "never"


class RunClock:
    """The per-epoch time columns: cumulative training and wall seconds, continued from a resumed `history`
    (none when the history was written without them: its totals are unknown)."""

    def __init__(self, history: Sequence[Mapping[str, Any]] = ()):
        last = history[-1] if history else {}
        train, wall = _number(last.get(TRAIN_TIME)), _number(last.get(WALL_TIME))
        self.known = not history or (train is not None and wall is not None)
        self.train, self.wall = (train or 0.0, wall or 0.0)
        self.start = time.perf_counter()

    def add(self, seconds: float) -> None:
        """Training work done before the epoch loop (`--unlearn`'s scan): counted in both totals."""
        self.train += seconds
        self.wall += seconds

    def columns(self, train_seconds: float) -> Dict[str, float]:
        """The epoch just done (`train_seconds` of training) as {train_time_s, wall_time_s}, ms resolution."""
        if not self.known:
            return {}
        self.train += train_seconds
        return {TRAIN_TIME: round(self.train, 3), WALL_TIME: round(self.wall + time.perf_counter() - self.start, 3)}


@dataclass(frozen=True)
class TimeToPurify:
    """The time to purify of one run (fractions for ACC/ASR, seconds, 1-based epochs; None: not known)."""

    threshold: float
    epoch: Optional[int]  # first evaluated epoch with ASR <= threshold at it and every later evaluation; None: never
    train_s: Optional[float]  # cumulative seconds at that epoch
    wall_s: Optional[float]
    epochs: int  # the run's last epoch
    total_train_s: Optional[float]
    total_wall_s: Optional[float]
    final_acc: Optional[float]
    final_asr: Optional[float]
    eval_every: Optional[int]  # granularity: the largest gap between evaluations (from epoch 0)
    evaluated: int  # evaluated epochs

    @property
    def purified(self) -> bool:
        return self.epoch is not None

    def when(self) -> str:
        """'epoch 6 (312 s)', 'never' or '—' (no evaluation)."""
        if not self.evaluated:
            return "—"
        if not self.purified:
            return NEVER
        return f"epoch {self.epoch}" + (f" ({_secs(self.train_s)})" if self.train_s is not None else "")

    def total(self) -> str:
        """'20 epochs (1040 s)'."""
        return f"{self.epochs} epochs" + (f" ({_secs(self.total_train_s)})" if self.total_train_s is not None else "")

    def describe(self) -> str:
        """One line for a run's log."""
        head = f"time to purify (ASR <= {100 * self.threshold:g}% from then to the end): "
        if not self.evaluated:
            return head + "unknown, no epoch was evaluated"
        if self.purified:
            head += f"epoch {self.epoch} of {self.epochs}"
            if self.train_s is not None:
                head += f", {_secs(self.train_s)} of {_secs(self.total_train_s)} training " \
                        f"({_secs(self.wall_s)} of {_secs(self.total_wall_s)} wall)"
        else:
            head += f"never in {self.epochs} epochs"
            if self.total_train_s is not None:
                head += f" ({_secs(self.total_train_s)} training, {_secs(self.total_wall_s)} wall)"
        return (head + f"; final ACC {_pct(self.final_acc)}, ASR {_pct(self.final_asr)}; ASR evaluated every "
                       f"{self.eval_every} epoch(s)")

    def summary_columns(self) -> Dict[str, Any]:
        """SUMMARY_COLUMNS: numbers, 'never', or None where unknown."""
        if not self.evaluated:
            return dict.fromkeys(SUMMARY_COLUMNS)
        if self.purified:
            values = (self.epoch, self.train_s, self.wall_s)
        else:
            values = (NEVER, *(NEVER if t is not None else None for t in (self.total_train_s, self.total_wall_s)))
        return dict(zip(SUMMARY_COLUMNS, (*values, self.eval_every)))

    def as_dict(self) -> dict:
        return asdict(self)


def _number(value) -> Optional[float]:
    """A CSV or history value as a float; None when missing; NaN for BackdoorBench's 'nan_value'."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if text == "nan_value":
        return math.nan
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _epochs(rows: Sequence[Mapping[str, Any]]) -> List[int]:
    """Each row's 1-based epoch: its `epoch` value, else its position (BackdoorBench's ft-sam CSV has no `epoch`).
    A column whose smallest value is 0 counts from 0 (BackdoorBench's trainer, `ft_df.csv`): shifted by one."""
    values = [_number(r.get("epoch")) for r in rows]
    known = [v for v in values if v is not None and math.isfinite(v)]
    shift = 1 if known and min(known) == 0 else 0
    return [int(v) + shift if v is not None and math.isfinite(v) else i + 1 for i, v in enumerate(values)]


def _secs(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.2g} s"


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def time_to_purify(rows: Sequence[Mapping[str, Any]], threshold: float = PURIFIED_ASR) -> TimeToPurify:
    """The time to purify of a run from its per-epoch rows (dicts of numbers or CSV strings; `epoch` 1-based as
    ours, or 0-based as BackdoorBench's trainer writes it, else the row's position; see `_epochs`; evaluated rows
    hold `test_asr`)."""
    epochs = _epochs(rows)
    evaluated = [(e, r) for e, r in zip(epochs, rows) if _number(r.get("test_asr")) is not None]
    start = None
    for k in range(len(evaluated) - 1, -1, -1):
        asr = _number(evaluated[k][1].get("test_asr"))
        if not asr <= threshold:  # NaN is not purified
            break
        start = k
    at = evaluated[start][1] if start is not None else {}
    last = rows[-1] if rows else {}
    final = evaluated[-1][1] if evaluated else {}
    marks = [0] + [e for e, _ in evaluated]
    return TimeToPurify(
        threshold=threshold,
        epoch=evaluated[start][0] if start is not None else None,
        train_s=_number(at.get(TRAIN_TIME)), wall_s=_number(at.get(WALL_TIME)),
        epochs=epochs[-1] if epochs else 0,
        total_train_s=_number(last.get(TRAIN_TIME)), total_wall_s=_number(last.get(WALL_TIME)),
        final_acc=_number(final.get("test_acc")), final_asr=_number(final.get("test_asr")),
        eval_every=max(b - a for a, b in zip(marks, marks[1:])) if evaluated else None,
        evaluated=len(evaluated),
    )


def read_history(path: str) -> List[Dict[str, str]]:
    """The rows of a per-epoch CSV (`<name>_df.csv`, BackdoorBench's or ours) as dicts of strings."""
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k} for row in csv.DictReader(handle)]


METRIC_COLUMNS = ("test_acc", "test_asr", "test_ra")


def history_problem(rows: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """What makes per-epoch rows unusable for `time_to_purify`, or None: an epoch that is not after the one before
    (a duplicated row, two runs in one file) or an ACC/ASR/RA that is not a fraction in [0, 1] (a percent, a
    negative value, inf). Missing values and BackdoorBench's 'nan_value' are allowed (not evaluated)."""
    from ftsam_plugin.settings import FRACTION

    epochs = _epochs(rows)
    for before, epoch in zip(epochs, epochs[1:]):
        if epoch == before:
            return f"epoch {epoch} twice"
        if epoch < before:
            return f"epoch {epoch} after epoch {before}"
    for epoch, row in zip(epochs, rows):
        for column in METRIC_COLUMNS:
            value = _number(row.get(column))
            if value is not None and not math.isnan(value) and FRACTION.parse(value) is None:
                return f"{column} {row.get(column)} at epoch {epoch} is not a fraction in [0, 1]"
    return None
