"""BackdoorBench's image transforms: Resize, (train) RandomCrop(padding 4) + HorizontalFlip for cifar10 only,
ToTensor, Normalize with the dataset's mean/std (normalisation lives in the transform, not in the model)."""

from __future__ import annotations

from typing import Optional, Sequence

from torchvision import transforms as T

from .datasets import get_dataset_info

__all__ = ["get_transform", "get_normalization"]


def get_normalization(dataset_name: str) -> T.Normalize:
    """`Normalize(mean, std)` of the dataset (gtsrb: identity, mean 0 / std 1)."""
    info = get_dataset_info(dataset_name)
    return T.Normalize(list(info.mean), list(info.std))


def get_transform(dataset_name: str, train: bool, img_size: Optional[Sequence[int]] = None, crop_padding: int = 4):
    """The train or test transform BackdoorBench uses for `dataset_name`.

    Args:
        dataset_name: 'cifar10', 'cifar100', 'gtsrb' or 'tiny'.
        train: add the random augmentation (RandomCrop for every dataset, HorizontalFlip for cifar10).
        img_size: (H, W[, C]); default: the dataset's size.
        crop_padding: RandomCrop padding.

    Returns:
        A `torchvision.transforms.Compose` mapping a PIL image to a normalised float tensor (C, H, W).
    """
    info = get_dataset_info(dataset_name)
    h, w = (img_size or info.img_size)[:2]
    steps = [T.Resize((int(h), int(w)))]
    if train:
        steps.append(T.RandomCrop((int(h), int(w)), padding=crop_padding))
        if info.name == "cifar10":
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), get_normalization(info.name)]
    return T.Compose(steps)
