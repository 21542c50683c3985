"""Backdoor datasets with BackdoorBench's item layout and saved state.

`BackdoorDataset` is a clean raw dataset plus a set of poisoned samples stored as PNG files. Items are the
5-tuple `(PIL image, label, original index, poison flag, original label)`; with `getitem_all_switch` the
label and the original label swap places (the RA view). `retrieve_state()` returns exactly the dict
BackdoorBench's `prepro_cls_DatasetBD_v2.retrieve_state()` returns, so BackdoorBench reads our records.
`TransformDataset` applies the image transform and forwards other attributes, like BackdoorBench's
`dataset_wrapper_with_transform`.
"""

from __future__ import annotations

import copy
import io
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import atomic_write_bytes

__all__ = ["BackdoorDataset", "TransformDataset", "resolve_image_folder", "is_inside", "stored_image_path",
           "original_label_view"]

SAVE_FILE_FORMAT = ".png"


def resolve_image_folder(stored: Optional[str], bases: Sequence[str], fallback: Optional[str] = None,
                         inside: Sequence[str] = ()) -> Optional[str]:
    """Where a stored (possibly relative) poisoned-image folder is on this machine.

    Tries `stored` if absolute, then `stored` joined to each of `bases`, then `fallback`; returns the first
    existing folder that lies in one of the `inside` folders (any, when empty), or None. The test is on the path
    as given, symlinks not followed: a record folder made of symlinks to another record's files is still valid.
    """
    if stored is None:
        return None
    candidates = [stored] if os.path.isabs(stored) else [os.path.join(b, stored) for b in bases]
    if fallback is not None:
        candidates.append(fallback)
    for candidate in candidates:
        if os.path.isdir(candidate) and (not inside or is_inside(candidate, inside)):
            return os.path.normpath(candidate)
    return None


def is_inside(path: str, folders: Sequence[str]) -> bool:
    """Whether `path` (made absolute and normalised, symlinks not followed) is one of `folders` or below one."""
    target = os.path.normpath(os.path.abspath(path))
    for folder in folders:
        root = os.path.normpath(os.path.abspath(folder))
        if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def stored_image_path(folder: str, stored: str) -> str:
    """Where a stored poisoned-image path is under `folder`: stored paths are always
    `<save_folder_path>/<orig_label>/<idx>.png`, so the last two parts are kept."""
    return os.path.join(folder, *str(stored).replace("\\", "/").split("/")[-2:])


def original_label_view(dataset):
    """The RA view of a 5-tuple backdoor dataset (ours or BackdoorBench's prepro_cls_DatasetBD_v2): a shallow copy
    with `getitem_all_switch` set, so field 1 holds the original label."""
    view = copy.copy(dataset)
    view.getitem_all_switch = True
    return view


class BackdoorDataset(Dataset):
    """A raw dataset with some samples replaced by poisoned images (like BackdoorBench's prepro_cls_DatasetBD_v2).

    Args:
        dataset: raw clean dataset yielding `(img, label)`.
        save_folder_path: the folder name stored in the state (e.g. './record/<name>/bd_train_dataset', relative
            to the folder that holds `record/`); item paths are `<save_folder_path>/<orig_label>/<idx>.png`.
        folder: where that folder is on disk now (default: `save_folder_path`).
    """

    def __init__(self, dataset, save_folder_path: Optional[str] = None, folder: Optional[str] = None):
        self.dataset = dataset
        n = len(dataset)
        self.poison_indicator = np.zeros(n)  # float 0/1, as BackdoorBench stores it
        self.original_index_array = np.arange(n)
        self.save_folder_path = save_folder_path
        self.save_file_format = SAVE_FILE_FORMAT
        self.data_dict: Dict[int, dict] = {}
        self.getitem_all = True
        self.getitem_all_switch = False
        self._folder = folder if folder is not None else save_folder_path

    # ------------------------------------------------------------------ building
    def add_poisoned(self, index: int, img, bd_label: int, orig_label: int) -> None:
        """Store poisoned sample `index` (a PIL image or HWC uint8 array) as a PNG and mark it poisoned."""
        index, bd_label, orig_label = int(index), int(bd_label), int(orig_label)
        if not 0 <= index < len(self.poison_indicator):
            raise ValueError(f"index {index} outside 0..{len(self.poison_indicator) - 1}")
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img.astype(np.uint8))
        if self.save_folder_path is None:
            self.data_dict[index] = (img, bd_label, orig_label)  # in RAM, as BackdoorBench without a folder
        else:
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            atomic_write_bytes(os.path.join(self._folder, str(orig_label), f"{index}{SAVE_FILE_FORMAT}"),
                               buffer.getvalue())
            self.data_dict[index] = {
                "path": f"{self.save_folder_path}/{orig_label}/{index}{SAVE_FILE_FORMAT}",
                "other_info": [bd_label, orig_label],
            }
        self.poison_indicator[index] = 1

    def subset(self, indices) -> "BackdoorDataset":
        """Keep only positions `indices` of the current view (in place, like BackdoorBench); returns self."""
        self.original_index_array = self.original_index_array[np.asarray(indices, dtype=np.int64)]
        return self

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.original_index_array)

    def image_files(self) -> List[str]:
        """The files of the poisoned images (none when they are kept in memory)."""
        if self._folder is None:
            return []
        return [stored_image_path(self._folder, e["path"]) for e in self.data_dict.values() if isinstance(e, Mapping)]

    def _poisoned(self, index: int):
        entry = self.data_dict[index]
        if isinstance(entry, tuple):
            return entry
        path = stored_image_path(self._folder, entry["path"])
        try:
            with Image.open(path) as handle:
                img = handle.convert("RGB")  # as clean images are (a grayscale or RGBA PNG works too)
        except FileNotFoundError:
            raise FtsamError(f"poisoned image {path} is missing; the record folder is incomplete") from None
        except Exception as exc:  # PIL's many types; the pre-flight check catches these before a run starts
            raise FtsamError(f"poisoned image {path} cannot be read ({type(exc).__name__}: {exc}); re-create the "
                             f"attack record") from None
        bd_label, orig_label = entry["other_info"][:2]
        return img, int(bd_label), int(orig_label)

    def __getitem__(self, position: int):
        index = int(self.original_index_array[position])
        if self.poison_indicator[index] == 0:
            img, label = self.dataset[index]
            orig, flag = label, 0
        else:
            img, label, orig = self._poisoned(index)
            flag = 1
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        if not self.getitem_all:
            return img, label
        if self.getitem_all_switch:
            return img, orig, index, flag, label
        return img, label, index, flag, orig

    def with_original_labels(self) -> "BackdoorDataset":
        """A shallow copy whose items carry the original label in field 1 (for robust accuracy, RA)."""
        return original_label_view(self)

    # ------------------------------------------------------------------ state
    def retrieve_state(self) -> dict:
        """BackdoorBench's state dict (plain ints/lists/ndarrays only, so it loads with weights_only=True)."""
        return {
            "bd_data_container": {
                "save_folder_path": self.save_folder_path,
                "data_dict": self.data_dict,
                "save_file_format": self.save_file_format,
            },
            "getitem_all": self.getitem_all,
            "getitem_all_switch": self.getitem_all_switch,
            "original_index_array": self.original_index_array,
            "poison_indicator": self.poison_indicator,
            "save_folder_path": self.save_folder_path,
        }

    def set_state(self, state: dict, bases: Sequence[str] = (".",), fallback: Optional[str] = None,
                  inside: Sequence[str] = ()) -> "BackdoorDataset":
        """Load a BackdoorBench state; the image folder is resolved with `resolve_image_folder(.., bases, fallback,
        inside)`: a folder outside `inside` (the record folder) is never read."""
        try:
            container = state["bd_data_container"]
            self.data_dict = {int(k): v for k, v in container["data_dict"].items()}
            self.save_file_format = container.get("save_file_format", SAVE_FILE_FORMAT)
            self.save_folder_path = container.get("save_folder_path", state.get("save_folder_path"))
            self.getitem_all = bool(state["getitem_all"])
            self.getitem_all_switch = bool(state["getitem_all_switch"])
            self.original_index_array = np.asarray(state["original_index_array"], dtype=np.int64)
            self.poison_indicator = np.asarray(state["poison_indicator"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise FtsamError(f"backdoor dataset state is malformed (missing {exc}); "
                             f"re-create the attack record") from None
        if len(self.poison_indicator) != len(self.dataset):
            raise FtsamError(
                f"the record poisons a dataset of {len(self.poison_indicator)} samples but the clean data has "
                f"{len(self.dataset)}; point dataset_path at the data the attack used"
            )
        self._folder = None
        if self.save_folder_path is not None and self.data_dict:
            self._folder = resolve_image_folder(self.save_folder_path, bases, fallback, inside)
            if self._folder is None:
                where = f" inside the record folder {inside[0]}" if inside else ""
                raise FtsamError(
                    f"poisoned-image folder {self.save_folder_path} not found{where} (looked under {list(bases)} "
                    f"and {fallback}); keep the bd_*_dataset folders inside the record folder"
                )
        return self


class TransformDataset(Dataset):
    """`dataset` with `transform` applied to the image (field 0) and `target_transform` to the label (field 1).

    Other attribute reads are forwarded to the wrapped dataset (e.g. `poison_indicator`, `retrieve_state`).
    """

    def __init__(self, dataset, transform: Optional[Callable] = None, target_transform: Optional[Callable] = None):
        self.wrapped_dataset = dataset
        self.wrap_img_transform = transform
        self.wrap_label_transform = target_transform

    def __getattr__(self, name):
        if name.startswith("__") or name in ("wrapped_dataset", "wrap_img_transform", "wrap_label_transform"):
            raise AttributeError(name)  # not set yet (unpickling, copying): do not recurse
        return getattr(self.wrapped_dataset, name)

    def __len__(self) -> int:
        return len(self.wrapped_dataset)

    def __getitem__(self, index: int):
        img, label, *rest = self.wrapped_dataset[index]
        if self.wrap_img_transform is not None:
            img = self.wrap_img_transform(img)
        if self.wrap_label_transform is not None:
            label = self.wrap_label_transform(label)
        return (img, label, *rest)

    def with_original_labels(self) -> "TransformDataset":
        """The RA view: the wrapped backdoor dataset with original labels in field 1, same transforms."""
        return TransformDataset(original_label_view(self.wrapped_dataset), self.wrap_img_transform,
                                self.wrap_label_transform)
