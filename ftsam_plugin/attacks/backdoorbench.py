"""BackdoorBench's own poisoning code, imported at run time from the checkout named by BACKDOORBENCH_ROOT.

Nothing of BackdoorBench is copied here. For an attack in ATTACKS, BackdoorBench's code does all of the deciding:
  - its attack class (e.g. attack/lf.py's LowFrequency) parses the settings, merges its YAMLs
    (config/attack/prototype/<dataset>.yaml, config/attack/<attack>/default.yaml or --bd_yaml_path) and runs its
    process_args (e.g. LF's default pattern file resource/lowFrequency/<dataset>_<model>_0_255.npy);
  - utils/aggregate_block/bd_attack_generate.py builds the image and label transforms;
  - utils/backdoor_generate_poison_index.py picks the poisoned samples (clean-label: target-class images only).
They are called in the order BackdoorBench's `stage1_non_training_data_prepare` calls them: seeds (fix_random's:
python, NumPy, torch) -> transforms -> train indices -> train images in index order -> test indices -> test images.
So the same input, seed and settings give BackdoorBench's images and indices. ftsam supplies the clean images and
stores the poisoned ones (poison.py: BackdoorBench's PNG layout and record state).

Relative file paths in BackdoorBench's settings (`./resource/...`) are relative to the checkout, as when
BackdoorBench runs from its root. BackdoorBench f02e353 still uses `np.float` (removed in NumPy 1.24; it was the
builtin `float`): while its code runs here, `numpy.float` is set to `float`, and removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import yaml

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.settings import seed_everything

__all__ = ["ENV", "FIX", "ATTACKS", "BackdoorBenchAttack", "BackdoorBenchPoisoning", "find_root", "checkout_commit"]

ENV = "BACKDOORBENCH_ROOT"
FIX = f"set {ENV} to a BackdoorBench checkout"
GENERATE = "utils.aggregate_block.bd_attack_generate"
POISON_INDEX = "utils.backdoor_generate_poison_index"
# settings that are paths but not trigger files
NOT_TRIGGER_FILES = {"dataset_path", "yaml_path", "bd_yaml_path", "save_path"}


@dataclass(frozen=True)
class BackdoorBenchAttack:
    """One of BackdoorBench's pure data-poisoning attacks, as its attack script defines it."""

    module: str  # the attack script as a module (run from the checkout root), e.g. "attack.lf"
    cls: str  # its attack class
    yaml: str  # its default attack YAML, relative to the root (ftrojann's script names a folder that is absent)
    clean_label: bool  # whether its stage1 picks train samples with clean_label=True (target-class images only)
    trigger: str  # what the trigger is (--help, docs)
    hint: str = "pass --bd_yaml_path with a YAML naming the file"  # how to supply a missing file


ATTACKS: Dict[str, BackdoorBenchAttack] = {
    "badnet": BackdoorBenchAttack("attack.badnet", "BadNet", "config/attack/badnet/default.yaml", False,
                                  "3x3 white patch, resource/badnet/trigger_image.png"),
    "blended": BackdoorBenchAttack("attack.blended", "Blended", "config/attack/blended/default.yaml", False,
                                   "resource/blended/hello_kitty.jpeg blended in, alpha 0.2"),
    "lf": BackdoorBenchAttack("attack.lf", "LowFrequency", "config/attack/lf/default.yaml", False,
                              "low-frequency perturbation, resource/lowFrequency/<dataset>_<model>_0_255.npy"),
    "sig": BackdoorBenchAttack("attack.sig", "SIG", "config/attack/sig/default.yaml", True,
                               "sinusoidal signal (delta 40, f 6), clean-label"),
    "ctrl": BackdoorBenchAttack("attack.ctrl", "ctrl", "config/attack/ctrl/default.yaml", True,
                                "frequency-domain trigger (YUV, DCT), clean-label"),
    "ftrojann": BackdoorBenchAttack("attack.ftrojann", "Ftrojann", "config/attack/ftrojannn/default.yaml", False,
                                    "frequency-domain trigger (YUV, DCT)"),
    "ssba": BackdoorBenchAttack("attack.ssba", "SSBA", "config/attack/ssba/default.yaml", False,
                                "sample-specific; needs resource/ssba/<dataset>_ssba_*_b1.npy (not in a checkout)",
                                hint="make it with BackdoorBench's resource/ssba encoder (see its readme.md)"),
    "lc": BackdoorBenchAttack("attack.lc", "LabelConsistent", "config/attack/lc/default.yaml", True,
                              "label-consistent, clean-label; needs resource/label-consistent/data/ (not in a "
                              "checkout)",
                              hint="make it with BackdoorBench's resource/label-consistent (see its readme.md)"),
}


# ------------------------------------------------------------------------------------------- finding the checkout


def find_root(environ=None) -> Optional[str]:
    """The checkout BACKDOORBENCH_ROOT names (absolute), or None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    return os.path.abspath(value) if value else None


def require_root(what: str) -> str:
    """The checkout, or FtsamError '<what> uses BackdoorBench's trigger code; set BACKDOORBENCH_ROOT ...'."""
    root = find_root()
    if root is None:
        raise FtsamError(f"{what} uses BackdoorBench's trigger code; {FIX}")
    if not os.path.isfile(os.path.join(root, *GENERATE.split(".")) + ".py"):
        raise FtsamError(f"{ENV}={root} is not a BackdoorBench checkout (no {GENERATE.replace('.', '/')}.py); {FIX}")
    return root


def checkout_commit(root: str) -> str:
    """The checkout's short git commit, or "(commit unknown: not a git checkout)"."""
    try:
        top = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], cwd=root, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        if os.path.realpath(top) == os.path.realpath(root):
            return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                           stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "(commit unknown: not a git checkout)"


@contextlib.contextmanager
def _numpy_float() -> Iterator[None]:
    """`numpy.float`, BackdoorBench's NumPy < 1.24 alias of the builtin `float`, while its code runs."""
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


@contextlib.contextmanager
def _running() -> Iterator[None]:
    """While BackdoorBench's setup code runs: `numpy.float` exists, and its root-logger chatter below ERROR is muted.
    Its module-level `logging.info(...)` calls install a console handler on the root logger when it has none
    (logging.basicConfig); any handler added meanwhile is removed afterwards, so ftsam's own log stays in its file."""
    muted, handlers = logging.root.manager.disable, list(logging.root.handlers)
    logging.disable(max(muted, logging.WARNING))
    try:
        with _numpy_float():
            yield
    finally:
        logging.disable(muted)
        for handler in [h for h in logging.root.handlers if h not in handlers]:
            logging.root.removeHandler(handler)


def _import(root: str, module: str):
    """Import one of BackdoorBench's modules from `root` (its folders are top-level packages: utils, attack, models).
    The checkout stays first on sys.path (its functions import lazily); what its scripts add to sys.path is undone."""
    before = [p for p in sys.path if p != root]
    sys.path[:] = [root] + before
    try:
        spec = importlib.util.find_spec(GENERATE)
        origin = spec.origin if spec is not None else None
        if origin is None or not os.path.samefile(origin, os.path.join(root, *GENERATE.split(".")) + ".py"):
            raise FtsamError(f"BackdoorBench's {GENERATE} resolves to {origin}, not to {root}: another package named "
                             f"'utils' shadows it; {FIX} in a Python environment without such a package")
        dont_write = sys.dont_write_bytecode
        sys.dont_write_bytecode = True  # the checkout is read, never written
        try:
            with warnings.catch_warnings():  # its dependencies' deprecation notices are not the user's to act on
                warnings.simplefilter("ignore")
                return importlib.import_module(module)
        finally:
            sys.dont_write_bytecode = dont_write
    except ImportError as exc:
        raise FtsamError(f"BackdoorBench at {root} cannot be imported ({type(exc).__name__}: {exc}); install its "
                         f"dependencies: pip install 'ftsam-plugin[backdoorbench]'") from None
    finally:
        sys.path[:] = [root] + before


def _sha(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------- the poisoning


class BackdoorBenchPoisoning:
    """BackdoorBench's attack `name` on `dataset` for `model`, all-to-one to `target` (see the module docstring).

    Construction checks everything (checkout, imports, settings, trigger files, transforms) before any output
    exists; `start(seed)` then seeds and rebuilds the transforms as BackdoorBench's stage1 does.

    Raises:
        FtsamError: no checkout, an import failure, a missing trigger file, or settings BackdoorBench refuses.
    """

    def __init__(self, name: str, dataset: str, model: str, pratio: float, target: int,
                 bd_yaml_path: Optional[str] = None):
        self.name, self.spec = name, ATTACKS[name]
        self.root = require_root(f"attack {name}")
        with _running():
            self._generate = _import(self.root, GENERATE)
            self._poison_index = _import(self.root, POISON_INDEX)
            self.args = self._settings(dataset, model, pratio, target, bd_yaml_path)
            self._check_files()
            self._build()

    # --- settings: BackdoorBench's attack class, as its __main__ runs it
    def _settings(self, dataset, model, pratio, target, bd_yaml_path) -> argparse.Namespace:
        attack = getattr(_import(self.root, self.spec.module), self.spec.cls)()
        parser = attack.set_bd_args(attack.set_args(argparse.ArgumentParser(prog=self.spec.module)))
        prototype = os.path.join(self.root, "config", "attack", "prototype", f"{dataset}.yaml")
        self.bd_yaml_path = os.path.abspath(bd_yaml_path) if bd_yaml_path else os.path.join(self.root, self.spec.yaml)
        for path, what in ((prototype, f"BackdoorBench's settings for {dataset}"),
                           (self.bd_yaml_path, f"BackdoorBench's {self.name} settings (--bd_yaml_path)")):
            if not os.path.isfile(path):
                raise FtsamError(f"{what} {path} not found; check {ENV} or --bd_yaml_path")
        argv = ["--yaml_path", prototype, "--bd_yaml_path", self.bd_yaml_path, "--dataset", dataset, "--model", model,
                "--pratio", repr(float(pratio)), "--attack_target", str(int(target)), "--attack_label_trans", "all2one"]
        try:
            args = parser.parse_args(argv)
            attack.add_bd_yaml_to_args(args)
            attack.add_yaml_to_args(args)
            args = attack.process_args(args)
        except (SystemExit, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
            raise FtsamError(f"BackdoorBench's {self.name} refused its settings ({type(exc).__name__}: {exc}); check "
                             f"--bd_yaml_path {self.bd_yaml_path}") from None
        for key in self._file_keys(args):
            value = getattr(args, key)
            setattr(args, key, value if os.path.isabs(value) else os.path.normpath(os.path.join(self.root, value)))
        return args

    @staticmethod
    def _file_keys(args) -> List[str]:
        return sorted(k for k, v in vars(args).items()
                      if isinstance(v, str) and k.lower().endswith("path") and k not in NOT_TRIGGER_FILES)

    def _check_files(self) -> None:
        for key in self._file_keys(self.args):
            path = getattr(self.args, key)
            if not os.path.exists(path):
                raise FtsamError(f"BackdoorBench's {self.name} needs {self._shown(path)} ({key}), which is not in "
                                 f"{self.root}; {self.spec.hint}")

    def _shown(self, path: str) -> str:
        rel = os.path.relpath(path, self.root)
        return path if rel.startswith("..") else rel.replace(os.sep, "/")

    def _build(self) -> None:
        args = self.args
        try:
            self.train_transform, self.test_transform = self._generate.bd_attack_img_trans_generate(args)
            self.label_transform = self._generate.bd_attack_label_trans_generate(args)
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise FtsamError(f"BackdoorBench's {self.name} trigger cannot be built ({type(exc).__name__}: {exc}); "
                             f"check --bd_yaml_path {self.bd_yaml_path}") from None

    # --- provenance, for the record's info.pickle
    @property
    def clean_label(self) -> bool:
        return self.spec.clean_label

    def source(self) -> str:
        """'backdoorbench <commit> <trigger files with sha256>' (or the transform module when there is no file)."""
        files = [f"{self._shown(getattr(self.args, k))} sha256:{_sha(getattr(self.args, k))}"
                 for k in self._file_keys(self.args) if os.path.isfile(getattr(self.args, k))]
        what = ", ".join(files) or f"{GENERATE.replace('.', '/')}.py attack={self.args.attack}"
        return f"backdoorbench {checkout_commit(self.root)} {what}"

    def settings(self) -> str:
        """The attack's settings as BackdoorBench resolved them: its attack YAML's keys and the trigger files."""
        with open(self.bd_yaml_path) as handle:
            keys = set(yaml.safe_load(handle) or {}) | set(self._file_keys(self.args))
        shown = {k: self._shown(v) if k in self._file_keys(self.args) else v
                 for k, v in vars(self.args).items() if k in keys}
        return ", ".join(f"{k}={shown[k]}" for k in sorted(shown))

    # --- stage1, in BackdoorBench's order
    def start(self, seed: int) -> None:
        """Seed python, NumPy and torch (BackdoorBench's fix_random seeds) and rebuild the transforms."""
        seed_everything(int(seed))
        with _running():
            self._build()

    def train_indicator(self, labels: Sequence[int]) -> np.ndarray:
        """BackdoorBench's train poison indicator (global NumPy generator; clean-label: target-class images only)."""
        labels = np.asarray(labels)
        wanted, target = round(float(self.args.pratio) * len(labels)), int(self.args.attack_target)
        if self.clean_label and wanted > int((labels == target).sum()):
            raise FtsamError(f"{self.name} poisons only target-class images: --pratio {self.args.pratio} asks for "
                             f"{wanted} of {len(labels)} train images but class {target} has "
                             f"{int((labels == target).sum())}; lower --pratio")
        return self._indicator(labels, train=True, pratio=float(self.args.pratio), p_num=getattr(self.args, "p_num",
                                                                                                  None),
                               clean_label=self.clean_label)

    def test_indicator(self, labels: Sequence[int]) -> np.ndarray:
        return self._indicator(np.asarray(labels), train=False)

    def _indicator(self, labels: np.ndarray, **options) -> np.ndarray:
        with _running():
            try:
                return np.asarray(self._poison_index.generate_poison_index_from_label_transform(
                    labels, label_transform=self.label_transform, **options))
            except SystemExit as exc:  # BackdoorBench exits when nothing is poisoned
                raise FtsamError(f"BackdoorBench's {self.name} chose no sample to poison ({exc}); raise --pratio or "
                                 f"add data") from None

    def poison(self, img, label: int, index: int, train: bool):
        """BackdoorBench's train or test transform of one clean image (PIL), as its dataset calls it."""
        transform = self.train_transform if train else self.test_transform
        with _numpy_float():
            return transform(img, target=int(label), image_serial_id=int(index))

    def bd_label(self, label: int) -> int:
        return int(self.label_transform(int(label)))
