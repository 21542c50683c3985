"""The defenses by name, as setup.cfg's `backdoorbench.defenses` entry points name them; each class is imported
on first use, so nothing here imports a defense module (they and the CLI both sit above this table)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

__all__ = ["DEFENSE_LOCATIONS", "DEFENSES", "DEFAULT_DEFENSE"]

# name -> "module:class" (the same strings as the entry points)
DEFENSE_LOCATIONS = {
    "ftsam": "ftsam_plugin.defense.ftsam:FTSAM",
    "ft-baseline": "ftsam_plugin.defense.finetune:FineTune",
}
DEFAULT_DEFENSE = "ftsam"


class _Defenses(Mapping):
    """name -> defense class, read-only; `DEFENSES[name]` imports the class's module."""

    def __getitem__(self, name):
        module, attr = DEFENSE_LOCATIONS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def __iter__(self):
        return iter(DEFENSE_LOCATIONS)

    def __len__(self):
        return len(DEFENSE_LOCATIONS)


DEFENSES = _Defenses()
