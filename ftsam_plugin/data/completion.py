"""Completion markers: which files of a result folder belong to one finished run.

A defense writes several files at its end (`defense_result.pt`, then `<name>_df_summary.csv`); a run killed between
two of them, or a rerun killed half-way, leaves a folder whose summary and result file come from different runs (or
one of them from no finished run at all). So a run marks its folder `running` before it writes anything there, and
`complete` after its last file, with the content fingerprint (size, sha256) of each file that belongs together.
A reader trusts the files only when the marker says `complete` and every fingerprint still matches; a folder
without a marker was not written by a run of this version (BackdoorBench's own defenses, older runs) and is read as
before.

    mark_running(folder)                                   # before the run's first write there
    ...                                                    # the run's writes
    mark_complete(folder, ["defense_result.pt", "ftsam_df_summary.csv"])   # after its last
    is_complete(folder, ["defense_result.pt", "ftsam_df_summary.csv"])     # True, False, or None (no marker)
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from ftsam_plugin.io import atomic_write_text, file_fingerprint

__all__ = ["MARKER_NAME", "mark_running", "mark_complete", "read_marker", "is_complete"]

MARKER_NAME = "ftsam_run.json"
FORMAT = "ftsam-run"


def _fingerprint(path: str) -> dict:
    full = file_fingerprint(path)
    return {"size": full["size"], "sha256": full["sha256"]}  # content only: a copied folder stays complete


def mark_running(folder: str) -> None:
    """Mark `folder` as being written by a run (whatever it held before is not a finished run any more)."""
    atomic_write_text(os.path.join(folder, MARKER_NAME),
                      json.dumps({"format": FORMAT, "state": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
                      + "\n")


def mark_complete(folder: str, names: Sequence[str]) -> None:
    """Mark `folder` as holding one finished run whose files are `names` (fingerprinted now); write it last."""
    files = {name: _fingerprint(os.path.join(folder, name)) for name in names}
    atomic_write_text(os.path.join(folder, MARKER_NAME),
                      json.dumps({"format": FORMAT, "state": "complete", "files": files,
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")


def read_marker(folder: str) -> Optional[dict]:
    """The marker of `folder`, None when there is none; an unreadable marker reads as a run that did not finish."""
    path = os.path.join(folder, MARKER_NAME)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return {"format": FORMAT, "state": "unreadable"}
    return marker if isinstance(marker, dict) else {"format": FORMAT, "state": "unreadable"}


def is_complete(folder: str, names: Sequence[str]) -> Optional[bool]:
    """Whether `folder` holds one finished run's `names`: None without a marker (not ours, or older), True when the
    marker says complete and lists each of `names` with its current fingerprint, False otherwise."""
    marker = read_marker(folder)
    if marker is None:
        return None
    files = marker.get("files")
    if marker.get("state") != "complete" or not isinstance(files, dict):
        return False
    for name in names:
        path = os.path.join(folder, name)
        try:
            if not os.path.isfile(path) or files.get(name) != _fingerprint(path):
                return False
        except OSError:
            return False
    return True
