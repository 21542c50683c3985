"""Reading and writing BackdoorBench records: `attack_result.pt`, `defense_result.pt` and the metric CSVs.

`load_attack_result` uses BackdoorBench's own loader when the current folder is a BackdoorBench root whose
`utils.save_load_attack` is importable (keeping the backdoor datasets it builds), and our reader otherwise or,
with a logged warning, when BackdoorBench's loader fails; both return the same dict shape. The file is always
opened with `safe_load` first, so a record holding pickled code is refused before anything runs.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import logging
import math
import os
import pickle
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import atomic_save, atomic_write_text, check_finite_state, safe_load
from ftsam_plugin.settings import MAX_WIDTH, Number, Text, check_numbers, quote

from .backdoor import BackdoorDataset, TransformDataset, is_inside
from .datasets import DATASETS, build_clean_datasets, find_dataset_dir, get_dataset_info, resolve_dataset_dir
from .transforms import get_transform

__all__ = [
    "ATTACK_RESULT_KEYS",
    "build_model",
    "check_record_meta",
    "backdoor_state_problem",
    "find_backdoorbench_root",
    "find_defenses",
    "load_defense_model",
    "load_attack_result",
    "save_attack_result",
    "save_defense_result",
    "cpu_state_dict",
    "summarize_metrics",
    "write_metrics_csv",
    "write_metrics_summary_csv",
]

logger = logging.getLogger(__name__)

ATTACK_RESULT_KEYS = (
    "model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test",
)


# ---------------------------------------------------------------------------------------------- helpers


def cpu_state_dict(model) -> Dict[str, torch.Tensor]:
    """A CPU state dict without DataParallel/DDP's `module.` prefix, from an nn.Module or a state dict."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(state, Mapping):
        raise ValueError(f"model must be an nn.Module or a state dict, got {type(model).__name__}")
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        out[key] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
    return out


def _record_paths(path) -> tuple:
    path = os.fspath(path)
    pt = os.path.join(path, "attack_result.pt") if os.path.isdir(path) else path
    record_dir = os.path.dirname(os.path.abspath(pt))
    # the folder holding record/: stored relative paths ('./record/<r>/...', './data/<ds>') start there
    bases = []
    for d in (os.path.abspath(record_dir), os.path.realpath(record_dir)):
        base = os.path.dirname(os.path.dirname(d))
        if base not in bases:
            bases.append(base)
    return pt, record_dir, bases


def find_backdoorbench_root(cwd: Optional[str] = None) -> Optional[str]:
    """The BackdoorBench root if `cwd` (default: the current folder) is one and its `utils.save_load_attack`
    is importable from there (i.e. it is on sys.path, as with `python -m` or BackdoorBench's scripts)."""
    cwd = os.path.abspath(cwd or os.getcwd())
    target = os.path.join(cwd, "utils", "save_load_attack.py")
    if not (os.path.isfile(target) and os.path.isfile(os.path.join(cwd, "utils", "bd_dataset_v2.py"))):
        return None
    try:
        spec = importlib.util.find_spec("utils.save_load_attack")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not os.path.samefile(spec.origin, target):
        return None
    return cwd


def _resolve_data_dir(data_path: str, name: str, bases: Sequence[str], override: Optional[str]) -> str:
    if override is not None:
        return resolve_dataset_dir(os.fspath(override), name)
    candidates = []
    for base in bases:
        norm = data_path.replace("\\", "/")
        if "data" in norm:  # BackdoorBench's rule: <root> + data_path from 'data' on
            candidates.append(os.path.join(base, norm[norm.index("data"):]))
        if not os.path.isabs(data_path):
            candidates.append(os.path.join(base, data_path))
    if os.path.isabs(data_path):
        candidates.append(data_path)
    found = find_dataset_dir(name, candidates)
    if found is not None:
        return found
    raise FtsamError(
        f"dataset '{name}' of the record (data_path {data_path!r}) not found in {candidates}; "
        f"pass dataset_path= (or --dataset_path) pointing at it"
    )


MAX_CLASSES = 100_000
MAX_IMAGE_SIDE = 4096  # pixels: the transforms resize every image to the record's img_size
# what each metadata value of an attack record may be (BackdoorBench's keys, plus our `width`)
RECORD_RULES = {
    "model_name": Text("a model name"),
    "clean_data": Text("a dataset name"),
    "data_path": Text(),
    "num_classes": Number(integer=True, low=1, high=MAX_CLASSES),
    "width": Number(low=0, high=MAX_WIDTH, low_open=True),
}
SIDE = Number(integer=True, low=1, high=MAX_IMAGE_SIDE)
CHANNELS = Number(integer=True, low=1, high=4)


def check_record_meta(raw, pt: str) -> dict:
    """The record-metadata check every reader of an `attack_result.pt` runs before using any of it (the loaders, the
    leaderboard, the config choice): a mapping with the attack-result keys, each value of the right kind and size
    (RECORD_RULES, img_size (H, W, C) within MAX_IMAGE_SIDE), num_classes matching the dataset, and backdoor test and
    train sets whose indices and labels are in range. Returns {key: parsed value} of RECORD_RULES and img_size.

    Raises:
        FtsamError: '<pt> ...: <key> must be ..., got <value>; fix the record (or re-create it)'.
    """
    if not isinstance(raw, Mapping):
        raise FtsamError(f"{pt} is not an attack result (holds a {type(raw).__name__}); "
                         f"pass a record's attack_result.pt")
    missing = [k for k in ATTACK_RESULT_KEYS if k not in raw]
    if missing:
        raise FtsamError(f"{pt} is not an attack result (missing keys {missing}); pass a record's attack_result.pt")
    if raw["bd_test"] is None:
        raise FtsamError(f"{pt} has no bd_test set; re-create the attack record")
    meta = {k: raw.get(k) for k in RECORD_RULES}
    if meta["width"] is None:
        meta["width"] = 1.0
    check_numbers(meta, RECORD_RULES, fix=f"fix {{key}} in {pt} or re-create the record")
    size = raw["img_size"]
    parsed = ([SIDE.parse(size[0]), SIDE.parse(size[1]), CHANNELS.parse(size[2])]
              if isinstance(size, (list, tuple)) and len(size) == 3 else [None])
    if None in parsed:
        raise FtsamError(f"{pt} says img_size {quote(size)}; it must be (height, width, channels) with sides in "
                         f"1..{MAX_IMAGE_SIDE} and 1..4 channels; fix it or re-create the record")
    meta["img_size"] = tuple(parsed)
    info = DATASETS.get(meta["clean_data"].lower())  # others (BackdoorBench's mnist, ...) are not checked here
    if info is not None and meta["num_classes"] != info.num_classes:
        raise FtsamError(f"{pt} says num_classes={meta['num_classes']} but {info.name} has {info.num_classes} "
                         f"classes; fix num_classes (or clean_data) in the record")
    for key in ("bd_test", "bd_train"):
        if raw.get(key) is not None:
            problem = backdoor_state_problem(raw[key], meta["num_classes"])
            if problem is not None:
                raise FtsamError(f"{pt}: its {key} set {problem}; re-create the attack record")
    return meta


def backdoor_state_problem(state, num_classes: int) -> Optional[str]:
    """What is wrong with a saved backdoor dataset state (BackdoorBench's `retrieve_state()` dict), or None: its
    item indices must lie within its poison indicator (the dataset's size), its poisoned samples' labels within
    0..num_classes-1."""
    try:
        container = state["bd_data_container"]
        n = len(state["poison_indicator"])
        positions = np.asarray(state["original_index_array"])
        entries = container["data_dict"]
        items = entries.items()
    except (KeyError, TypeError, AttributeError) as exc:
        return f"is malformed ({type(exc).__name__}: {exc})"
    inside = Number(integer=True, low=0, high=n - 1)
    if positions.ndim != 1 or (positions.size and positions.dtype.kind not in "iu"):
        return f"has item indices of type {positions.dtype} (shape {list(positions.shape)}), not integers"
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        bad = positions.min() if positions.min() < 0 else positions.max()
        return f"holds item index {int(bad)}, outside the dataset's 0..{n - 1}"
    label = Number(integer=True, low=0, high=num_classes - 1)
    for index, entry in items:
        if inside.parse(index) is None:
            return f"holds poisoned sample index {quote(index)}, outside the dataset's 0..{n - 1}"
        if isinstance(entry, tuple):
            labels = list(entry[1:3])
        elif isinstance(entry, Mapping) and isinstance(entry.get("other_info"), (list, tuple)):
            labels = list(entry["other_info"][:2])
        else:
            return f"holds poisoned sample {quote(index)} as {quote(entry)}, not a path and its labels"
        for value in labels if len(labels) == 2 else [None]:
            if label.parse(value) is None:
                return (f"holds poisoned sample {quote(index)} with label {quote(value)}, not a class of "
                        f"0..{num_classes - 1}")
    return None


def build_model(raw: Mapping, state: Mapping, device="cpu", what: str = "the record's model") -> nn.Module:
    """The record's model with `state` loaded (BackdoorBench's positional key renaming when names differ).

    Args:
        raw: a mapping with model_name, num_classes, img_size (H, W, C) and optionally width (default 1.0).
        state: the state dict (a `module.` prefix is dropped).
        device: where to put the model.
        what: how to call the weights in error messages (e.g. the file they come from).

    Returns:
        The nn.Module in eval mode on `device`.

    Raises:
        FtsamError: unknown model, a model the record's settings cannot build (e.g. a width for vgg19_bn), weights
            that are not a state dict, that do not fit the model (the message names the first mismatch), or that
            hold NaN/inf.
    """
    from ftsam_plugin.models import create_model

    if not isinstance(state, (Mapping, nn.Module)):
        raise FtsamError(f"{what}: its model is a {type(state).__name__}, not a state dict (parameter names to "
                         f"tensors); re-create the record or result")
    check_finite_state(state, what)

    img_size = raw["img_size"]
    width = float(raw.get("width", 1.0) or 1.0)
    try:
        model = create_model(str(raw["model_name"]), int(raw["num_classes"]), image_size=int(img_size[0]),
                             width=width)
    except ValueError as exc:  # settings the model does not take (its builder's own message)
        raise FtsamError(f"cannot build model {raw['model_name']} for {what}: {exc}; check model_name, num_classes, "
                         f"width and img_size in the record") from None
    state = cpu_state_dict(state)
    expected = model.state_dict()
    if list(state) != list(expected) and len(state) == len(expected):
        # BackdoorBench's rule: rename keys by position when the counts match (e.g. older torchvision names)
        state = {new: state[old] for new, old in zip(expected, state)}
    problem = _state_mismatch(state, expected)
    if problem is None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            problem = str(exc).strip().splitlines()[-1].strip()[:200]
    if problem is not None:
        raise FtsamError(
            f"the weights do not fit model {raw['model_name']} (num_classes {int(raw['num_classes'])}, width {width}): "
            f"{problem}; check model_name, num_classes and width in the record"
        )
    return model.to(device).eval()


def _state_mismatch(state: Mapping, expected: Mapping) -> Optional[str]:
    """The first difference between a state dict and the model's (shape, missing or unexpected key), or None."""
    classifier = [k for k in expected if k.endswith("weight")][-1:]
    for key, value in state.items():
        if key in expected and isinstance(value, torch.Tensor) and value.shape != expected[key].shape:
            text = f"{key} has shape {list(value.shape)} in the file but {list(expected[key].shape)} in the model"
            if [key] == classifier and value.shape[1:] == expected[key].shape[1:]:
                text += f" (the weights have {value.shape[0]} classes)"
            return text
    missing = [k for k in expected if k not in state]
    if missing:
        return f"{len(missing)} parameters missing from the file (first: {missing[0]})"
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        return f"{len(unexpected)} unexpected parameters in the file (first: {unexpected[0]})"
    return None


def _record_folders(record_dir: str) -> List[str]:
    # the record folder as given and as resolved: what its poisoned images may be read from
    return list(dict.fromkeys((os.path.abspath(record_dir), os.path.realpath(record_dir))))


def _backdoor_dataset(state, raw_set, bases: Sequence[str], record_dir: str) -> BackdoorDataset:
    """Our BackdoorDataset from a saved state: poisoned images under `bases`, else the record's own bd_* folder;
    only a folder inside the record folder is ever read (an absolute or '../' path in the record is not)."""
    stored = state.get("save_folder_path") or ""
    fallback = os.path.join(record_dir, os.path.basename(stored.replace("\\", "/").rstrip("/")))
    return BackdoorDataset(raw_set).set_state(state, bases, fallback, inside=_record_folders(record_dir))


def _images_at_stored_paths(bb_dataset, record_dir: str) -> bool:
    """Whether every poisoned image of a BackdoorBench dataset is where BackdoorBench opens it (stored path, cwd),
    inside the record folder."""
    container = bb_dataset.retrieve_state()["bd_data_container"]
    if container.get("save_folder_path") is None:
        return True  # images kept in memory
    folders = _record_folders(record_dir)
    return all(os.path.isfile(entry["path"]) and is_inside(entry["path"], folders)
               for entry in container["data_dict"].values())


def _result_dict(raw, model, clean_train, clean_test, bd_train, bd_test, data_dir, record_dir, loader) -> dict:
    return {
        "model_name": str(raw["model_name"]),
        "num_classes": int(raw["num_classes"]),
        "img_size": tuple(int(v) for v in raw["img_size"]),
        "clean_data": str(raw["clean_data"]),
        "data_path": data_dir,
        "width": float(raw.get("width", 1.0) or 1.0),
        "model": model,
        "clean_train": clean_train,
        "clean_test": clean_test,
        "bd_train": bd_train,
        "bd_test": bd_test,
        "record_dir": record_dir,
        "loader": loader,
    }


# ---------------------------------------------------------------------------------------------- loading


def load_attack_result(path, dataset_path: Optional[str] = None, use_backdoorbench: Optional[bool] = None,
                       device="cpu") -> dict:
    """Read an attack record (the folder `record/<r>/` or its `attack_result.pt`).

    Args:
        path: the record folder or its attack_result.pt.
        dataset_path: the dataset folder (e.g. './data/cifar10', or its parent); default: resolved from the
            record's data_path like BackdoorBench (relative to the folder holding `record/`).
        use_backdoorbench: True: BackdoorBench's loader (FtsamError if its root is not the current folder);
            False: ours; None: BackdoorBench's when available and no dataset_path is given.
        device: where to put the model.

    Returns:
        dict with model_name, num_classes, img_size (H, W, C), clean_data, data_path (resolved folder), width,
        model (nn.Module with the weights, eval mode), clean_train/clean_test (TransformDataset over raw
        `(PIL, label)` sets), bd_train (or None)/bd_test (TransformDataset over BackdoorDataset: 5-tuple items),
        record_dir and loader ('backdoorbench' or 'ftsam'). Train sets carry the train transform.

    Raises:
        FtsamError: missing/unsafe/malformed file, data not found, weights not matching the model.
    """
    pt, record_dir, bases = _record_paths(path)
    raw = safe_load(pt, what="attack result")  # refuses pickled code before anything else reads the file
    check_record_meta(raw, pt)
    bb_root = find_backdoorbench_root()
    if use_backdoorbench and bb_root is None:
        raise FtsamError("BackdoorBench's loader needs the BackdoorBench root as the current folder; run from there "
                         "with `python -m ...`, or pass use_backdoorbench=False")
    if use_backdoorbench or (use_backdoorbench is None and bb_root is not None and dataset_path is None):
        try:
            return _load_with_backdoorbench(raw, pt, record_dir, bases, bb_root, device)
        except Exception as exc:  # BackdoorBench's loader may fail any way (e.g. its dataset code trying a download)
            if use_backdoorbench:
                if isinstance(exc, FtsamError):
                    raise
                raise _backdoorbench_error(exc, pt) from exc
            logger.warning("BackdoorBench's loader failed (%s: %s); reading the record with ftsam's own reader",
                           type(exc).__name__, _first_line(exc))
    return _load_with_ftsam(raw, record_dir, bases, dataset_path, device)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def _backdoorbench_error(exc: Exception, pt: str) -> FtsamError:
    if isinstance(exc, pickle.UnpicklingError):
        return FtsamError(
            "BackdoorBench's torch.load refused the record under torch>=2.6 weights_only; apply the plugin's "
            "patch or set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (the file was checked with safe_load)"
        )
    return FtsamError(f"BackdoorBench's loader failed on {pt} ({type(exc).__name__}: {_first_line(exc)}); "
                      f"fix that, or pass use_backdoorbench=False to use ftsam's reader")


def _load_with_ftsam(raw, record_dir, bases, dataset_path, device) -> dict:
    name = get_dataset_info(raw["clean_data"]).name
    data_dir = _resolve_data_dir(str(raw["data_path"]), name, bases, dataset_path)
    raw_train, raw_test = build_clean_datasets(name, data_dir)
    img_size = raw["img_size"]
    train_tf, test_tf = get_transform(name, True, img_size), get_transform(name, False, img_size)

    def bd(state, raw_set, transform):
        if state is None:
            return None
        return TransformDataset(_backdoor_dataset(state, raw_set, bases, record_dir), transform)

    return _result_dict(
        raw,
        build_model(raw, raw["model"], device, what=f"attack result {os.path.join(record_dir, 'attack_result.pt')}"),
        TransformDataset(raw_train, train_tf),
        TransformDataset(raw_test, test_tf),
        bd(raw["bd_train"], raw_train, train_tf),
        bd(raw["bd_test"], raw_test, test_tf),
        data_dir,
        record_dir,
        "ftsam",
    )


def _load_with_backdoorbench(raw, pt, record_dir, bases, bb_root, device) -> dict:
    module = importlib.import_module("utils.save_load_attack")
    result = module.load_attack_result(pt)
    clean_train, clean_test = result["clean_train"], result["clean_test"]

    def bd(wrapper, raw_set):
        if wrapper is None:
            return None
        dataset = wrapper.wrapped_dataset  # BackdoorBench's prepro_cls_DatasetBD_v2: same 5-tuple items as ours
        if not _images_at_stored_paths(dataset, record_dir):
            # BackdoorBench opens the stored paths relative to the current folder, so a record kept elsewhere or
            # moved would fail mid-run; only then rebuild it from its state with our folder lookup
            dataset = _backdoor_dataset(dataset.retrieve_state(), raw_set, [bb_root, *bases], record_dir)
        # our wrapper around BackdoorBench's set and transforms: adds the RA view (with_original_labels)
        return TransformDataset(dataset, wrapper.wrap_img_transform, wrapper.wrap_label_transform)

    raw_train, raw_test = clean_train.wrapped_dataset, clean_test.wrapped_dataset
    data_dir = getattr(raw_train, "root", None) or os.path.dirname(getattr(raw_train, "data_folder", "") or "")
    return _result_dict(
        raw,
        build_model(raw, result["model"], device, what=f"attack result {pt}"),
        TransformDataset(raw_train, clean_train.wrap_img_transform, clean_train.wrap_label_transform),
        TransformDataset(raw_test, clean_test.wrap_img_transform, clean_test.wrap_label_transform),
        bd(result.get("bd_train"), raw_train),
        bd(result["bd_test"], raw_test),
        data_dir,
        record_dir,
        "backdoorbench",
    )


def find_defenses(record_dir: str) -> Dict[str, str]:
    """{defense name: path of `<record>/defense/<name>/defense_result.pt`}, sorted by name (ours and BackdoorBench's:
    any folder holding one)."""
    base = os.path.join(record_dir, "defense")
    if not os.path.isdir(base):
        return {}
    out = {}
    for name in sorted(os.listdir(base)):
        pt = os.path.join(base, name, "defense_result.pt")
        if os.path.isfile(pt):
            out[name] = pt
    return out


def load_defense_model(path: str, record: dict, device="cpu") -> nn.Module:
    """The model of a `defense_result.pt` ({model_name, num_classes, model}: ours and BackdoorBench's), built like
    the record's model.

    Args:
        path: the defense_result.pt.
        record: a `load_attack_result` dict (gives img_size and width, which defense results do not store).
        device: where to put the model.
    """
    raw = safe_load(path, what="defense result")
    if not isinstance(raw, dict) or "model" not in raw:
        raise FtsamError(f"{path} is not a defense result (no 'model' key); pass a defense_result.pt")
    spec = {"model_name": raw.get("model_name") or record["model_name"],
            "num_classes": raw.get("num_classes") or record["num_classes"]}
    check_numbers(spec, {k: RECORD_RULES[k] for k in spec}, fix=f"fix {{key}} in {path} or re-create it")
    spec.update(img_size=record["img_size"], width=record.get("width", 1.0))
    return build_model(spec, raw["model"], device, what=f"defense result {path}")


# ---------------------------------------------------------------------------------------------- saving


def save_attack_result(model_name: str, num_classes: int, model, data_path: str, img_size: Sequence[int],
                       clean_data: str, bd_test, save_path: str, bd_train=None, **kwargs) -> str:
    """Write `<save_path>/attack_result.pt` in BackdoorBench's format (atomically).

    Args:
        model_name, num_classes, data_path, img_size, clean_data: as BackdoorBench stores them.
        model: nn.Module or state dict (saved on CPU, without a `module.` prefix).
        bd_test, bd_train: BackdoorDataset (or a TransformDataset over one); saved via `retrieve_state()`.
        save_path: the record folder.
        **kwargs: extra keys (e.g. width), as BackdoorBench's save_attack_result allows.

    Returns:
        The path of the written file.
    """
    reserved = set(ATTACK_RESULT_KEYS) & set(kwargs)
    if reserved:
        raise ValueError(f"extra keys {sorted(reserved)} clash with the attack-result keys")
    state = cpu_state_dict(model)
    check_finite_state(state, f"the model for {save_path}")  # a diverged model never becomes a record
    payload = {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "model": state,
        "data_path": data_path,
        "img_size": tuple(int(v) for v in img_size),
        "clean_data": clean_data,
        "bd_train": bd_train.retrieve_state() if bd_train is not None else None,
        "bd_test": bd_test.retrieve_state(),
        **kwargs,
    }
    target = os.path.join(os.fspath(save_path), "attack_result.pt")
    atomic_save(payload, target)
    return target


def save_defense_result(model_name: str, num_classes: int, model, save_path: str,
                        file_name: str = "defense_result.pt") -> str:
    """Write `<save_path>/<file_name>` = {model_name, num_classes, model (CPU state dict, no `module.`)}."""
    target = os.path.join(os.fspath(save_path), file_name)
    state = cpu_state_dict(model)
    check_finite_state(state, f"the defended model for {target}")
    atomic_save({"model_name": model_name, "num_classes": int(num_classes), "model": state}, target)
    return target


# ---------------------------------------------------------------------------------------------- metric CSVs


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _clean_row(row: Mapping[str, Any]) -> dict:
    # BackdoorBench's Metric_Aggregator: drop None values, turn NaN into the string 'nan_value'
    out = {}
    for key, value in row.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.item()
        out[key] = "nan_value" if _is_nan(value) else value
    return out


def _columns(rows: Iterable[Mapping[str, Any]]) -> List[str]:
    seen: Dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _fmt(value) -> str:
    if value is None or _is_nan(value):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _write_indexed_csv(path: str, index: Sequence, columns: Sequence[str], rows: Sequence[Mapping]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["", *columns])  # pandas' to_csv: an unnamed index column first
    for label, row in zip(index, rows):
        writer.writerow([label, *(_fmt(row.get(c)) for c in columns)])
    atomic_write_text(path, buffer.getvalue())


def write_metrics_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Per-epoch metrics as BackdoorBench writes `<prefix>_df.csv` (index column, then the row keys in order)."""
    rows = [_clean_row(r) for r in rows]
    _write_indexed_csv(os.fspath(path), list(range(len(rows))), _columns(rows), rows)


def summarize_metrics(rows: Sequence[Mapping[str, Any]]) -> Dict[str, dict]:
    """BackdoorBench's summary per column: 'last' (last non-missing value), 'valid_max' (max over numeric values,
    NaN if none) and 'exist_nan_value' (whether any value was NaN)."""
    rows = [_clean_row(r) for r in rows]
    last, valid_max, has_nan = {}, {}, {}
    for col in _columns(rows):
        values = [r[col] for r in rows if col in r]
        last[col] = values[-1] if values else None
        numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        valid_max[col] = max(numeric) if numeric else float("nan")
        has_nan[col] = any(v == "nan_value" for v in values)
    return {"last": last, "valid_max": valid_max, "exist_nan_value": has_nan}


def write_metrics_summary_csv(path: str, rows: Sequence[Mapping[str, Any]],
                              extra: Optional[Mapping[str, Any]] = None) -> None:
    """`<prefix>_df_summary.csv`: rows last / valid_max / exist_nan_value, one column per metric; `extra`: run-level
    values (e.g. the time to purify) as further columns, the same value in `last` and `valid_max`."""
    summary = summarize_metrics(rows)
    columns = _columns([_clean_row(r) for r in rows])
    for key, value in (extra or {}).items():
        columns += [key] if key not in columns else []
        summary["last"][key] = summary["valid_max"][key] = value
        summary["exist_nan_value"][key] = False
    _write_indexed_csv(os.fspath(path), list(summary), columns, list(summary.values()))
