"""Which data a run trains on, as a fingerprint a checkpoint keeps and `--resume` compares.

`data_identity` records the resolved dataset folder, the clean subset's file names (relative to that folder; the
item indices for data held in memory), their labels and a content digest per file (from the pre-flight image
check's read, so it costs nothing more; for in-memory data, of the pixel array). `identity_change` says, in
words, what differs between two fingerprints: another folder, other files, other labels, or changed contents.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np

from .image_check import clean_files, digest

__all__ = ["data_identity", "identity_change"]


def data_identity(result: Mapping, indices: Sequence[int], digests: Mapping[str, str]) -> dict:
    """The fingerprint of the clean subset `indices` of a loaded record (`digests`: {path: digest} of its files).

    Returns:
        {"dataset_path", "names", "labels", "digests"}: plain strings and ints (checkpoint-safe).
    """
    data_dir = os.path.realpath(str(result.get("data_path") or ""))
    raw = getattr(result["clean_train"], "wrapped_dataset", result["clean_train"])
    labels = getattr(raw, "targets", None)
    files = clean_files(raw, indices)
    if files:
        names = [os.path.relpath(os.path.realpath(p), data_dir) for p in files]
        sums = [digests.get(p) or "" for p in files]
    else:  # held in memory (torchvision's CIFAR arrays): the items' pixels
        names = [str(int(i)) for i in indices]
        pixels = getattr(raw, "data", None)
        sums = [digest(np.ascontiguousarray(pixels[int(i)]).tobytes()) if isinstance(pixels, np.ndarray) else ""
                for i in indices]
    return {
        "dataset_path": data_dir,
        "names": names,
        "labels": [int(labels[int(i)]) for i in indices] if labels is not None else [],
        "digests": sums,
    }


def identity_change(old: Mapping, new: Mapping) -> Optional[str]:
    """What differs between two `data_identity` fingerprints, in words; None when they match."""
    if old.get("dataset_path") != new.get("dataset_path"):
        return f"the data came from {old.get('dataset_path')}, now from {new.get('dataset_path')}"
    old_names, new_names = list(old.get("names", [])), list(new.get("names", []))
    if old_names != new_names:
        first = next((i for i, (a, b) in enumerate(zip(old_names, new_names)) if a != b),
                     min(len(old_names), len(new_names)))
        was = old_names[first] if first < len(old_names) else "nothing"
        now = new_names[first] if first < len(new_names) else "nothing"
        return f"the clean subset's files differ (item {first}: {was} then, {now} now)"
    for what, key in (("label", "labels"), ("content", "digests")):
        changed = [n for n, a, b in zip(new_names, old.get(key, []), new.get(key, [])) if a != b]
        if changed:
            return f"the {what} of {len(changed)} clean training image(s) changed (first: {changed[0]})"
    return None
