"""Where a defense reads its attack record and writes its outputs (BackdoorBench's `record/<name>/` layout)."""

from __future__ import annotations

import os
from typing import Optional

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import make_output_folder  # re-exported: where the defense pipeline has always found it

__all__ = ["resolve_record", "resolve_defense_result", "make_output_folder", "peek_record_dataset"]


def resolve_record(result_file) -> str:
    """A record folder: `result_file` itself if it holds attack_result.pt, else ./record/<result_file>."""
    if result_file is None:
        raise FtsamError("no record given; pass --result_file <name under ./record/ or a record folder>")
    text = str(result_file)
    if text.endswith("attack_result.pt") and os.path.isfile(text):
        return os.path.dirname(os.path.abspath(text)) or "."
    candidates = [text] if os.path.isabs(text) else [text, os.path.join("record", text)]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "attack_result.pt")):
            return os.path.normpath(candidate)
    folders = [c for c in candidates if os.path.isdir(c)]
    if folders:
        raise FtsamError(f"no attack_result.pt in record folder '{folders[0]}' (did the attack finish?); pass the "
                         f"folder of a finished attack, or re-create it with `ftsam attack`")
    raise FtsamError(f"no attack_result.pt: record folder {' or '.join(repr(c) for c in candidates)} does not exist; "
                     f"pass --result_file <record name under ./record/ or a record folder> (make one with "
                     f"`ftsam attack`)")


def resolve_defense_result(path) -> str:
    """The defense_result.pt that `--checkpoint_path` names: the file, a folder holding it, or (as BackdoorBench's
    ft-sam.py reads it) a folder under ./record/, e.g. `badnet_0_1/defense/ft`."""
    text = str(path)
    if os.path.isfile(text):
        return text
    candidates = [text] if os.path.isabs(text) else [text, os.path.join("record", text)]
    for candidate in candidates:
        file = os.path.join(candidate, "defense_result.pt")
        if os.path.isfile(file):
            return file
    raise FtsamError(f"--checkpoint_path {text}: no defense_result.pt in {' or '.join(repr(c) for c in candidates)}; "
                     f"pass a defense result folder (e.g. badnet_0_1/defense/ft, under ./record/) or its "
                     f"defense_result.pt")


def peek_record_dataset(result_file) -> Optional[str]:
    """The dataset a record was made on (for choosing the packaged YAML), without loading its data."""
    from ftsam_plugin.data.records import check_record_meta
    from ftsam_plugin.io import safe_load

    pt = os.path.join(resolve_record(result_file), "attack_result.pt")
    return check_record_meta(safe_load(pt, what="attack result"), pt)["clean_data"]
