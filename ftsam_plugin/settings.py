"""Settings plumbing shared by `ftsam attack` and the defenses: bool parsing, YAML reading, seeding."""

from __future__ import annotations

import argparse
import random
from typing import Any, Dict

import numpy as np
import torch
import yaml

from ftsam_plugin.errors import FtsamError

__all__ = ["str2bool", "read_yaml", "seed_everything"]


def str2bool(value) -> bool:
    """Parse true/false/1/0/yes/no (any case); argparse error otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got '{value}'")


def read_yaml(path, option: str = "--yaml_path") -> Dict[str, Any]:
    """The mapping in the YAML file `path` (a path or anything with `read_text()`, e.g. a packaged resource).

    An empty file is {}; a file that is missing, does not parse or holds no mapping is an FtsamError naming
    `option` as the fix.
    """
    try:
        if hasattr(path, "read_text"):
            text = path.read_text()
        else:
            with open(path) as handle:
                text = handle.read()
    except OSError as exc:
        raise FtsamError(f"cannot read config {path}: {exc.strerror}; check {option}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise FtsamError(f"config {path} is not valid YAML{line}; fix the file or pass another {option}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FtsamError(f"config {path} must be a mapping of key: value; fix the file")
    return data


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
