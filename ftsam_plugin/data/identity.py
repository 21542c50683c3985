"""Which model and data a run starts from, as a fingerprint a checkpoint keeps and `--resume` compares.

`weights_digest` identifies the backdoored model by its weights (names, shapes, dtypes and bytes), so two records
that differ only in their weights never share a checkpoint, wherever the record lives. `data_identity` records the
resolved dataset folder, the clean subset's file names (relative to that folder; the item indices for data held in
memory), their labels and a content digest per file (from the pre-flight image check's read, so it costs nothing
more; for in-memory data, of the pixel array). `identity_change` says, in
words, what differs between two fingerprints: another folder, other files, other labels, or changed contents.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np

from .image_check import clean_files, digest

__all__ = ["data_identity", "identity_change", "weights_digest", "tensor_digest"]


def tensor_digest(value, digest=None):
    """Feed a nested structure (dicts in key order, lists, tensors with dtype and shape, plain values) into a
    hashlib object (default sha256); returns it. Tensors are hashed by their bytes, so a flipped bit shows."""
    import hashlib

    import torch

    digest = hashlib.sha256() if digest is None else digest
    if isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(repr(str(key)).encode())
            tensor_digest(value[key], digest)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            tensor_digest(item, digest)
        digest.update(b"]")
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    return digest


def weights_digest(model) -> str:
    """sha256 of a model's weights (an nn.Module or a state dict; a DDP `module.` prefix is ignored)."""
    state = model.state_dict() if hasattr(model, "state_dict") else model
    plain = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return tensor_digest(plain).hexdigest()


def data_identity(result: Mapping, indices: Sequence[int], digests: Mapping[str, str],
                  model: Optional[str] = None) -> dict:
    """The fingerprint of the clean subset `indices` of a loaded record (`digests`: {path: digest} of its files)
    and of the backdoored model (`model`: its `weights_digest`, taken before training changes the weights).

    Returns:
        {"dataset_path", "names", "labels", "digests"[, "model"]}: plain strings and ints (checkpoint-safe).
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
    out = {
        "dataset_path": data_dir,
        "names": names,
        "labels": [int(labels[int(i)]) for i in indices] if labels is not None else [],
        "digests": sums,
    }
    if model is not None:
        out["model"] = model
    return out


def identity_change(old: Mapping, new: Mapping) -> Optional[str]:
    """What differs between the data of two `data_identity` fingerprints, in words; None when they match (the
    model digest is compared by the checkpoint's reader, whose message differs)."""
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
