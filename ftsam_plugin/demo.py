"""`ftsam demo`: make a backdoored model, then defend it with FT and FT-SAM side by side.

    ftsam demo                                   # CIFAR-10 download if the network allows, else offline digits
    ftsam demo --data ../shared/data/cifar10-jpeg --attack blended
    ftsam demo --tiny                            # a few seconds: checks the pipeline (CI)

Data, the first source that works (the output names the one used):
  1. --data: CIFAR-10 in torchvision's layout (cifar-10-batches-py) or an image folder (train/<class>/, test/<class>/);
  2. torchvision's CIFAR-10 download into --cache_dir (skipped with --offline; short network timeouts);
  3. scikit-learn's `load_digits`: 1,797 real 8x8 handwritten digits shipped inside scikit-learn (no download),
     upscaled to 32x32 RGB, split 4:1 per class (deterministic);
  4. a generated dataset (class-coloured shapes), only when scikit-learn is missing.
The demo copies a class-balanced subset as an image folder into --cache_dir, trains the attack with `ftsam attack`'s
code, runs the `ft-baseline` and `ftsam` defenses on the record it leaves in --out, and prints ACC/ASR/RA/DER.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.lock import FolderLock, held_locks_under
from ftsam_plugin.provenance import cpu_name
from ftsam_plugin.settings import SEED_MAX, TRAINING_RULES, Number, check_flags, str2bool, threads_rule, usable_cores
from ftsam_plugin.signals import Stopped

__all__ = ["add_arguments", "run", "DemoData", "select_data", "digits_folder", "generated_folder"]

logger = logging.getLogger(__name__)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MARKER = "demo_info.txt"  # written into records and data folders the demo made (and may replace)
READY = ".complete"

# (train images per class, test images per class, attack epochs) per data source; --tiny overrides
SIZES = {"cifar10": (500, 100, 15), "digits": (None, None, 15), "generated": (100, 30, 5)}
TINY = dict(train_per_class=12, test_per_class=6, epochs=1, defense_epochs=1, width=0.125, ratio=0.5)
# The demo's defense settings, by the sweep's rule (benchmarks/results/demo_sweep.md, offline digits): of the settings
# that passed the acceptance rule on the selection seeds 0-4 and fit the 3-minute demo on 2 cores, in order of mean
# FT-SAM ASR, the first that also passed on the held-out seeds 5-9. (Without the time limit the rule picks ratio 0.2
# over 40 epochs at rho 2: it passes too and removes more, but takes 3:18-3:25; ratio 0.3 over 20 epochs failed on
# the held-out seeds.) lr 0.002, not the cpu config's 0.01: at 0.01 both defenses first destroy the model and relearn
# it (benchmarks/results/demo_collapse.md).
DEFAULTS = {"ratio": 0.2, "defense_epochs": 20, "batch_size": 32, "lr": 0.002, "rho": 1.0, "eval_every": 2}
# What the sweep measured on its held-out seeds 5-9 for DEFAULTS and for the first pick (ratio 0.2, 40 epochs, rho 2),
# at the demo's attack (Blended, 15 epochs, width 0.25) on the offline digits, one thread: quoted in the demo's last
# sentence when it runs that setting. Seeds 0-4 chose the settings; seeds 5-9 gated three picks in turn, each checked
# knowing the earlier picks' results. The sweep ran on an Intel Xeon, before evaluation had its own random generator
# (7905b10): a seed's numbers differ on other CPU types and with today's code, the mean over seeds is the claim.
# tests/test_demo.py checks every entry against the sweep's committed run files.
SWEEP_MACHINE = "an Intel Xeon, one thread per process, code before 7905b10"
HELD_OUT: dict = {
    ("digits", "blended", (0.2, 20, 32, 0.002, "1")): dict(seeds="5-9", wins=5, n=5, ft_asr="67.4 ± 20.7",
                                                         sam_asr="35.9 ± 30.2", ft_acc="94.8 ± 1.1",
                                                         sam_acc="93.2 ± 1.3",
                                                         note="the third pick they gated, the first fitting 3 "
                                                              "minutes that passed"),
    ("digits", "blended", (0.2, 40, 32, 0.002, "2")): dict(seeds="5-9", wins=5, n=5, ft_asr="55.6 ± 23.6",
                                                         sam_asr="19.9 ± 29.5", ft_acc="95.5 ± 0.8",
                                                         sam_acc="93.7 ± 1.0",
                                                         note="the first pick they gated, chosen on seeds 0-4 alone"),
}


@dataclass
class DemoData:
    """The image folder the demo trains on: `path` holds train/<class>/ and test/<class>/."""

    path: str
    source: str  # 'folder' | 'cifar10-download' | 'digits' | 'generated'
    description: str
    n_train: int
    n_test: int


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `ftsam demo`'s options."""
    add = parser.add_argument
    add("--attack", choices=("badnet", "blended"), default="blended",
        help="attack (default blended: the case where plain FT leaves the backdoor)")
    add("--data", help="CIFAR-10 folder (torchvision layout or train/<class>/ + test/<class>/ images); "
                       "default: download, else scikit-learn's digits")
    add("--offline", action="store_true", help="never try the network (use --data or the digits)")
    add("--epochs", type=int, help="attack training epochs (default 15)")
    add("--defense_epochs", type=int, help=f"FT and FT-SAM epochs (default {DEFAULTS['defense_epochs']})")
    add("--width", type=float, help="PreAct-ResNet18 width multiplier (default 0.25)")
    add("--ratio", type=float, help=f"clean fraction of the demo's train set the defenses get (default {DEFAULTS['ratio']:g})")
    add("--rho", type=float, help=f"FT-SAM neighbourhood size (default {DEFAULTS['rho']:g}, from the demo sweep)")
    add("--lr", type=float, help=f"FT and FT-SAM learning rate (default {DEFAULTS['lr']:g})")
    add("--threads", type=int, default=1,
        help="torch CPU threads per process (default 1: the sweep's setting, so a seed prints its sweep row; results "
             "depend on the thread count)")
    add("--side_by_side", type=str2bool, default=None,
        help="run FT and FT-SAM at once, one process each (CPU only; default: when 2 x --threads cores are usable). "
             "The numbers are the same either way")
    add("--no_retune", action="store_true", help="skip the retuning attack (the P-ASR column)")
    add("--batch_size", type=int, help=f"FT and FT-SAM batch size (default {DEFAULTS['batch_size']})")
    add("--train_per_class", type=int, help="train images per class copied from CIFAR-10 (default 500)")
    add("--test_per_class", type=int, help="test images per class copied from CIFAR-10 (default 100)")
    add("--out", default="./record", help="record root; the record goes to <out>/demo_<attack> (default ./record)")
    add("--cache_dir", help="where demo data is prepared (default $XDG_CACHE_HOME/ftsam/demo or ~/.cache/ftsam/demo)")
    add("--device", help="torch device (default cuda if available, else cpu)")
    add("--seed", type=int, default=0, help="random seed (default 0)")
    add("--download_timeout", type=float, default=5.0, help="seconds before a stalled download gives up (default 5)")
    add("--progress", type=str2bool, default=True, help="progress bars (True/False, default True)")
    add("--tiny", action="store_true", help="seconds-long run on a tiny subset (for CI): 1 epoch each")
    return parser


# ------------------------------------------------------------------------------------------------ data


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ftsam", "demo")


def clean_subset_size(n_train: int, ratio: float, num_classes: int = 10) -> int:
    """Images in the defenses' class-balanced clean subset: int(n_train * ratio / num_classes) per class."""
    return num_classes * int(n_train * ratio / num_classes)


def _write_folder(dest: str, splits: Sequence[Tuple[str, Sequence[Tuple[np.ndarray, int]]]],
                  classes: Sequence[str], note: str) -> str:
    """Write images (HWC uint8) to dest/<split>/<class>/NNNNN.png via a temp folder renamed into place."""
    if os.path.isfile(os.path.join(dest, READY)):
        return dest
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        for split, items in splits:
            for name in classes:
                os.makedirs(os.path.join(tmp, split, name), exist_ok=True)
            for k, (img, label) in enumerate(items):
                Image.fromarray(img).save(os.path.join(tmp, split, classes[label], f"{k:05d}.png"))
        with open(os.path.join(tmp, MARKER), "w") as handle:
            handle.write(note + "\n")
        open(os.path.join(tmp, READY), "w").close()
        if os.path.isdir(dest):  # an unfinished earlier attempt
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _load_digits():
    from sklearn.datasets import load_digits  # optional: the `demo` extra

    digits = load_digits()
    return digits.images, digits.target


def digits_folder(cache_dir: str, train_per_class: Optional[int] = None,
                  test_per_class: Optional[int] = None) -> DemoData:
    """scikit-learn's 8x8 digits as a 32x32 RGB image folder; per class, every 5th image (in order) is a test image.

    Raises ImportError when scikit-learn is missing.
    """
    images, target = _load_digits()
    train, test = [], []
    for c in range(10):
        idx = np.flatnonzero(target == c)
        te, tr = idx[::5], np.setdiff1d(idx, idx[::5])
        train += [(i, c) for i in tr[:train_per_class]]
        test += [(i, c) for i in te[:test_per_class]]

    def to_rgb(i: int) -> np.ndarray:
        gray = np.clip(images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        big = Image.fromarray(gray, mode="L").resize((32, 32), Image.BILINEAR)
        return np.asarray(big.convert("RGB"))

    names = [f"digit{c}" for c in range(10)]
    key = f"digits32-{train_per_class or 'all'}-{test_per_class or 'all'}"
    note = "scikit-learn load_digits, 8x8 upscaled to 32x32 RGB; every 5th image per class is test"
    path = _write_folder(os.path.join(cache_dir, key),
                         [("train", [(to_rgb(i), c) for i, c in train]), ("test", [(to_rgb(i), c) for i, c in test])],
                         names, note)
    desc = (f"scikit-learn digits (real 8x8 handwritten digits upscaled to 32x32 RGB; "
            f"{len(train)} train / {len(test)} test)")
    return DemoData(path, "digits", desc, len(train), len(test))


def generated_folder(cache_dir: str, train_per_class: int, test_per_class: int, seed: int = 0) -> DemoData:
    """A generated 10-class dataset (a coloured square per class at a class-dependent place, on noise)."""
    rng = np.random.default_rng(seed)

    def image(c: int) -> np.ndarray:
        img = rng.integers(0, 96, size=(32, 32, 3)).astype(np.uint8)
        y, x = 4 + 6 * (c // 4), 4 + 7 * (c % 4)
        colour = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 29 + 160) % 256], dtype=np.uint8)
        img[y:y + 8, x:x + 8] = colour
        return img

    splits = [(split, [(image(c), c) for c in range(10) for _ in range(n)])
              for split, n in (("train", train_per_class), ("test", test_per_class))]
    path = _write_folder(os.path.join(cache_dir, f"generated-{train_per_class}-{test_per_class}-{seed}"), splits,
                         [f"class{c}" for c in range(10)], "generated: class-coloured squares on noise")
    return DemoData(path, "generated", f"a generated dataset (coloured squares; {10 * train_per_class} train / "
                                       f"{10 * test_per_class} test; scikit-learn is not installed)",
                    10 * train_per_class, 10 * test_per_class)


def _balanced_pick(targets: Sequence[int], per_class: int, rng: np.random.Generator) -> List[int]:
    targets = np.asarray(targets)
    picked: List[int] = []
    for c in range(10):
        pool = np.flatnonzero(targets == c)
        picked += sorted(rng.choice(pool, min(per_class, len(pool)), replace=False).tolist())
    return picked


def cifar_subset_folder(data_dir: str, cache_dir: str, train_per_class: int, test_per_class: int, seed: int,
                        source: str, label: str) -> DemoData:
    """A class-balanced subset of a CIFAR-10 folder (any layout `build_clean_datasets` reads) as an image folder."""
    from ftsam_plugin.data.datasets import build_clean_datasets

    raw_train, raw_test = build_clean_datasets("cifar10", data_dir)
    labels = set(int(t) for t in raw_train.targets) | set(int(t) for t in raw_test.targets)
    if not labels or min(labels) < 0 or max(labels) > 9:
        raise FtsamError(f"{data_dir} does not hold 10 classes like CIFAR-10 (found {len(labels)}); pass a CIFAR-10 "
                         f"folder with --data")
    rng = np.random.default_rng(seed)
    tr = _balanced_pick(raw_train.targets, train_per_class, rng)
    te = _balanced_pick(raw_test.targets, test_per_class, rng)
    digest = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:10]
    key = f"cifar10-{digest}-{train_per_class}-{test_per_class}-{seed}"

    def items(raw, idx):
        return [(np.asarray(raw[i][0].convert("RGB")), int(raw.targets[i])) for i in idx]

    dest = os.path.join(cache_dir, key)
    if not os.path.isfile(os.path.join(dest, READY)):
        print(f"preparing a {len(tr)}/{len(te)} image subset of {data_dir} in {dest}")
        _write_folder(dest, [("train", items(raw_train, tr)), ("test", items(raw_test, te))], CIFAR_CLASSES,
                      f"subset of {os.path.abspath(data_dir)}")
    return DemoData(dest, source, f"{label} ({len(tr)} train / {len(te)} test images, class-balanced subset)",
                    len(tr), len(te))


def try_download_cifar(cache_dir: str, timeout: float) -> Optional[str]:
    """torchvision's CIFAR-10 in `cache_dir/torchvision` (downloaded if missing), or None when that fails."""
    root = os.path.join(cache_dir, "torchvision")
    if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        return root
    try:  # cheap reachability probe before a 170 MB download
        urllib.request.urlopen(urllib.request.Request(CIFAR_URL, method="HEAD"), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        logger.info("CIFAR-10 download not reachable: %s", exc)
        return None
    from torchvision.datasets import CIFAR10

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        print(f"downloading CIFAR-10 to {root} (once)")
        CIFAR10(root, train=True, download=True)
        CIFAR10(root, train=False, download=True)
        return root
    except (OSError, RuntimeError, ValueError, EOFError) as exc:  # network error, timeout, bad archive
        print(f"CIFAR-10 download failed ({exc}); using offline data", file=sys.stderr)
        shutil.rmtree(os.path.join(root, "cifar-10-batches-py"), ignore_errors=True)
        return None
    finally:
        socket.setdefaulttimeout(old)


def select_data(data: Optional[str], cache_dir: str, offline: bool = False, tiny: bool = False,
                train_per_class: Optional[int] = None, test_per_class: Optional[int] = None, seed: int = 0,
                timeout: float = 5.0, download: Callable[[str, float], Optional[str]] = None) -> DemoData:
    """The demo's data (see the module docstring for the order of sources)."""
    from ftsam_plugin.data.datasets import resolve_dataset_dir

    if tiny:
        train_per_class = train_per_class or TINY["train_per_class"]
        test_per_class = test_per_class or TINY["test_per_class"]
    n_tr = train_per_class or SIZES["cifar10"][0]
    n_te = test_per_class or SIZES["cifar10"][1]
    if data is not None:
        if not os.path.isdir(data):
            raise FtsamError(f"--data {data} is not a folder; pass a CIFAR-10 folder (torchvision layout or "
                             f"train/<class>/ + test/<class>/ images)")
        folder = resolve_dataset_dir(data, "cifar10")
        return cifar_subset_folder(folder, cache_dir, n_tr, n_te, seed, "folder", f"CIFAR-10 from {data}")
    if not offline:
        root = (download or try_download_cifar)(cache_dir, timeout)
        if root is not None:
            return cifar_subset_folder(root, cache_dir, n_tr, n_te, seed, "cifar10-download",
                                       "CIFAR-10 (torchvision download)")
    try:
        return digits_folder(cache_dir, train_per_class, test_per_class)
    except ImportError:
        print("scikit-learn is not installed (pip install 'ftsam-plugin[demo]'); using a generated dataset",
              file=sys.stderr)
        return generated_folder(cache_dir, train_per_class or SIZES["generated"][0],
                                test_per_class or SIZES["generated"][1], seed)


# ------------------------------------------------------------------------------------------------ pipeline


def _quiet(cls):
    """The defense class with its console log limited to warnings (its log file keeps everything)."""

    class Quiet(cls):
        def set_logger(self) -> None:
            # the console handler binds sys.stderr when made: let it bind a sink (dropping the config dump),
            # then point it back at stderr for warnings only
            real, sink = sys.stderr, io.StringIO()
            sys.stderr = sink
            try:
                super().set_logger()
            finally:
                sys.stderr = real
            for handler in logging.getLogger("ftsam_plugin").handlers:
                if type(handler) is logging.StreamHandler and handler.stream is sink:
                    handler.setLevel(logging.WARNING)
                    handler.setStream(real)

    Quiet.__name__ = Quiet.__qualname__ = cls.__name__
    return Quiet


def _last_row(csv_path: str) -> dict:
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise FtsamError(f"{csv_path} holds no rows; the attack did not finish")
    return {k: float(rows[-1][k]) for k in ("test_acc", "test_asr", "test_ra")}


def _prepare_record_dir(out: str, name: str) -> str:
    """The record folder `<out>/<name>`, free for this run. An earlier demo record there is moved aside (kept, never
    deleted) under its lock, and only when no live run (a `ftsam defend`, `retune`, another demo) holds a lock
    anywhere in it; a folder the demo did not make is refused."""
    record = os.path.join(out, name)
    if not os.path.lexists(record):
        return record
    if not os.path.isfile(os.path.join(record, MARKER)) or os.path.islink(record):
        FolderLock(record, what="demo record folder").check()  # another demo's attack writing it: name that run
        raise FtsamError(f"{record} exists and was not made by `ftsam demo` (it has no {MARKER}; a demo killed "
                         f"with SIGKILL during its attack leaves none either); pass another --out or remove it")
    with FolderLock(record, what="demo record folder"):
        busy = held_locks_under(record, skip=(record,))
        if busy:
            folder, who = busy[0]
            raise FtsamError(f"{folder} (in the earlier demo record) is in use by another run ({who}); wait for it "
                             f"to finish, or pass another --out")
        aside = f"{record}.{time.strftime('%Y%m%d-%H%M%S')}"
        aside += "" if not os.path.lexists(aside) else f"-{os.getpid()}"
        try:
            os.rename(record, aside)
        except OSError as exc:
            raise FtsamError(f"cannot move the earlier demo record {record} aside: {exc.strerror}; pass another "
                             f"--out or remove it") from None
    print(f"kept the earlier demo record as {aside} (remove it when you no longer need it)")
    return record


def run_attack(data: DemoData, out: str, name: str, attack: str, epochs: int, width: float, device: str,
               seed: int, progress: bool) -> str:
    """Train the backdoored model with `ftsam attack`'s code; returns the record folder."""
    from ftsam_plugin.attacks import cli as attack_cli

    parser = attack_cli.add_arguments(argparse.ArgumentParser())
    argv = ["--attack", attack, "--dataset", "cifar10", "--dataset_path", data.path, "--model", "preactresnet18",
            "--width", str(width), "--epochs", str(epochs), "--batch_size", "128", "--device", device,
            "--num_workers", "0", "--random_seed", str(seed), "--record_root", out, "--save_folder_name", name,
            "--progress", str(progress)]
    record = os.path.join(out, name)
    existed = os.path.lexists(record)
    try:
        attack_cli.run(parser.parse_args(argv))
    except BaseException:  # Ctrl-C, SIGTERM, an error: a record folder this attack made is still the demo's
        if not existed and os.path.isdir(record) and FolderLock(record).holder() is None:
            _mark(record, f"made by ftsam demo: {attack} on {data.description}; the attack did not finish")
        raise
    _mark(record, f"made by ftsam demo: {attack} on {data.description}")
    return record


def _mark(record: str, note: str) -> None:
    """Mark `record` as the demo's (a later demo may move it aside; it refuses folders without the mark)."""
    with open(os.path.join(record, MARKER), "w") as handle:
        handle.write(note + "\n")


def run_defense(defense: str, record: str, epochs: int, ratio: float, rho: Optional[str], device: str,
                seed: int, eval_every: int = 1, batch_size: Optional[int] = None, lr: Optional[float] = None,
                extra: Sequence[str] = ()) -> dict:
    """Run `ftsam defend --defense <defense>` (console log quiet); returns its last-epoch metrics, timing and the
    per-epoch history (`curve`: epoch, test_acc, test_asr of every evaluated epoch)."""
    from ftsam_plugin.defense import cli as defense_cli
    from ftsam_plugin.defense.ftsam import DEFENSES

    parser = defense_cli.add_arguments(argparse.ArgumentParser())
    argv = ["--defense", defense, "--result_file", record, "--yaml_path", "cpu", "--epochs", str(epochs),
            "--ratio", str(ratio), "--device", device, "--num_workers", "0", "--random_seed", str(seed),
            "--eval_every", str(eval_every)]  # the last epoch is always evaluated
    if batch_size is not None:
        argv += ["--batch_size", str(batch_size)]
    if lr is not None:
        argv += ["--lr", str(lr)]
    if rho is not None:
        argv += ["--rho", str(rho)]
    opts = vars(parser.parse_args(argv + list(extra)))
    opts.pop("defense")
    obj = _quiet(DEFENSES[defense])(argparse.Namespace(**opts))
    start = time.perf_counter()
    obj.defense(record)
    seconds = time.perf_counter() - start
    last = obj.history[-1]
    result = os.path.join(record, "defense", DEFENSES[defense].name, "defense_result.pt")
    if not os.path.isfile(result):
        raise FtsamError(f"{defense} finished without writing {result}")
    curve = [{k: row[k] for k in ("epoch", "test_acc", "test_asr")} for row in obj.history
             if row.get("test_acc") is not None]
    return {"test_acc": last["test_acc"], "test_asr": last["test_asr"], "test_ra": last["test_ra"],
            "seconds": seconds, "result": result, "rho": getattr(obj.args, "rho", None), "curve": curve,
            "probes": [asdict(p) for p in getattr(obj, "rho_probes", [])]}


def side_by_side(device: str, threads: int, wanted: Optional[bool] = None) -> bool:
    """Whether FT and FT-SAM run at once, in two processes: on CPU only, when `wanted` (--side_by_side) says so, or
    by default when this process may use a core set for each (2 x --threads). Each process keeps --threads torch
    threads, so the numbers equal a one-after-the-other run."""
    if device != "cpu" or wanted is False:
        return False
    return True if wanted else usable_cores() >= 2 * threads


def _defense_child(conn, job: dict, threads: int) -> None:
    """Entry point of the second process of `run_defenses_side_by_side`: run one defense, send back its result."""
    import threading

    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    # tqdm's default lock is a multiprocessing semaphore: if this process is stopped before its exit clean-up, the
    # resource tracker reports it as leaked when the demo ends. One process with one bar needs a thread lock only.
    tqdm.set_lock(threading.RLock())
    try:
        conn.send(("ok", run_defense(**job)))
    except BaseException as exc:  # reported by the parent as one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


CHILD_EXIT_S = 60  # how long the second process may take to exit once it has sent its result


def run_defenses_side_by_side(first: dict, second: dict, threads: int) -> Tuple[dict, dict]:
    """`run_defense(**first)` here and `run_defense(**second)` in a spawned process at the same time (different
    defense folders of one record, so one writer per folder); returns both results. The child is stopped if this
    process fails or is interrupted; a child that dies (killed, out of memory) interrupts this process at once (its
    defense stops after the current epoch) and the error names how it died."""
    import _thread
    import multiprocessing
    import threading

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state inherited through fork
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_defense_child, args=(send, second, threads), name=f"ftsam-demo-{second['defense']}")
    child.start()
    send.close()
    outcome: dict = {}
    finished = threading.Event()  # set in the clean-up: a child ending from then on (stopped here) interrupts nothing

    def watch() -> None:  # the child's message, or its death without one
        try:
            outcome["message"] = receive.recv()
        except (EOFError, OSError):
            child.join()
            if not finished.is_set():
                outcome["died"] = child.exitcode
                _thread.interrupt_main()  # as a Ctrl-C: this process's defense stops after its epoch

    watcher = threading.Thread(target=watch, name="ftsam-demo-watch", daemon=True)
    watcher.start()
    try:
        try:
            mine = run_defense(**first)
            watcher.join()
        except KeyboardInterrupt:
            if "died" not in outcome:
                raise
        if "died" in outcome:
            raise FtsamError(f"the {second['defense']} process ended without a result: {_death(outcome['died'])}; "
                             f"{first['defense']} was stopped too; run the demo again") from None
        status, other = outcome["message"]
        child.join(CHILD_EXIT_S)  # let it end by itself (a SIGTERM during its exit clean-up leaks its resources)
        if status != "ok":
            raise FtsamError(f"{second['defense']} failed in its process: {other}")
        return mine, other
    finally:
        finished.set()
        if child.is_alive():  # this process failed or was interrupted: stop the child (SIGTERM, then SIGKILL)
            child.terminate()
            child.join(30)
            if child.is_alive():
                child.kill()
        child.join()
        receive.close()


def _death(exitcode: Optional[int]) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = " (the out-of-memory killer, or kill -9)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{why}"
    return f"exit code {exitcode}"


def retune_rows(record: str, device: str, rows: Sequence[dict], tiny: bool = False) -> None:
    """Add `p_asr` (the ASR after `ftsam retune`'s attack, its reference defaults; `tiny`: a 2-poison, 1-epoch
    attack on half the data, for the seconds-long pipeline check) to each row's metrics."""
    from ftsam_plugin.data.records import load_attack_result, load_defense_model
    from ftsam_plugin.retune import RetuneSettings, measure_pasr

    settings = RetuneSettings(split_ratio=0.5, poison_num=2, epochs=1) if tiny else RetuneSettings()
    loaded = load_attack_result(os.path.join(record, "attack_result.pt"))
    for m in rows:
        model = loaded["model"].to(device) if "result" not in m else load_defense_model(m["result"], loaded, device)
        m["p_asr"] = measure_pasr(model, loaded, settings, device=device, control=False,
                                 evaluate_before=False)["p_asr"]


def format_table(rows: Sequence[Tuple[str, dict]], baseline: dict) -> str:
    """ACC / ASR / RA / DER (percent), P-ASR when measured, and time per row; DER against `baseline`."""
    from ftsam_plugin.metrics import der

    pasr = all("p_asr" in m for _, m in rows)
    lines = [f"{'defense':<12}{'ACC':>8}{'ASR':>8}{'RA':>8}{'DER':>8}" + (f"{'P-ASR':>8}" if pasr else "")
             + f"{'time':>9}"]
    for label, m in rows:
        d = "-"
        if m is not baseline:
            d = f"{100 * der(baseline['test_acc'], m['test_acc'], baseline['test_asr'], m['test_asr']):.1f}"
        lines.append(f"{label:<12}{100 * m['test_acc']:>8.1f}{100 * m['test_asr']:>8.1f}{100 * m['test_ra']:>8.1f}"
                     f"{d:>8}" + (f"{100 * m['p_asr']:>8.1f}" if pasr else "") + f"{m['seconds']:>8.0f}s")
    return "\n".join(lines)


def plot_curves(path: str, title: str, runs: Sequence[Tuple[str, dict]], backdoored: dict) -> str:
    """Per-epoch ASR (solid) and clean ACC (dashed) of each defense, written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ftsam_plugin.io import atomic_write_bytes

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for (label, m), colour in zip(runs, ("tab:blue", "tab:red", "tab:green")):
        epochs = [r["epoch"] for r in m["curve"]]
        ax.plot(epochs, [100 * r["test_asr"] for r in m["curve"]], "-o", ms=3, color=colour, label=f"{label} ASR")
        ax.plot(epochs, [100 * r["test_acc"] for r in m["curve"]], "--", color=colour, label=f"{label} ACC")
    ax.axhline(100 * backdoored["test_asr"], color="grey", lw=0.8, ls=":", label="backdoored ASR")
    ax.axhline(100 * backdoored["test_acc"], color="grey", lw=0.8, ls="-.", label="backdoored ACC")
    ax.set(title=title, xlabel="defense epoch", ylabel="%", ylim=(-2, 102))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


def stage(msg: str) -> None:
    print(msg, flush=True)


def sweep_sentence(attack: str, source: str, setting: tuple, ft: dict, sam: dict) -> str:
    """How this run compares with the committed sweep's held-out seeds at the same setting
    (benchmarks/results/demo_sweep.md)."""
    ref = HELD_OUT.get((source, attack, setting)) if setting else None
    here = (f"this run: FT-SAM ASR {100 * sam['test_asr']:.1f}% vs FT {100 * ft['test_asr']:.1f}%, clean ACC "
            f"{100 * sam['test_acc']:.1f}% vs {100 * ft['test_acc']:.1f}%")
    if ref is None:
        return f"{here}; the sweep did not measure this setting (see benchmarks/results/demo_sweep.md)."
    return (f"{here}. On the sweep's held-out seeds {ref['seeds']} ({ref['note']}; "
            f"benchmarks/results/demo_sweep.md), FT-SAM's ASR was below FT's with clean ACC within 3 points on "
            f"{ref['wins']} of {ref['n']}: mean ASR FT-SAM {ref['sam_asr']} vs FT {ref['ft_asr']}, mean ACC "
            f"{ref['sam_acc']} vs {ref['ft_acc']} (mean ± sample std over seeds). A seed's numbers differ between "
            f"CPU types and thread counts (the sweep: {SWEEP_MACHINE}): compare with the mean over seeds, not a "
            f"seed's row.")


# what each numeric flag may be: all checked (with --device) before anything is read, written or moved
FLAG_RULES = {
    "epochs": Number(integer=True, low=1), "defense_epochs": Number(integer=True, low=1),
    "width": TRAINING_RULES["width"], "ratio": Number(low=0, high=1, low_open=True),
    "rho": Number(low=0, low_open=True), "lr": Number(low=0, high=1000, low_open=True),
    "batch_size": Number(integer=True, low=1),
    "train_per_class": Number(integer=True, low=1), "test_per_class": Number(integer=True, low=1),
    "seed": Number(integer=True, low=0, high=SEED_MAX), "download_timeout": Number(low=0, high=3600, low_open=True),
}


def check_args(args: argparse.Namespace) -> str:
    """Check every flag (FtsamError naming the first bad one; --threads up to the usable cores) and that --out can
    be written; returns the device to use."""
    import torch

    from ftsam_plugin.defense.ddp import resolve_device

    check_flags(args, {**FLAG_RULES, "threads": threads_rule()})
    device = str(resolve_device(args.device)) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    _check_out(args.out)
    return device


def _check_out(out: str) -> None:
    """--out exists (made if missing) and a folder can be made in it (os.access is no test for root), else one line
    naming --out."""
    try:
        os.makedirs(out, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".ftsam-demo-check-", dir=out))
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise FtsamError(f"--out {out} cannot hold the demo's record ({reason}); pass another --out") from None


def _check_subset(data: DemoData, ratio: float) -> None:
    """The defenses' class-balanced clean subset must hold an image of each class."""
    if clean_subset_size(data.n_train, ratio) < 10:
        raise FtsamError(f"the defenses' clean subset would hold 0 images per class (ratio {ratio:g} of "
                         f"{data.n_train // 10} training image(s) per class); raise --train_per_class (or --ratio)")


def _stopped(exc: KeyboardInterrupt, doing: str, record: str) -> Stopped:
    """The line a Ctrl-C or SIGTERM ends the demo with: what is kept and what works next (a demo has no --resume)."""
    return Stopped(f"stopped during {doing}; {record} is kept, unfinished; run the same command to start over (the "
                   f"demo moves that record aside, it never deletes it)", getattr(exc, "signum", signal.SIGINT))


def run(args: argparse.Namespace) -> int:
    """Run the demo (see the module docstring); returns 0. Errors raise FtsamError."""
    import torch

    device = check_args(args)  # before anything is touched
    tiny = bool(args.tiny)
    cache_dir = args.cache_dir or default_cache_dir()
    data = select_data(args.data, cache_dir, offline=args.offline, tiny=tiny, train_per_class=args.train_per_class,
                       test_per_class=args.test_per_class, seed=args.seed, timeout=args.download_timeout)
    source_key = "cifar10" if data.source in ("folder", "cifar10-download") else data.source
    epochs = args.epochs or (TINY["epochs"] if tiny else SIZES[source_key][2])
    defense_epochs = args.defense_epochs or (TINY["defense_epochs"] if tiny else DEFAULTS["defense_epochs"])
    width = args.width or (TINY["width"] if tiny else 0.25)
    ratio = args.ratio or (TINY["ratio"] if tiny else DEFAULTS["ratio"])
    rho = args.rho if args.rho is not None else DEFAULTS["rho"]
    batch = args.batch_size or (None if tiny else DEFAULTS["batch_size"])
    lr = args.lr or (None if tiny else DEFAULTS["lr"])  # --tiny: the cpu config's
    eval_every = 1 if tiny else DEFAULTS["eval_every"]
    _check_subset(data, ratio)
    threads = args.threads
    torch.set_num_threads(threads)  # CPU results depend on the thread count: it is part of the seed's identity
    n_clean = clean_subset_size(data.n_train, ratio)
    print(f"data: {data.description}\n      image folder {data.path}")
    cpu = f" ({cpu_name()}: numbers differ between CPU types)" if device == "cpu" else ""
    print(f"seed {args.seed} (data subset, attack, both defenses, loaders), {threads} torch threads, device {device}"
          + cpu)
    name = f"demo_{args.attack}"
    _prepare_record_dir(args.out, name)  # an earlier demo record is moved aside, never deleted
    bars = bool(args.progress) and sys.stderr.isatty()  # piped to a file: one line per stage instead
    parallel = side_by_side(device, threads, args.side_by_side)  # FT and FT-SAM at once, one process each
    stage(f"[1/{2 if parallel else 3}] attack: {args.attack}, 10% poison, all-to-one target 0, PreAct-ResNet18 width {width}, "
          f"{epochs} epochs ...")
    record, doing = os.path.join(args.out, name), "the attack"
    try:
        start = time.perf_counter()
        record = run_attack(data, args.out, name, args.attack, epochs, width, device, args.seed, bars)
        record_lock = FolderLock(record, what="demo record folder").acquire()  # to the end: no other demo moves it
        backdoored = _last_row(os.path.join(record, "attack_df.csv"))
        backdoored["seconds"] = time.perf_counter() - start
        stage(f"      done in {backdoored['seconds']:.0f} s: ACC {100 * backdoored['test_acc']:.1f}, "
              f"ASR {100 * backdoored['test_asr']:.1f}")
        common = (f"class-balanced {ratio:g} clean subset ({n_clean} images), {defense_epochs} epochs"
                  + (f", batch {batch}" if batch else "") + (f", lr {lr:g}" if lr else "")
                  + f", evaluated every {eval_every} epoch(s)")
        ft_job = dict(defense="ft-baseline", record=record, epochs=defense_epochs, ratio=ratio, rho=None,
                      device=device, seed=args.seed, eval_every=eval_every, batch_size=batch, lr=lr)
        sam_job = dict(ft_job, defense="ftsam", rho=str(rho))

        def done(label: str, m: dict) -> None:
            stage(f"      {label} done in {m['seconds']:.0f} s: ACC {100 * m['test_acc']:.1f}, "
                  f"ASR {100 * m['test_asr']:.1f}")

        doing = "FT and FT-SAM"
        if parallel:
            stage(f"[2/2] FT (plain fine-tuning) and FT-SAM (ASAM, rho {rho}) side by side, one process each, "
                  f"{common} ...")
            ft, sam = run_defenses_side_by_side(ft_job, sam_job, threads)
            done("FT", ft)
        else:
            stage(f"[2/3] FT (plain fine-tuning), {common} ...")
            ft = run_defense(**ft_job)
            done("FT", ft)
            stage(f"[3/3] FT-SAM (ASAM, rho {rho}), {common} ...")
            sam = run_defense(**sam_job)
        done("FT-SAM", sam)
        if not args.no_retune:
            doing = "the retuning attack"
            stage("[+] retuning attack on each model (Min et al., NeurIPS 2024; `ftsam retune`'s defaults: 2% clean "
                  "data holding 5 poisoned samples, 5 epochs" + ("; --tiny: 50%, 2, 1 epoch" if tiny else "")
                  + ") -> P-ASR ...")
            start = time.perf_counter()
            retune_rows(record, device, (backdoored, ft, sam), tiny)
            stage(f"      done in {time.perf_counter() - start:.0f} s")
    except KeyboardInterrupt as exc:
        raise _stopped(exc, doing, record) from None
    rows = [("no defense", backdoored), ("FT", ft), ("FT-SAM", sam)]
    label = {"folder": "CIFAR-10", "cifar10-download": "CIFAR-10"}.get(data.source, data.source)
    png = plot_curves(os.path.join(record, "demo_curves.png"), f"{args.attack} on {label}, seed {args.seed}",
                      [("FT", ft), ("FT-SAM", sam)], backdoored)
    print()
    print(f"{args.attack} on {label} data, seed {args.seed}, FT-SAM rho {sam['rho']:g} (percent; time = wall seconds "
          f"of the stage" + (", FT and FT-SAM side by side" if parallel else "")
          + ("; P-ASR = ASR after the retuning attack, `ftsam retune`'s defaults)" if not args.no_retune else ")"))
    print(format_table(rows, backdoored))
    print()
    setting = ((ratio, defense_epochs, batch, lr, f"{float(rho):g}")
               if (epochs, width, args.attack) == (15, 0.25, "blended") else None)
    print(sweep_sentence(args.attack, data.source, setting, ft, sam))
    print(f"per-epoch ACC and ASR: {png}")
    print(f"record: {record}  (defense results: {os.path.dirname(ft['result'])}, {os.path.dirname(sam['result'])})")
    print("next, e.g. more epochs or another rho:")
    print(f"  ftsam defend --defense ftsam --result_file {record} --yaml_path cpu --ratio {ratio:g} "
          f"--epochs {2 * defense_epochs} --rho {sam['rho']:g}" + (f" --lr {lr:g}" if lr else "")
          + (f" --batch_size {batch}" if batch else "") + f" --device {device}")
    record_lock.release()
    return 0
