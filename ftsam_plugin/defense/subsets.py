"""The clean subset a defense fine-tunes on: an --index file, or a seeded draw registered by name; and the fixed
test subsets it may evaluate on during the run (--eval_subset).

A protocol names its draw (`SUBSET_DRAWS`); every draw is `draw(dataset, num_classes, ratio, seed) -> indices`
on the raw (PIL, label) clean training set.
"""

from __future__ import annotations

import random
from typing import List, Sequence, Tuple

import numpy as np

from ftsam_plugin.errors import FtsamError

__all__ = ["SUBSET_DRAWS", "class_balanced_subset", "choose_by_class", "choose_index", "dataset_labels",
           "fixed_eval_subsets", "raw_dataset", "read_index_file"]


def raw_dataset(dataset):
    """The raw (PIL, label) dataset under a transform wrapper."""
    return getattr(dataset, "wrapped_dataset", dataset) if hasattr(dataset, "wrap_img_transform") else dataset


def dataset_labels(dataset) -> List[int]:
    """Every sample's label, from the dataset's label list when it has one (`targets`; BackdoorBench's GTSRB:
    `labels`), so no image is opened then."""
    for name in ("targets", "labels"):
        targets = getattr(dataset, name, None)
        if targets is not None and len(targets) == len(dataset):
            return [int(t) for t in targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # slow path: reads every item


def _per_class(labels: np.ndarray, num_classes: int, ratio: float) -> int:
    per_class = int(len(labels) * ratio / num_classes)
    if per_class < 1:
        raise FtsamError(f"ratio {ratio} gives int({len(labels)}*{ratio}/{num_classes}) = 0 samples per class; "
                         f"raise --ratio")
    return per_class


def _class_pools(labels: np.ndarray, num_classes: int, per_class: int):
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise FtsamError(f"class {c} has {len(pool)} training samples, fewer than the {per_class} a "
                             f"class-balanced subset needs; lower --ratio or pass --index")
        yield pool


def class_balanced_subset(labels: Sequence[int], num_classes: int, ratio: float, seed: int) -> List[int]:
    """int(N*ratio/num_classes) indices per class, without replacement, classes in order, each class's indices
    sorted; drawn with `np.random.default_rng(seed)`."""
    labels = np.asarray(labels, dtype=np.int64)
    per_class = _per_class(labels, num_classes, ratio)
    rng = np.random.default_rng(seed)
    chosen: List[int] = []
    for pool in _class_pools(labels, num_classes, per_class):
        chosen += sorted(rng.choice(pool, per_class, replace=False).tolist())
    return [int(i) for i in chosen]


def choose_by_class(labels: Sequence[int], num_classes: int, ratio: float, seed: int) -> List[int]:
    """BackdoorBench's `choose_by_class` after `fix_random(seed)`: the same per-class counts, drawn in its order
    from the legacy global-style RNG (`np.random.RandomState(seed)`), unsorted."""
    labels = np.asarray(labels, dtype=np.int64)
    per_class = _per_class(labels, num_classes, ratio)
    rng = np.random.RandomState(seed)
    chosen: List[int] = []
    for pool in _class_pools(labels, num_classes, per_class):
        chosen += rng.choice(pool, per_class, replace=False).tolist()
    return [int(i) for i in chosen]


def choose_index(n: int, ratio: float, seed: int) -> List[int]:
    """BackdoorBench's `choose_index` after `fix_random(seed)`: int(n*ratio) indices drawn uniformly without
    replacement (`random.sample`), in draw order."""
    count = int(n * ratio)
    if count < 1:
        raise FtsamError(f"ratio {ratio} gives int({n}*{ratio}) = 0 samples; raise --ratio")
    return [int(i) for i in random.Random(seed).sample(range(n), count)]


def read_index_file(path: str, n: int) -> List[int]:
    """Indices (one integer per line, `#` starts a comment) from an --index file, checked against the dataset
    size `n`; each index at most once."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise FtsamError(f"index file {path} not found; fix --index") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FtsamError(f"cannot read index file {path} ({getattr(exc, 'strerror', None) or 'not UTF-8 text'}); "
                         f"fix --index") from None
    tokens = [token for line in lines for token in line.split("#", 1)[0].split()]
    if not tokens:
        raise FtsamError(f"index file {path} is empty; fix --index")
    try:
        idx = [int(token) for token in tokens]
    except ValueError:
        raise FtsamError(f"index file {path} must hold one integer per line; fix --index") from None
    if min(idx) < 0 or max(idx) >= n:
        raise FtsamError(f"index file {path} holds indices outside 0..{n - 1}; it belongs to another dataset")
    seen = set()
    for i in idx:
        if i in seen:
            raise FtsamError(f"index file {path} lists index {i} more than once; list each sample once")
        seen.add(i)
    return idx


def _by_labels(draw):
    return lambda dataset, num_classes, ratio, seed: draw(dataset_labels(dataset), num_classes, ratio, seed)


# name -> draw(raw dataset, num_classes, ratio, seed) -> indices
SUBSET_DRAWS = {
    "class_balanced": _by_labels(class_balanced_subset),
    "choose_by_class": _by_labels(choose_by_class),
    "uniform": lambda dataset, num_classes, ratio, seed: choose_index(len(dataset), ratio, seed),
}


def fixed_eval_subsets(clean_test, bd_test, total: int) -> Tuple[List[int], List[int]]:
    """The fixed test subsets of `--eval_subset total` (also the snapshots' in benchmarks/lasting.py): the first
    total // classes clean test images of each class, and the first total // sources poisoned test images of each
    original class (`bd_test.original_index_array` points into the clean test set), all in index order. No draw:
    every run and seed is measured on the same images."""
    clean = np.asarray(dataset_labels(raw_dataset(clean_test)), dtype=np.int64)
    bd = clean[np.asarray(bd_test.original_index_array, dtype=np.int64)]
    chosen = []
    for labels in (clean, bd):
        classes = np.unique(labels)
        per = total // max(1, len(classes))
        if per < 1:
            raise FtsamError(f"eval_subset {total} is fewer than one test image per class ({len(classes)} classes); "
                             f"raise --eval_subset or leave it out")
        chosen.append(sorted(int(i) for c in classes for i in np.flatnonzero(labels == c)[:per]))
    return chosen[0], chosen[1]
