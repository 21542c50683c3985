"""Choosing and poisoning samples (all-to-one), following BackdoorBench's rules.

Train: round(pratio * N) samples drawn at random from the whole train set (target class included).
Test: every sample whose label is not the target; the bd test set keeps only those.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.data.backdoor import BackdoorDataset

__all__ = ["select_poison_indices", "poison_image", "make_backdoor_dataset", "make_backdoor_datasets"]


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


def make_backdoor_dataset(raw, indicator: np.ndarray, trigger: Callable, target: int, img_size: Sequence[int],
                          save_folder_path: str, folder: str, desc: str = "poison",
                          progress: bool = True) -> BackdoorDataset:
    """Poison the samples of `raw` marked in `indicator`, writing PNGs to `folder` (stored as `save_folder_path`)."""
    dataset = BackdoorDataset(raw, save_folder_path=save_folder_path, folder=folder)
    for index in tqdm(np.flatnonzero(indicator), desc=desc, leave=False, disable=not progress):
        img, label = raw[int(index)]
        dataset.add_poisoned(int(index), poison_image(img, trigger, img_size), target, int(label))
    return dataset


def make_backdoor_datasets(raw_train, raw_test, trigger: Callable, target: int, pratio: float,
                           img_size: Sequence[int], record_dir: str, stored_prefix: str,
                           rng: Optional[np.random.Generator] = None,
                           progress: bool = True) -> Tuple[BackdoorDataset, BackdoorDataset]:
    """bd_train (all of raw_train, some poisoned) and bd_test (only the poisoned, non-target test samples).

    Images go to `<record_dir>/bd_{train,test}_dataset/<orig_label>/<idx>.png`; the state stores the folders as
    `<stored_prefix>/bd_{train,test}_dataset` (e.g. './record/<name>', relative to the folder holding record/).
    """
    train_ind = select_poison_indices(raw_train.targets, target, True, pratio, rng)
    test_ind = select_poison_indices(raw_test.targets, target, False)
    bd_train = make_backdoor_dataset(raw_train, train_ind, trigger, target, img_size,
                                     f"{stored_prefix}/bd_train_dataset", os.path.join(record_dir, "bd_train_dataset"),
                                     desc="poison train", progress=progress)
    bd_test = make_backdoor_dataset(raw_test, test_ind, trigger, target, img_size,
                                    f"{stored_prefix}/bd_test_dataset", os.path.join(record_dir, "bd_test_dataset"),
                                    desc="poison test", progress=progress)
    bd_test.subset(np.flatnonzero(test_ind))
    return bd_train, bd_test
