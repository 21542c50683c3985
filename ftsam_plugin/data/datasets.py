"""Clean datasets in the layouts torchvision and BackdoorBench use, plus a plain image-folder layout.

Every raw dataset yields `(PIL.Image RGB, int label)` and has a `targets` list. Orders are deterministic
(sorted class folders, sorted file names), because attack records refer to samples by position.

Layouts, tried in this order for a dataset folder `root`:
  cifar10 / cifar100  torchvision archives: root/cifar-10-batches-py, root/cifar-100-python
  gtsrb               BackdoorBench's: root/Train/000NN/GT-000NN.csv (+ images), root/Test/GT-final_test.csv
  tiny                BackdoorBench's: root/tiny-imagenet-200/{train,val}/<wnid>/... (val in class folders, or
                      the original val/images + val_annotations.txt)
  any                 image folder: root/train/<class>/*.png|jpg, root/test/<class>/... (classes sorted by name)
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset

from ftsam_plugin.errors import FtsamError

__all__ = [
    "DatasetInfo",
    "DATASETS",
    "get_dataset_info",
    "ImageListDataset",
    "scan_image_folder",
    "detect_layout",
    "find_dataset_dir",
    "resolve_dataset_dir",
    "build_clean_datasets",
]

# Same extensions (case-insensitive) as torchvision's ImageFolder.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, with BackdoorBench's values."""

    name: str
    num_classes: int
    img_size: Tuple[int, int, int]  # (H, W, C)
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": DatasetInfo("gtsrb", 43, (32, 32, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tiny": DatasetInfo("tiny", 200, (64, 64, 3), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}


def get_dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` for `name` (lower-cased); FtsamError listing the known names otherwise."""
    key = str(name).lower()
    if key not in DATASETS:
        raise FtsamError(f"unknown dataset '{name}'; choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")  # convert() loads the pixels and returns a new image
    except Exception as exc:  # PIL's many types; the pre-flight check catches these before a run starts
        raise FtsamError(f"image {path} cannot be read ({type(exc).__name__}: {exc}); replace it") from None


class ImageListDataset(Dataset):
    """Images on disk, given as parallel lists of paths and labels; items are `(PIL RGB, int)`."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: Optional[Sequence[str]] = None):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.targets = [int(label) for label in labels]
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return _open_rgb(self.paths[index]), self.targets[index]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _list_class_files(class_dir: str) -> List[str]:
    # torchvision's order: os.walk sorted by directory, file names sorted inside each.
    files = []
    for dirpath, _, names in sorted(os.walk(class_dir, followlinks=True)):
        files.extend(os.path.join(dirpath, n) for n in sorted(names) if _is_image(n))
    return files


def scan_image_folder(root: str, classes: Optional[Sequence[str]] = None) -> Tuple[List[str], List[int], List[str]]:
    """List `root/<class>/**/<image>` in a deterministic order.

    Args:
        root: folder holding one sub-folder per class.
        classes: class names in label order; default: the sub-folders of `root`, sorted by name.

    Returns:
        (paths, labels, classes): paths grouped by class in label order, file names sorted.
    """
    if classes is None:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    index = {name: i for i, name in enumerate(classes)}
    present = sorted(e.name for e in os.scandir(root) if e.is_dir())
    unknown = [name for name in present if name not in index]
    if unknown:
        raise FtsamError(f"{root} has class folders {unknown[:5]} not among the train classes; fix the folder")
    paths, labels = [], []
    for name in classes:
        class_dir = os.path.join(root, name)
        if not os.path.isdir(class_dir):
            continue
        files = _list_class_files(class_dir)
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return paths, labels, list(classes)


# ------------------------------------------------------------------------------------------- layouts


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _is_torchvision(name: str, root: str) -> bool:
    return name in CIFAR_FOLDERS and os.path.isdir(os.path.join(root, CIFAR_FOLDERS[name]))


def _is_gtsrb(name: str, root: str) -> bool:
    return name == "gtsrb" and os.path.isfile(os.path.join(root, "Test", "GT-final_test.csv"))


def _is_tiny(name: str, root: str) -> bool:
    return name == "tiny" and os.path.isdir(os.path.join(root, "tiny-imagenet-200", "train"))


def _is_image_folder(name: str, root: str) -> bool:
    return os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test"))


def detect_layout(name: str, root: str) -> Optional[str]:
    """The layout found at `root` for dataset `name`: 'torchvision', 'gtsrb', 'tiny', 'folder' or None."""
    name = get_dataset_info(name).name
    return next((layout for layout, (found, _) in LAYOUTS.items() if found(name, root)), None)


def find_dataset_dir(name: str, candidates: Sequence[str]) -> Optional[str]:
    """The first of `candidates` that is a folder holding dataset `name` in a known layout, or None."""
    for candidate in candidates:
        if os.path.isdir(candidate) and detect_layout(name, candidate) is not None:
            return candidate
    return None


def resolve_dataset_dir(dataset_path: str, name: str) -> str:
    """The folder holding dataset `name`: `<dataset_path>/<name>` (BackdoorBench's rule), else `dataset_path`
    itself when it already holds a known layout (e.g. `../shared/data/cifar10-jpeg`)."""
    candidates = [os.path.join(dataset_path, name), dataset_path]
    found = find_dataset_dir(name, candidates)
    if found is not None:
        return found
    raise FtsamError(
        f"no {name} data found in {candidates[0]} or {candidates[1]}; pass --dataset_path pointing to a folder with "
        f"{name}/ (torchvision or BackdoorBench layout) or with train/<class>/ and test/<class>/ image folders"
    )


def _torchvision_cifar(info: DatasetInfo, root: str):
    from torchvision import datasets as tv

    name = info.name
    cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
    try:
        return cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as exc:
        raise FtsamError(f"{name} archive in {root} is incomplete or corrupt ({exc}); re-download it") from exc


def _read_gtsrb_csv(csv_path: str, folder: str) -> Tuple[List[str], List[int]]:
    # BackdoorBench's format: ';'-separated, one header row, file name in column 0, ClassId in column 7.
    paths, labels = [], []
    with open(csv_path, newline="") as handle:
        rows = csv.reader(handle, delimiter=";")
        next(rows, None)
        for row in rows:
            if not row:
                continue
            paths.append(os.path.join(folder, row[0]))
            labels.append(int(row[7]))
    return paths, labels


def _gtsrb(info: DatasetInfo, root: str):
    train_paths, train_labels = [], []
    for c in range(info.num_classes):
        folder = os.path.join(root, "Train", f"{c:05d}")
        csv_path = os.path.join(folder, f"GT-{c:05d}.csv")
        if not os.path.isfile(csv_path):
            raise FtsamError(f"GTSRB train annotation {csv_path} is missing; re-extract GTSRB (sh/gtsrb_download.sh)")
        p, l = _read_gtsrb_csv(csv_path, folder)
        train_paths += p
        train_labels += l
    test_dir = os.path.join(root, "Test")
    test_paths, test_labels = _read_gtsrb_csv(os.path.join(test_dir, "GT-final_test.csv"), test_dir)
    return ImageListDataset(train_paths, train_labels), ImageListDataset(test_paths, test_labels)


def _tiny(info: DatasetInfo, root: str):
    base = os.path.join(root, "tiny-imagenet-200")
    train_paths, train_labels, classes = scan_image_folder(os.path.join(base, "train"))
    val = os.path.join(base, "val")
    annotations = os.path.join(val, "val_annotations.txt")
    if os.path.isdir(os.path.join(val, "images")) and os.path.isfile(annotations):
        # original layout: BackdoorBench moves these files into class folders; read them in that order instead
        index = {name: i for i, name in enumerate(classes)}
        items = []
        with open(annotations) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 2:
                    items.append((index[parts[1]], parts[0]))
        items.sort()
        val_paths = [os.path.join(val, "images", f) for _, f in items]
        val_labels = [label for label, _ in items]
    else:
        val_paths, val_labels, _ = scan_image_folder(val, classes)
    return ImageListDataset(train_paths, train_labels, classes), ImageListDataset(val_paths, val_labels, classes)


def _image_folder(info: DatasetInfo, root: str):
    train_paths, train_labels, classes = scan_image_folder(os.path.join(root, "train"))
    test_paths, test_labels, _ = scan_image_folder(os.path.join(root, "test"), classes)
    return ImageListDataset(train_paths, train_labels, classes), ImageListDataset(test_paths, test_labels, classes)


# layout name -> (is it at `root` for dataset `name`?, builder(info, root) -> (train, test)); tried in this order
LAYOUTS: Dict[str, Tuple[Callable[[str, str], bool], Callable[[DatasetInfo, str], tuple]]] = {
    "torchvision": (_is_torchvision, _torchvision_cifar),
    "gtsrb": (_is_gtsrb, _gtsrb),
    "tiny": (_is_tiny, _tiny),
    "folder": (_is_image_folder, _image_folder),
}


def build_clean_datasets(name: str, root: str):
    """Raw clean train and test sets of dataset `name` stored at `root` (the dataset's own folder).

    Args:
        name: 'cifar10', 'cifar100', 'gtsrb' or 'tiny'.
        root: e.g. './data/cifar10' (see the module docstring for the layouts).

    Returns:
        (train, test): datasets yielding `(PIL.Image RGB, int label)`, each with a `targets` list.
    """
    info = get_dataset_info(name)
    root = os.fspath(root)
    layout = detect_layout(info.name, root) if os.path.isdir(root) else None
    if layout is None:
        raise FtsamError(
            f"no {info.name} data found in {root}; expected the torchvision/BackdoorBench layout or "
            f"train/<class>/ and test/<class>/ image folders (pass the right dataset path)"
        )
    train, test = LAYOUTS[layout][1](info, root)
    for split in (train, test):
        bad = [t for t in set(split.targets) if not 0 <= int(t) < info.num_classes]
        if bad:
            raise FtsamError(f"{root} has labels {sorted(bad)[:5]} outside 0..{info.num_classes - 1} for {info.name}")
    if len(train) == 0 or len(test) == 0:
        raise FtsamError(f"{root} holds no {'train' if len(train) == 0 else 'test'} images; check the dataset folder")
    return train, test
