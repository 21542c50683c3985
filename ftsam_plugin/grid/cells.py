"""A cell of a grid: one `ftsam defend` run, its result folder, the record view it runs on, and its JSON summary.

A cell's result folder is `<record>/defense/<folder name>/` (BackdoorBench's layout, so `ftsam leaderboard` finds
it). The defense itself always writes to `<record>/defense/<defense>/`, so each cell runs on a *view* of its record:
a folder of links to the record's files whose `defense/<defense>` links to the cell's folder (made under the grid's
work folder, `.stage/`, which the leaderboard skips). Beside the defense's files the cell's folder holds:

    grid_cell.json   the cell's summary (SUMMARY_NAME): settings and their digest, state, exit code, error line,
                     attempts, times, the machine (CPU, torch, threads), host and Slurm job, and ACC/ASR/RA
    .grid.lock       the writer's lock (cell_lock.py)

A cell is the same cell when its defense and every flag (`settings_digest`) are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["Cell", "SUMMARY_NAME", "read_summary", "write_summary", "stage_record", "epochs_done"]

SUMMARY_NAME = "grid_cell.json"
SUMMARY_FORMAT = "ftsam-grid-cell"


@dataclass(frozen=True)
class Cell:
    """One run of a grid.

    Args:
        record: the attack record's folder (absolute).
        defense: the defense's registry name (`ftsam`, `ft-baseline`).
        folder_name: the cell's folder under `<record>/defense/`.
        settings: every `ftsam defend` flag of the run but --defense and --result_file, in order: ((flag, value)).
        group: the grid entry's label, if any.
    """

    record: str
    defense: str
    folder_name: str
    settings: Tuple[Tuple[str, Any], ...]
    group: Optional[str] = None

    @property
    def folder(self) -> str:
        return os.path.join(self.record, "defense", self.folder_name)

    @property
    def label(self) -> str:
        return f"{os.path.basename(self.record)}/{self.folder_name}"

    @property
    def settings_digest(self) -> str:
        """sha256 of the defense and every flag: what makes two cells the same run."""
        text = json.dumps({"defense": self.defense, "settings": [[k, self.text(v)] for k, v in self.settings]})
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def key(self) -> str:
        """A short name for the cell's files outside its folder (its record view)."""
        return hashlib.sha256(f"{self.record}\0{self.folder_name}".encode()).hexdigest()[:16]

    def argv(self, record_view: str) -> List[str]:
        """`ftsam defend`'s arguments for this cell, run on `record_view` (see `stage_record`)."""
        argv = ["--defense", self.defense, "--result_file", record_view]
        for key, value in self.settings:
            argv += [f"--{key}", self.text(value)]
        return argv

    def command(self) -> str:
        """The run as a person would type it (on the record itself)."""
        return "ftsam defend " + " ".join(self.argv(self.record))

    @staticmethod
    def text(value: Any) -> str:
        """A flag's value as command-line text: true/false, integers as such, floats as short as round-trips."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            short = f"{value:g}"
            return short if float(short) == value else repr(value)
        return str(value)


def stage_record(cell: Cell, stage_root: str) -> str:
    """The cell's record view under `stage_root`: links to every file of the record but `defense/`, and
    `defense/<defense>` linking to the cell's folder (made here if missing). Returns the view's folder."""
    view = os.path.join(stage_root, cell.key)
    os.makedirs(os.path.join(view, "defense"), exist_ok=True)
    os.makedirs(cell.folder, exist_ok=True)
    for name in os.listdir(cell.record):
        if name != "defense":
            _link(os.path.join(cell.record, name), os.path.join(view, name))
    _link(cell.folder, os.path.join(view, "defense", cell.defense))
    return view


def _link(target: str, path: str) -> None:
    if os.path.islink(path) and os.readlink(path) == target:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)  # one step, so a view never lacks the link


def read_summary(cell: Cell) -> Optional[Dict[str, Any]]:
    """The cell's summary, None when there is none; an unreadable one reads as {'state': 'unreadable'}."""
    path = os.path.join(cell.folder, SUMMARY_NAME)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {"state": "unreadable"}
    return data if isinstance(data, dict) else {"state": "unreadable"}


def write_summary(cell: Cell, **fields: Any) -> Dict[str, Any]:
    """Write the cell's summary (atomically): its identity, then `fields`. Returns what was written."""
    from ftsam_plugin.io import atomic_write_text

    data = {"format": SUMMARY_FORMAT, "cell": cell.label, "record": cell.record, "defense": cell.defense,
            "group": cell.group, "settings": {k: cell.text(v) for k, v in cell.settings},
            "settings_sha256": cell.settings_digest, "command": cell.command(), **fields}
    atomic_write_text(os.path.join(cell.folder, SUMMARY_NAME), json.dumps(data, indent=1) + "\n")
    return data


def epochs_done(cell: Cell) -> Optional[int]:
    """Epochs in the cell's per-epoch CSV (the defense writes a row after each epoch), None before the first."""
    path = os.path.join(cell.folder, f"{cell.defense}_df.csv")
    try:
        with open(path, encoding="utf-8") as handle:
            rows = sum(1 for line in handle if line.strip()) - 1
    except OSError:
        return None
    return rows if rows > 0 else None


def final_metrics(cell: Cell) -> Optional[Dict[str, float]]:
    """ACC / ASR / RA of the `last` row of the cell's summary CSV."""
    from ftsam_plugin.leaderboard import read_summary as read_metrics

    return read_metrics(os.path.join(cell.folder, f"{cell.defense}_df_summary.csv"))
