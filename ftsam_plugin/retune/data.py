"""The retuning set: a uniform random draw of the clean training set with a few poisoned training images put in.

As in the reference script (`ft_poison.py`): int(N * split_ratio) clean training samples drawn uniformly without
replacement (in random order), passed once through the record's train transform (the reference builds a list of
transformed tensors, so each sample keeps one augmentation for all epochs), then the first `poison_num` of them
replaced by poisoned training images of the record, with their backdoor label (the target, all-to-one) and the
record's test transform (no augmentation). The control (`poison_num` 0) gets the same clean samples, augmented
the same way: the clean draw, the poisoned draw and the augmentation each have their own seed stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ftsam_plugin.errors import FtsamError

from .settings import RetuneSettings

__all__ = ["RetuneSet", "build_retune_set", "draw_retune_indices", "poisoned_train_positions"]


@dataclass
class RetuneSet:
    """The materialised retuning data. `index[i]` is the clean-train index of a clean sample, or the bd_train
    position of a poisoned one (`poisoned[i]` True)."""

    images: torch.Tensor  # (n, C, H, W), transformed
    labels: torch.Tensor  # (n,) int64
    poisoned: torch.Tensor  # (n,) bool
    index: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.images, self.labels)


def _unwrapped(dataset):
    """The dataset under a transform wrapper (ours or BackdoorBench's: both expose `wrapped_dataset`)."""
    return getattr(dataset, "wrapped_dataset", dataset)


def poisoned_train_positions(record: dict) -> np.ndarray:
    """Positions in the record's bd_train of its poisoned samples (empty when the record has no bd_train)."""
    bd_train = record.get("bd_train")
    if bd_train is None:
        return np.zeros(0, dtype=np.int64)
    raw = _unwrapped(bd_train)
    indicator = np.asarray(raw.poison_indicator)
    order = np.asarray(raw.original_index_array, dtype=np.int64)
    return np.flatnonzero(indicator[order] == 1)


def _streams(seed: int):
    """Independent generators for the clean draw, the poisoned draw and the augmentation seed."""
    clean, poison, augment = np.random.SeedSequence(seed).spawn(3)
    return (np.random.default_rng(clean), np.random.default_rng(poison),
            int(augment.generate_state(1, dtype=np.uint32)[0]))


def _test_transform(record: dict):
    """The record's test transform (both record readers put it on clean_test)."""
    transform = getattr(record["clean_test"], "wrap_img_transform", None)
    if transform is None:
        from ftsam_plugin.data.transforms import get_transform

        transform = get_transform(record["clean_data"], train=False, img_size=record.get("img_size"))
    return transform


def _check_sizes(settings: RetuneSettings, n_clean: int, n: int, n_poisoned: int) -> None:
    ratio = settings.split_ratio
    if n < 1:
        raise FtsamError(f"--split_ratio {ratio} gives int({n_clean}*{ratio}) = 0 retuning samples; raise "
                         f"--split_ratio")
    if settings.poison_num > n:
        raise FtsamError(f"--poison_num {settings.poison_num} is more than the {n} retuning samples "
                         f"(int({n_clean}*{ratio})); lower --poison_num or raise --split_ratio")
    if settings.poison_num > n_poisoned:
        raise FtsamError(f"--poison_num {settings.poison_num} is more than the record's {n_poisoned} poisoned "
                         f"training images; lower --poison_num (0 runs the clean control)")


def draw_retune_indices(settings: RetuneSettings, n_clean: int, poisoned_positions: Sequence[int]):
    """The seeded draws of a retuning set: (clean-train indices, bd_train positions of the poisoned images put in,
    seed of the augmentation). Raises FtsamError when the sizes do not fit (see build_retune_set)."""
    n = int(n_clean * settings.split_ratio)
    _check_sizes(settings, n_clean, n, len(poisoned_positions))
    clean_rng, poison_rng, augment_seed = _streams(settings.random_seed)
    drawn = clean_rng.choice(n_clean, n, replace=False)
    picked = poison_rng.choice(np.asarray(poisoned_positions), settings.poison_num, replace=False)
    return [int(i) for i in drawn], [int(p) for p in picked], augment_seed


def build_retune_set(record: dict, settings: RetuneSettings) -> RetuneSet:
    """The retuning set of `record` (a `load_attack_result` dict) for `settings` (see the module docstring).

    Raises:
        FtsamError: the draw is empty, or `poison_num` exceeds it or the record's poisoned training images.
    """
    clean = record["clean_train"]
    drawn, picked, augment_seed = draw_retune_indices(settings, len(clean), poisoned_train_positions(record))
    images: List[torch.Tensor] = []
    labels: List[int] = []
    with torch.random.fork_rng(devices=[]):  # the train transform draws from torch's global generator
        torch.manual_seed(augment_seed)
        for i in drawn:  # every drawn sample is transformed, so the poisoned ones do not shift the augmentation
            image, label = clean[i][:2]
            images.append(image)
            labels.append(int(label))
    index = list(drawn)
    poisoned = [False] * len(drawn)
    if picked:
        bd_raw = _unwrapped(record["bd_train"])
        test_transform = _test_transform(record)
        for slot, position in enumerate(picked):
            image, bd_label, _, flag = bd_raw[position][:4]
            if not flag:
                raise FtsamError(f"bd_train position {position} is marked poisoned but its item is clean; "
                                 f"re-create the attack record")
            images[slot] = test_transform(image)
            labels[slot], index[slot], poisoned[slot] = int(bd_label), position, True
    return RetuneSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64),
                     torch.tensor(poisoned, dtype=torch.bool), torch.tensor(index, dtype=torch.int64))
