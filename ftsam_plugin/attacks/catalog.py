"""Which attacks `ftsam attack` makes, and whose trigger code makes each (`--trigger_from`): decided here only.

  ftsam          ftsam's own triggers (triggers.py), no BackdoorBench needed: badnet, blended
  backdoorbench  BackdoorBench's own code and resources from the checkout BACKDOORBENCH_ROOT names
                 (backdoorbench.py): badnet, blended, lf, sig, ctrl, ftrojann, and ssba, lc (their files are made by
                 BackdoorBench's own generators; a checkout lacks them)

The default is ftsam where ftsam has the attack, else backdoorbench: a command means the same record with and
without BACKDOORBENCH_ROOT set. So `--attack blended` is ftsam's code-generated pattern (as in the project's
published Blended records), and BackdoorBench's Blended (resource/blended/hello_kitty.jpeg) is
`--attack blended --trigger_from backdoorbench`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from ftsam_plugin import __version__
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.settings import quote

from . import backdoorbench
from .poison import Poisoning, TriggerPoisoning
from .triggers import TRIGGERS, create_trigger

__all__ = ["SOURCES", "PreparedAttack", "names", "sources", "default_source", "resolve_source", "prepare", "overview"]

FTSAM, BACKDOORBENCH = "ftsam", "backdoorbench"
SOURCES = (FTSAM, BACKDOORBENCH)
# what each of ftsam's own triggers reads from the settings
FTSAM_OPTIONS = {"badnet": ("patch_size",), "blended": ("blended_alpha",)}


def _tables() -> Dict[str, Mapping[str, Any]]:
    return {FTSAM: TRIGGERS, BACKDOORBENCH: backdoorbench.ATTACKS}


def names() -> Tuple[str, ...]:
    """Every attack name, whatever makes it."""
    return tuple(sorted(set().union(*_tables().values())))


def sources(name: str) -> Tuple[str, ...]:
    """Whose trigger code can make attack `name`, the default first."""
    return tuple(source for source, table in _tables().items() if name in table)


def default_source(name: str) -> str:
    return sources(name)[0]


def resolve_source(name: str, requested: Optional[str] = None) -> str:
    """The trigger code for attack `name`: `requested` or the default. FtsamError for an unknown attack or source, or
    one the attack lacks."""
    name = str(name).lower()
    if name not in names():
        raise FtsamError(f"unknown attack {quote(name)}; choose one of {', '.join(names())}")
    if requested is None:
        return default_source(name)
    requested = str(requested).lower()
    if requested not in SOURCES:
        raise FtsamError(f"unknown --trigger_from {quote(requested)}; choose one of {', '.join(SOURCES)}")
    if requested not in sources(name):
        raise FtsamError(f"attack {name} has no {requested} trigger, only {', '.join(sources(name))}'s; drop "
                         f"--trigger_from {requested}")
    return requested


@dataclass
class PreparedAttack:
    """An attack ready to poison: its poisoning and, for the record's info.pickle, where its trigger comes from."""

    name: str
    source: str  # ftsam | backdoorbench
    poisoning: Poisoning
    trigger_source: str  # e.g. 'backdoorbench f02e353 resource/lowFrequency/... sha256:...'
    trigger_settings: str  # e.g. 'attack=lowFrequency, attack_target=0, ...'


def prepare(name: str, source: str, config: Mapping[str, Any], img_size: Sequence[int]) -> PreparedAttack:
    """Build attack `name` from `source`'s code with `config` (attack_target, pratio, dataset, model, and
    patch_size / blended_alpha for ftsam's triggers, bd_yaml_path for BackdoorBench's). Checks everything it can
    before any output exists (FtsamError)."""
    target, pratio = int(config["attack_target"]), float(config["pratio"])
    if source == BACKDOORBENCH:
        poisoning = backdoorbench.BackdoorBenchPoisoning(name, str(config["dataset"]).lower(), str(config["model"]),
                                                         pratio, target, config.get("bd_yaml_path"))
        return PreparedAttack(name, source, poisoning, poisoning.source(), poisoning.settings())
    options = {key: config[key] for key in FTSAM_OPTIONS.get(name, ())}
    trigger = create_trigger(name, img_size, **options)
    settings = ", ".join(f"{k}={v}" for k, v in
                         sorted({**options, "attack_target": target, "pratio": pratio}.items()))
    described = " ".join((TRIGGERS[name].__doc__ or name).split())
    return PreparedAttack(name, source, TriggerPoisoning(trigger, target, pratio, img_size),
                          f"ftsam-plugin {__version__} attacks/triggers.py: {described}", settings)


def overview() -> str:
    """The attacks with and without BackdoorBench, for `ftsam attack --help` (docs/commands.md says the same)."""
    lines = ["attacks:",
             f"  without BackdoorBench (ftsam's own triggers): {', '.join(sorted(TRIGGERS))}",
             f"  with {backdoorbench.ENV} set to a BackdoorBench checkout, also BackdoorBench's own trigger code",
             "  and files (--trigger_from backdoorbench; the default for attacks ftsam has no trigger for):"]
    for name, spec in sorted(backdoorbench.ATTACKS.items()):
        lines.append(f"    {name:10s}{spec.trigger}")
    lines += ["  --attack blended is ftsam's code-generated pattern, with or without BackdoorBench;",
              "  BackdoorBench's hello_kitty Blended is --attack blended --trigger_from backdoorbench."]
    return "\n".join(lines)
