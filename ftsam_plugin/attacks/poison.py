"""Choosing and poisoning samples (all-to-one), following BackdoorBench's rules and its stage1 order.

An attack's poisoning (`Poisoning`) says which samples to poison and how; `make_backdoor_datasets` runs it in
BackdoorBench's order: start(seed) -> train indicator -> train images (index order) -> test indicator -> test images.
`TriggerPoisoning` is ftsam's own (triggers.py); backdoorbench.py's `BackdoorBenchPoisoning` runs BackdoorBench's code.

ftsam's rule: train: round(pratio * N) samples drawn at random from the whole train set (target class included);
test: every sample whose label is not the target; the bd test set keeps only those. A clean-label attack
(BackdoorBench's sig, ctrl, lc) draws its train samples from the target class only and keeps their labels.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Protocol, Sequence, Tuple

import numpy as np
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.data.backdoor import BackdoorDataset

__all__ = ["Poisoning", "TriggerPoisoning", "select_poison_indices", "poison_image", "make_backdoor_dataset",
           "make_backdoor_datasets"]


def select_poison_indices(labels: Sequence[int], target: int, train: bool, pratio: Optional[float] = None,
                          rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """0/1 float indicator over `labels` of the samples to poison (all-to-one)."""
    labels = np.asarray(labels)
    indicator = np.zeros(len(labels))
    if train:
        if pratio is None or not 0.0 < float(pratio) <= 1.0:
            raise ValueError(f"pratio must be in (0, 1], got {pratio}")
        count = int(round(float(pratio) * len(labels)))
        rng = rng if rng is not None else np.random.default_rng(0)
        indicator[rng.choice(len(labels), size=count, replace=False)] = 1
    else:
        indicator[labels != target] = 1
    if indicator.sum() == 0:
        raise FtsamError(f"no sample to poison (pratio {pratio}, target {target}); raise --pratio or add data")
    return indicator


def poison_image(img: Image.Image, trigger: Callable, img_size: Sequence[int]) -> Image.Image:
    """Resize `img` to the dataset resolution if needed (as BackdoorBench does), then apply `trigger`."""
    h, w = int(img_size[0]), int(img_size[1])
    img = img.convert("RGB")
    if img.size != (w, h):
        img = TF.resize(img, [h, w])
    return Image.fromarray(trigger(np.asarray(img)))


class Poisoning(Protocol):
    """What `make_backdoor_datasets` needs from an attack."""

    clean_label: bool  # train samples come from the target class only and keep their labels

    def start(self, seed: int) -> None:
        """Called once before anything else (seeds the attack's randomness)."""

    def train_indicator(self, labels: Sequence[int]) -> np.ndarray:
        """0/1 over the train set: the samples to poison."""

    def test_indicator(self, labels: Sequence[int]) -> np.ndarray:
        """0/1 over the test set: the samples to poison (those whose label is not the target)."""

    def poison(self, img: Image.Image, label: int, index: int, train: bool):
        """The poisoned version (PIL image or HWC array) of clean sample `index` of the train or test set."""

    def bd_label(self, label: int) -> int:
        """The label a poisoned sample of class `label` gets."""


class TriggerPoisoning:
    """ftsam's own poisoning: `trigger` (triggers.py) applied at the dataset resolution, all-to-one to `target`, train
    samples drawn with NumPy's default_rng(seed) (ftsam's rule above)."""

    clean_label = False

    def __init__(self, trigger: Callable, target: int, pratio: float, img_size: Sequence[int]):
        self.trigger, self.target, self.pratio, self.img_size = trigger, int(target), float(pratio), img_size
        self.rng = np.random.default_rng(0)

    def start(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def train_indicator(self, labels: Sequence[int]) -> np.ndarray:
        return select_poison_indices(labels, self.target, True, self.pratio, self.rng)

    def test_indicator(self, labels: Sequence[int]) -> np.ndarray:
        return select_poison_indices(labels, self.target, False)

    def poison(self, img: Image.Image, label: int, index: int, train: bool) -> Image.Image:
        return poison_image(img, self.trigger, self.img_size)

    def bd_label(self, label: int) -> int:
        return self.target


def make_backdoor_dataset(raw, indicator: np.ndarray, poisoning: Poisoning, train: bool, save_folder_path: str,
                          folder: str, desc: str = "poison", progress: bool = True) -> BackdoorDataset:
    """Poison the samples of `raw` marked in `indicator`, in index order, writing PNGs to `folder` (stored as
    `save_folder_path`)."""
    dataset = BackdoorDataset(raw, save_folder_path=save_folder_path, folder=folder)
    for index in tqdm(np.flatnonzero(indicator), desc=desc, leave=False, disable=not progress):
        img, label = raw[int(index)]
        img = poisoning.poison(img, int(label), int(index), train)
        dataset.add_poisoned(int(index), img, poisoning.bd_label(int(label)), int(label))
    return dataset


def make_backdoor_datasets(raw_train, raw_test, poisoning: Poisoning, seed: int, record_dir: str, stored_prefix: str,
                           progress: bool = True) -> Tuple[BackdoorDataset, BackdoorDataset]:
    """bd_train (all of raw_train, some poisoned) and bd_test (only the poisoned, non-target test samples).

    Images go to `<record_dir>/bd_{train,test}_dataset/<orig_label>/<idx>.png`; the state stores the folders as
    `<stored_prefix>/bd_{train,test}_dataset` (e.g. './record/<name>', relative to the folder holding record/).
    """
    poisoning.start(seed)
    train_ind = poisoning.train_indicator(raw_train.targets)
    bd_train = make_backdoor_dataset(raw_train, train_ind, poisoning, True, f"{stored_prefix}/bd_train_dataset",
                                     os.path.join(record_dir, "bd_train_dataset"), desc="poison train",
                                     progress=progress)
    test_ind = poisoning.test_indicator(raw_test.targets)
    bd_test = make_backdoor_dataset(raw_test, test_ind, poisoning, False, f"{stored_prefix}/bd_test_dataset",
                                    os.path.join(record_dir, "bd_test_dataset"), desc="poison test",
                                    progress=progress)
    bd_test.subset(np.flatnonzero(test_ind))
    return bd_train, bd_test
