"""Shared test helpers: tiny synthetic datasets on disk and tiny attack records (stable API for all tests).

    make_image_folder(root, n_per_class=20, classes=10, size=32, n_test_per_class=None, seed=0, ext="png") -> Path
        root/train/<class>/<NNNN>.<ext> and root/test/<class>/..., classes named c00, c01, ... (or as given);
        label i = i-th class name in sorted order. Images are class-tinted noise (learnable), PNG = lossless.
    make_gtsrb_folder(root, n_train_per_class=2, n_test=43, size=32, num_classes=43, seed=0, vary_size=False) -> Path
        BackdoorBench's GTSRB layout: root/Train/000NN/GT-000NN.csv + images, root/Test/GT-final_test.csv + images
        (';'-separated: Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId).
        vary_size: sizes differ (resize path).
    make_attack_record(root, name="rec", attack="badnet", dataset="cifar10", n_per_class=20, epochs=1, width=0.125,
                       batch_size=64, extra_args=()) -> Path
        Synthesizes root/data/<dataset> (image folder for cifar10/cifar100/tiny, BB layout for gtsrb) unless it exists,
        runs `ftsam attack` through ftsam_plugin.cli.main, returns root/record/<name>. Raises if the CLI fails.
    run_cli(argv) -> (exit_code, stdout, stderr)
    check_error((code, out, err), needle, whole=True) -> str
        The CLI's error contract: exit 2, no traceback, exactly one `error:` line (the last), holding `needle`;
        with `whole`, the only stderr line. Returns the line.
    clone_record(record, name, mutate=None) -> Path
        A copy of a record next to it (so its data resolves the same way) whose poisoned images are its own;
        `mutate(raw)` edits its attack_result.pt dict first.
    Evil(marker): an object whose unpickling creates the file `marker` (stands in for code in an untrusted file).
    one_torch_thread: module-scoped autouse fixture (torch.set_num_threads(1)); a test module opts in by importing it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import pytest
from PIL import Image

__all__ = ["make_image_folder", "make_gtsrb_folder", "make_attack_record", "run_cli", "check_error", "clone_record",
           "synthetic_image", "one_torch_thread", "Evil"]


def synthetic_image(rng: np.random.Generator, label: int, num_classes: int, size: Union[int, Tuple[int, int]]):
    """A class-tinted noise image (HWC uint8): a hue per class plus uniform noise."""
    h, w = (size, size) if isinstance(size, int) else size
    hue = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 29 + 160) % 256], dtype=np.float64)
    noise = rng.integers(0, 256, size=(h, w, 3)).astype(np.float64)
    return np.clip(0.6 * hue + 0.4 * noise, 0, 255).astype(np.uint8)


def make_image_folder(root, n_per_class: int = 20, classes: Union[int, Sequence[str]] = 10, size: int = 32,
                      n_test_per_class: Optional[int] = None, seed: int = 0, ext: str = "png") -> Path:
    """Plain image-folder dataset (see the module docstring); returns `root`."""
    root = Path(root)
    names = [f"c{i:02d}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    order = sorted(names)
    rng = np.random.default_rng(seed)
    n_test = n_per_class if n_test_per_class is None else n_test_per_class
    for split, count in (("train", n_per_class), ("test", n_test)):
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            label = order.index(name)
            for j in range(count):
                Image.fromarray(synthetic_image(rng, label, len(names), size)).save(folder / f"{j:04d}.{ext}")
    return root


def make_gtsrb_folder(root, n_train_per_class: int = 2, n_test: int = 43, size: int = 32, num_classes: int = 43,
                      seed: int = 0, vary_size: bool = False) -> Path:
    """BackdoorBench-layout GTSRB (see the module docstring); returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"

    def img_size(k: int) -> Tuple[int, int]:
        return (size + k % 3, size + (k // 3) % 2) if vary_size else (size, size)

    def write(folder: Path, fname: str, label: int, k: int) -> str:
        h, w = img_size(k)
        Image.fromarray(synthetic_image(rng, label, num_classes, (h, w))).save(folder / fname)
        return f"{fname};{w};{h};1;1;{w - 1};{h - 1};{label}\n"

    k = 0
    for c in range(num_classes):
        folder = root / "Train" / f"{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = [header]
        for j in range(n_train_per_class):
            lines.append(write(folder, f"00000_{j:05d}.ppm", c, k))
            k += 1
        (folder / f"GT-{c:05d}.csv").write_text("".join(lines))
    test = root / "Test"
    test.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for j in range(n_test):
        lines.append(write(test, f"{j:05d}.ppm", j % num_classes, k))
        k += 1
    (test / "GT-final_test.csv").write_text("".join(lines))
    return root


def run_cli(argv: Iterable[str]) -> Tuple[int, str, str]:
    """Run `ftsam <argv>` in-process; returns (exit code, stdout, stderr)."""
    from ftsam_plugin.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 1
    return int(code or 0), out.getvalue(), err.getvalue()


def check_error(result: Tuple[int, str, str], needle: str, whole: bool = True) -> str:
    """Exit 2, no traceback, exactly one `error:` line holding `needle` (the only stderr line when `whole`)."""
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert needle in errors[0], errors[0]
    if whole:
        assert len(lines) == 1, err
    return errors[0]


def clone_record(record, name: str, mutate=None) -> Path:
    """A copy of the record (next to it, so the data resolves the same way) whose poisoned images are its own."""
    import shutil

    import torch

    from ftsam_plugin.io import safe_load

    record = Path(record)
    target = record.parent / name
    shutil.copytree(record, target, ignore=shutil.ignore_patterns("defense"))
    raw = safe_load(target / "attack_result.pt")
    for key in ("bd_train", "bd_test"):
        folder = f"./record/{name}/{key}_dataset"
        raw[key]["save_folder_path"] = raw[key]["bd_data_container"]["save_folder_path"] = folder
    if mutate is not None:
        mutate(raw)
    torch.save(raw, target / "attack_result.pt")
    return target


class Evil:
    """Unpickling this creates `marker`: the stand-in for arbitrary code in an untrusted file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def make_attack_record(root, name: str = "rec", attack: str = "badnet", dataset: str = "cifar10",
                       n_per_class: int = 20, epochs: int = 1, width: float = 0.125, batch_size: int = 64,
                       extra_args: Sequence[str] = ()) -> Path:
    """Tiny attack record made by `ftsam attack` (see the module docstring); returns the record folder."""
    root = Path(root)
    data = root / "data" / dataset
    if not data.exists():
        if dataset == "gtsrb":
            make_gtsrb_folder(data, n_train_per_class=max(1, n_per_class // 4), n_test=43)
        else:
            num_classes = {"cifar10": 10, "cifar100": 100, "tiny": 200}[dataset]
            size = 64 if dataset == "tiny" else 32
            make_image_folder(data, n_per_class=n_per_class, classes=num_classes, size=size,
                              n_test_per_class=max(1, n_per_class // 2))
    argv = [
        "attack", "--attack", attack, "--dataset", dataset, "--dataset_path", str(root / "data"),
        "--model", "preactresnet18", "--width", str(width), "--epochs", str(epochs), "--batch_size", str(batch_size),
        "--device", "cpu", "--num_workers", "0", "--record_root", str(root / "record"), "--save_folder_name", name,
        "--progress", "False", *extra_args,
    ]
    code, out, err = run_cli(argv)
    if code != 0:
        raise RuntimeError(f"ftsam attack failed ({code}): {err or out}")
    return root / "record" / name


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op torch thread for the importing module: on 2 shared cores this avoids oversubscription
    (convolutions ran 20x slower under load)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def without_clock_columns(csv_text: str) -> str:
    """A metric CSV's text without the run-time columns (ftsam_plugin.purify.CLOCK_COLUMNS): they differ between
    two runs that compute the same thing."""
    import csv
    import io

    from ftsam_plugin.purify import CLOCK_COLUMNS

    rows = list(csv.reader(io.StringIO(csv_text)))
    keep = [i for i, name in enumerate(rows[0]) if name not in CLOCK_COLUMNS] if rows else []
    return "\n".join(",".join(row[i] for i in keep) for row in rows)
