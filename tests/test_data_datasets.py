"""Clean datasets: deterministic image-folder order, BackdoorBench's GTSRB layout, transforms."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ftsam_plugin.data.datasets import DATASETS, build_clean_datasets, resolve_dataset_dir, scan_image_folder
from ftsam_plugin.data.transforms import get_transform
from ftsam_plugin.errors import FtsamError
from helpers import make_gtsrb_folder, make_image_folder


def test_image_folder_order_is_sorted_classes_then_sorted_files(tmp_path):
    root = make_image_folder(tmp_path / "ds", n_per_class=3, classes=["zebra", "ant", "moose"], n_test_per_class=2)
    train, test = build_clean_datasets("cifar10", root)
    # independent reference: walk the folders ourselves
    expected = [(os.path.join(root, "train", c, f), i)
                for i, c in enumerate(sorted(["zebra", "ant", "moose"]))
                for f in sorted(os.listdir(root / "train" / c))]
    assert [(p, l) for p, l in zip(train.paths, train.targets)] == expected
    assert train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(test) == 6
    img, label = train[4]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 1
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(expected[4][0]).convert("RGB")))


def test_test_split_uses_train_class_order(tmp_path):
    root = make_image_folder(tmp_path / "ds", n_per_class=1, classes=["b", "c"])
    (root / "test" / "b").rename(root / "test" / "b_gone")
    with pytest.raises(FtsamError, match="not among the train classes"):
        build_clean_datasets("cifar10", root)


def test_gtsrb_layout_reads_csv_labels(tmp_path):
    root = make_gtsrb_folder(tmp_path / "gtsrb", n_train_per_class=1, n_test=50, vary_size=True)
    train, test = build_clean_datasets("gtsrb", root)
    assert len(train) == 43 and train.targets == list(range(43))
    assert len(test) == 50 and test.targets == [j % 43 for j in range(50)]
    assert train[5][0].size != train[0][0].size  # original sizes kept; the transform resizes


def test_resolve_dataset_dir_accepts_parent_or_folder(tmp_path):
    make_image_folder(tmp_path / "data" / "cifar10", n_per_class=1, classes=2)
    assert resolve_dataset_dir(str(tmp_path / "data"), "cifar10") == str(tmp_path / "data" / "cifar10")
    assert resolve_dataset_dir(str(tmp_path / "data" / "cifar10"), "cifar10") == str(tmp_path / "data" / "cifar10")
    with pytest.raises(FtsamError, match="no cifar100 data"):
        resolve_dataset_dir(str(tmp_path / "data"), "cifar100")


def test_missing_or_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(FtsamError, match="no cifar10 data"):
        build_clean_datasets("cifar10", tmp_path)
    with pytest.raises(FtsamError, match="unknown dataset"):
        build_clean_datasets("mnist2", tmp_path)


def test_labels_outside_the_dataset_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "ds", n_per_class=1, classes=11)
    with pytest.raises(FtsamError, match="outside 0..9"):
        build_clean_datasets("cifar10", root)


def test_scan_ignores_non_images(tmp_path):
    root = make_image_folder(tmp_path / "ds", n_per_class=2, classes=1)
    (root / "train" / "c00" / "notes.txt").write_text("x")
    paths, labels, classes = scan_image_folder(str(root / "train"))
    assert len(paths) == 2 and classes == ["c00"]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_test_transform_normalises_with_dataset_stats(name):
    info = DATASETS[name]
    h, w, _ = info.img_size
    img = Image.fromarray(np.full((h + 3, w + 1, 3), 128, dtype=np.uint8))
    x = get_transform(name, train=False)(img)
    expected = (torch.full((3,), 128 / 255) - torch.tensor(info.mean)) / torch.tensor(info.std)
    assert x.shape == (3, h, w)
    torch.testing.assert_close(x[:, 5, 5], expected.float())


def test_train_transform_matches_backdoorbench():
    names = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    assert names(get_transform("cifar10", True)) == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert names(get_transform("gtsrb", True)) == ["Resize", "RandomCrop", "ToTensor", "Normalize"]
    assert names(get_transform("tiny", False)) == ["Resize", "ToTensor", "Normalize"]
