"""The retuning attack's settings: one frozen dataclass, its defaults with where each comes from, its flags.

Defaults follow Min et al.'s released script (AISafety-HKUST/stable_backdoor_purification, `fine_tune/ft_poison.py`,
and the `--epochs 5` of the command in that repository's README). Flags use BackdoorBench's spelling where
BackdoorBench has the option (`--lr`, `--sgd_momentum`, `--wd`, `--batch_size`, `--epochs`, `--random_seed`) and the
reference script's otherwise (`--split_ratio`, `--poison_num`).
"""

from __future__ import annotations

import argparse
import math
import shlex
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, Iterable, Optional, Sequence

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.settings import SEED_MAX

__all__ = ["RetuneSettings", "DEFAULT_SOURCES", "add_settings_arguments", "settings_from_args", "parse_settings"]

REFERENCE = "ft_poison.py"
DEFAULT_SOURCES = {
    "split_ratio": f"{REFERENCE} --split_ratio default",
    "poison_num": f"{REFERENCE} --poison_num default",
    "epochs": "the ft_poison.py command in the reference README (--epochs 5; the script has no default)",
    "lr": f"{REFERENCE} --lr default",
    "sgd_momentum": f"{REFERENCE} (optim.SGD(momentum=0.9))",
    "wd": f"{REFERENCE} (optim.SGD without weight_decay)",
    "batch_size": f"{REFERENCE} --batch_size default",
    "random_seed": f"{REFERENCE} --random_seed default",
}
HELP = {
    "split_ratio": "fraction of the clean training set drawn uniformly at random for retuning",
    "poison_num": "how many of the drawn samples are replaced by the record's poisoned training images "
                  "(0: the control run, clean data only)",
    "epochs": "retuning epochs",
    "lr": "SGD learning rate (constant)",
    "sgd_momentum": "SGD momentum",
    "wd": "SGD weight decay",
    "batch_size": "retuning batch size",
    "random_seed": "seed of the data draw, the augmentation and the batch order",
}


@dataclass(frozen=True)
class RetuneSettings:
    """What a retuning run does (everything that changes its result; see DEFAULT_SOURCES for the defaults).

    Args:
        split_ratio: int(N * split_ratio) clean training samples, a uniform draw without replacement.
        poison_num: the first `poison_num` drawn samples are replaced by poisoned training images of the record.
        epochs, lr, sgd_momentum, wd, batch_size: plain SGD with cross-entropy, constant lr.
        random_seed: seeds the clean draw, the poisoned-image draw, the augmentation and the batch order, each from
            its own stream, so the control (`poison_num` 0) gets the same clean data and schedule.
    """

    split_ratio: float = 0.02
    poison_num: int = 5
    epochs: int = 5
    lr: float = 0.01
    sgd_momentum: float = 0.9
    wd: float = 0.0
    batch_size: int = 128
    random_seed: int = 42

    def __post_init__(self):
        checks = (
            ("split_ratio", 0.0 < self.split_ratio <= 1.0, "is outside (0, 1]; pass e.g. --split_ratio 0.02"),
            ("poison_num", self.poison_num >= 0, "must be >= 0 (0 is the clean control)"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "must be a positive number"),
            ("sgd_momentum", 0.0 <= self.sgd_momentum < 1.0, "must be in [0, 1)"),
            ("wd", math.isfinite(self.wd) and self.wd >= 0, "must be >= 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("random_seed", 0 <= self.random_seed <= SEED_MAX, f"must be in [0, {SEED_MAX}]"),
        )
        for name, ok, problem in checks:
            if not ok:
                raise FtsamError(f"--{name} {getattr(self, name)} {problem}")

    @property
    def tag(self) -> str:
        """The run's folder name under `retune/`: every setting, e.g. `p5_r0.02_e5_lr0.01_m0.9_wd0_b128_s42`."""
        return (f"p{self.poison_num}_r{self.split_ratio:.10g}_e{self.epochs}_lr{self.lr:.10g}_"
                f"m{self.sgd_momentum:.10g}_wd{self.wd:.10g}_b{self.batch_size}_s{self.random_seed}")

    def control(self) -> "RetuneSettings":
        """The same run without poisoned samples (relearning vs forgetting)."""
        return replace(self, poison_num=0)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


NAMES = tuple(f.name for f in fields(RetuneSettings))
_TYPES = {f.name: (int if f.type in ("int", int) else float) for f in fields(RetuneSettings)}


def add_settings_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The settings' flags, all defaulting to None (unset: the reference's default, named in the log)."""
    defaults = RetuneSettings()
    for name in NAMES:
        parser.add_argument(f"--{name}", type=_TYPES[name], default=None,
                            help=f"{HELP[name]} (default {getattr(defaults, name)}: {DEFAULT_SOURCES[name]})")
    return parser


def settings_from_args(args: argparse.Namespace) -> RetuneSettings:
    """RetuneSettings from parsed flags (None: the default). Raises FtsamError on an out-of-range value."""
    given = {name: getattr(args, name) for name in NAMES if getattr(args, name, None) is not None}
    return RetuneSettings(**given)


def describe(settings: RetuneSettings, given: Iterable[str] = ()) -> str:
    """One line per setting: its value and whether it was given or where its default comes from."""
    given = set(given)
    return "\n".join(f"  {name} = {getattr(settings, name)} ({'given' if name in given else DEFAULT_SOURCES[name]})"
                     for name in NAMES)


def given_names(args: argparse.Namespace) -> Sequence[str]:
    return [name for name in NAMES if getattr(args, name, None) is not None]


def parse_settings(text: Optional[str]) -> RetuneSettings:
    """RetuneSettings from a flag string such as "--poison_num 10 --random_seed 1" (`ftsam leaderboard --retune_args`).

    Raises:
        FtsamError: an unknown flag, a value that does not parse, or one out of range.
    """
    parser = _RaisingParser(prog="--retune_args", add_help=False, text=text)
    add_settings_arguments(parser)
    try:
        args, rest = parser.parse_known_args(shlex.split(text or ""))
    except ValueError as exc:  # shlex: unbalanced quotes
        raise FtsamError(f"--retune_args {text!r}: {exc}; quote it as one argument") from None
    if rest:
        raise FtsamError(f"--retune_args {text!r}: unknown {' '.join(rest)}; allowed: "
                         + ", ".join(f"--{n}" for n in NAMES))
    return settings_from_args(args)


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises FtsamError instead of printing usage and exiting."""

    def __init__(self, *args, text=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.text = text

    def error(self, message):
        raise FtsamError(f"--retune_args {self.text!r}: {message}; pass flags of `ftsam retune`, "
                         f"e.g. '--poison_num 10'")
