"""Settings plumbing shared by `ftsam attack` and the defenses: bool parsing, YAML reading, number rules, seeding.

YAML configs are untrusted text: `read_yaml` reads UTF-8 only, refuses duplicate keys, and refuses a file whose
aliases (`&a` / `*a`) would expand it past MAX_CONFIG_NODES values (a "billion laughs" file is a few lines). Values
are checked against `Number` rules (finite, in range, an integer where one is needed, never a boolean) and error
lines quote what was given, shortened by `quote`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import reprlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
import yaml

from ftsam_plugin.errors import FtsamError

__all__ = ["str2bool", "read_yaml", "seed_everything", "quote", "Number", "Text", "check_numbers", "check_flags",
           "TRAINING_RULES", "FRACTION", "usable_cores", "threads_rule",
           "SEED_MAX", "MAX_WIDTH", "MAX_CONFIG_NODES", "MAX_CONFIG_BYTES"]

MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes
MAX_CONFIG_NODES = 10_000  # values after alias expansion; a real config has about a hundred
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit

_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = 60
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 6
_QUOTE.maxlevel = 2


MAX_QUOTE = 100


def quote(value: Any) -> str:
    """repr(value) shortened for an error line (long strings and containers are cut, never expanded in full)."""
    text = _QUOTE.repr(value)
    return text if len(text) <= MAX_QUOTE else text[:MAX_QUOTE - 3] + "..."


def str2bool(value) -> bool:
    """Parse true/false/1/0/yes/no (any case); argparse error otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {quote(value)}")


# ---------------------------------------------------------------------------------------------- YAML


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no Python tags) that also refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: Dict[tuple, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key_node.value, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


def _expanded_size(root) -> float:
    """How many nodes the document has once every alias is expanded (inf for a recursive alias). Aliases share
    their node object, so sizes are memoised per node: linear in the file, whatever the expansion."""
    sizes: Dict[int, float] = {}
    active = set()

    def children(node):
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children(node))
            continue
        if key in sizes:
            continue
        if key in active:
            return math.inf  # an alias inside its own anchor
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _read_text(path, option: str) -> str:
    try:
        if hasattr(path, "read_bytes"):
            data = path.read_bytes()
        else:
            with open(path, "rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise FtsamError(f"cannot read config {path}: {exc.strerror}; check {option}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise FtsamError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes, too large for a config; "
                         f"check {option}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FtsamError(f"config {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         f"save it as UTF-8 or pass another {option}") from None


def read_yaml(path, option: str = "--yaml_path") -> Dict[str, Any]:
    """The mapping in the YAML file `path` (a path or anything with `read_bytes()`, e.g. a packaged resource).

    An empty file is {}. A file that is missing, not UTF-8, too large, does not parse, holds no mapping, repeats a
    key or expands past MAX_CONFIG_NODES values through aliases is an FtsamError naming `option` as the fix.
    """
    text = _read_text(path, option)
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node) > MAX_CONFIG_NODES:
            raise FtsamError(f"config {path} expands to more than {MAX_CONFIG_NODES} values through its aliases "
                             f"(&name / *name); write the values out or pass another {option}")
        data = loader.construct_document(node) if node is not None else None
    except _DuplicateKey as dup:
        raise FtsamError(f"config {path} gives key {quote(dup.key)} twice (lines {dup.first} and {dup.again}); "
                         f"keep one") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise FtsamError(f"config {path} is not valid YAML{line}; fix the file or pass another {option}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FtsamError(f"config {path} must be a mapping of key: value; fix the file")
    return data


# ---------------------------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class Number:
    """What a numeric setting may be: an integer or a finite float, within [low, high] (open ends if asked).

    Booleans are refused (YAML's `true` is not 1); a float with a fraction is refused where an integer is needed;
    numeric strings ("1e-4", which YAML 1.1 reads as text) are parsed.
    """

    integer: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""  # said after the rule in error lines, e.g. where a bound comes from

    def describe(self) -> str:
        return self._range() + (f" ({self.why})" if self.why else "")

    def _range(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low, high = _bound(self.low), _bound(self.high)
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {high}"
        return kind

    def parse(self, value: Any):
        """The value as int/float, or None if it breaks the rule."""
        if isinstance(value, bool) or not isinstance(value, (int, float, str, np.integer, np.floating)):
            return None
        try:
            number = float(value) if not isinstance(value, (int, np.integer)) else int(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if isinstance(number, float):
            if not math.isfinite(number):
                return None
            if self.integer:
                if not number.is_integer():
                    return None
                number = int(number)
        elif not self.integer:
            number = float(number)
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            return None
        if self.high is not None and (number > self.high or (self.high_open and number == self.high)):
            return None
        return number


@dataclass(frozen=True)
class Text:
    """What a path or name setting may be: non-empty text (a YAML number, boolean or list is refused: `index: 5`
    would otherwise open file descriptor 5, `log: true` a folder named True)."""

    what: str = "a path"

    def describe(self) -> str:
        return f"{self.what} (text)"

    def parse(self, value: Any):
        if isinstance(value, str) and value.strip() and "\x00" not in value:
            return value
        return None


def _bound(value: Optional[float]) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else f"{value}"


def check_numbers(cfg: Dict[str, Any], rules: Mapping[str, Any], fix: str = "fix --{key}") -> Dict[str, Any]:
    """Replace each `cfg[key]` that has a rule (a Number or Text: `parse`, `describe`) and is not None by its parsed
    value; FtsamError on the first that breaks its rule: '<key> must be <rule>, got <value as given>; <fix>' (`fix`
    may use {key})."""
    for key, rule in rules.items():
        value = cfg.get(key)
        if value is None:
            continue
        number = rule.parse(value)
        if number is None:
            raise FtsamError(f"{key} must be {rule.describe()}, got {quote(value)}; {fix.format(key=key)}")
        cfg[key] = number
    return cfg


def check_flags(args: argparse.Namespace, rules: Mapping[str, Any]) -> argparse.Namespace:
    """`check_numbers` on a command's parsed flags (in place): every command checks all its flags this way before
    it reads, writes or moves anything. FtsamError: '<flag> must be <rule>, got <value>; fix --<flag>'."""
    check_numbers(vars(args), rules)
    return args


MAX_WIDTH = 16.0  # PreAct-ResNet18 at width 16 has 1024 base channels
# the training settings `ftsam attack` and the defenses share, with BackdoorBench's names
TRAINING_RULES = {
    "epochs": Number(integer=True, low=1),
    "batch_size": Number(integer=True, low=1),
    "num_workers": Number(integer=True, low=0),
    "random_seed": Number(integer=True, low=0, high=SEED_MAX),
    "lr": Number(low=0, high=1000, low_open=True),  # (a larger one overflows float32 steps)
    "sgd_momentum": Number(low=0, high=1, high_open=True),
    "wd": Number(low=0),
    "width": Number(low=0, high=MAX_WIDTH, low_open=True),
}


# a stored ACC, ASR or RA (a summary, an evaluation cache, a per-epoch CSV): finite, in [0, 1]; 95.0 is a percent
FRACTION = Number(low=0, high=1)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it, e.g. inside a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_rule() -> Number:
    """What a `--threads` flag may be: 1 up to the usable cores (more threads than cores only contend for them; a
    demo at `--threads 999` on 2 cores ran many times longer and outlived SIGTERM)."""
    return Number(integer=True, low=1, high=usable_cores(), why="the CPU cores this process may use")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
