"""Protocols: how a defense runs, as one registered object per protocol (`--protocol NAME`).

A `Protocol` holds one `Recipe` per kind of defense (SAM or plain fine-tuning); a recipe says how the clean subset
is drawn, how the lr schedule steps, how SAM restores its weights, which loss trains, which values it imposes
over the YAML (unless given on the command line) and how AMP is chosen. The pipeline asks the recipe and never
tests the protocol's name; adding a protocol is one new entry in `PROTOCOLS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

__all__ = ["Recipe", "Protocol", "PROTOCOLS", "AMP_POLICIES", "CONFIG_NOTES", "get_recipe"]


def _frozen(values=None) -> Mapping:
    return MappingProxyType(dict(values or {}))


def _amp_from_config(cfg: Mapping) -> Dict[str, object]:
    return {}


def _amp_off(cfg: Mapping) -> Dict[str, object]:
    return {"amp": False}


def _amp_fp16_on_cuda(cfg: Mapping) -> Dict[str, object]:
    # BackdoorBench's trainer: torch.cuda.amp.autocast + GradScaler(enabled=amp), amp: True in its YAMLs; neither
    # does anything on a CPU run
    on_cuda = str(cfg.get("device") or "cpu").startswith("cuda")
    return {"amp": True, "amp_dtype": "fp16"} if on_cuda else {"amp": False}


# name -> policy(cfg) -> the AMP values a recipe imposes (applied like `Recipe.effective`: flags given win)
AMP_POLICIES = {"config": _amp_from_config, "off": _amp_off, "fp16_on_cuda": _amp_fp16_on_cuda}

LIKE_FOR_LIKE = "--protocol backdoorbench runs the reference's recipe"


def _amp_vs_ftsam_py(cfg: Mapping, given) -> Optional[str]:
    # a reference YAML (config/defense/ft-sam/*.yaml says amp: True) turns AMP on; ft-sam.py never applied it
    if not cfg.get("amp") or "amp" in given:
        return None
    return (f"amp is on from the config ({cfg.get('amp_dtype')} autocast on {cfg.get('device')}); BackdoorBench's "
            f"ft-sam.py never applies its YAML's amp and trains in fp32: pass --amp false, or {LIKE_FOR_LIKE}")


def _amp_vs_ft_py(cfg: Mapping, given) -> Optional[str]:
    if not cfg.get("amp") or "amp" in given:
        return None
    return (f"amp is on from the config ({cfg.get('amp_dtype')} autocast on {cfg.get('device')}); BackdoorBench's "
            f"ft.py runs fp16 autocast on CUDA only, none on CPU: pass --amp false, or {LIKE_FOR_LIKE}")


def _smoothing_vs_ft_py(cfg: Mapping, given) -> Optional[str]:
    if not cfg.get("label_smoothing") or "label_smoothing" in given:
        return None
    return (f"label smoothing {cfg.get('label_smoothing')} (config or default); BackdoorBench's ft.py trains with "
            f"plain cross-entropy: pass --label_smoothing 0, or {LIKE_FOR_LIKE}")


# name -> note(cfg, given) -> a log line where a value the config (not a flag) set differs from what the reference
# script ran, else None (`Recipe.config_notes`)
CONFIG_NOTES = {"amp_vs_ftsam_py": _amp_vs_ftsam_py, "amp_vs_ft_py": _amp_vs_ft_py,
                "smoothing_vs_ft_py": _smoothing_vs_ft_py}


@dataclass(frozen=True)
class Recipe:
    """How one defense runs under a protocol.

    Args:
        subset: the clean-subset draw, a `subsets.SUBSET_DRAWS` key (an --index file always wins).
        step_per_batch: step the lr scheduler after every batch (else once per epoch; ReduceLROnPlateau is always
            stepped per epoch, with the epoch's train loss).
        cos_t_max: the cosine schedule's T_max when --cos_t_max is not given; None: the run's epochs.
        restore: how SAM undoes its perturbation when --restore is not given ('copy' or 'subtract').
        loss: the training loss, a `losses.LOSSES` key (its smoothing is `label_smoothing`).
        effective: values used whatever the YAML says, unless given on the command line.
        by_dataset: dataset -> values used on that dataset (as `effective`).
        amp: the AMP policy, an `AMP_POLICIES` key.
        train_loss_per_sample: the train-loss CSV column is the mean over samples (batch losses weighted by batch
            size); False: the plain mean of the batch losses.
        ignored_flags: flag -> (the reference's key it used instead, that key's default): flags we apply and the
            reference ignored; a run given one logs what the reference would have run (`notes`).
        config_notes: `CONFIG_NOTES` keys: config values that differ from the reference script's, each a log line
            (`notes`) unless its flag was given.
    """

    subset: str = "class_balanced"
    step_per_batch: bool = False
    cos_t_max: Optional[int] = None
    restore: str = "copy"
    loss: str = "smooth_crossentropy"
    effective: Mapping[str, object] = field(default_factory=_frozen)
    by_dataset: Mapping[str, Mapping[str, object]] = field(default_factory=_frozen)
    amp: str = "config"
    train_loss_per_sample: bool = True
    ignored_flags: Mapping[str, Tuple[str, object]] = field(default_factory=_frozen)
    config_notes: Tuple[str, ...] = ()

    def imposed(self, cfg: Mapping) -> Dict[str, object]:
        """Every value this recipe sets on the config `cfg` (before flags given on the command line win)."""
        values = dict(self.effective)
        values.update(self.by_dataset.get(str(cfg.get("dataset") or "").lower(), {}))
        values.update(AMP_POLICIES[self.amp](cfg))
        return values

    def apply(self, cfg: Dict, given: Iterable[str] = ()) -> Dict[str, tuple]:
        """Set the imposed values on `cfg` except the keys in `given`; returns {key: (config value, value used)}
        for each value that changed."""
        given = set(given)
        changed = {}
        for key, value in self.imposed(cfg).items():
            if key in given:
                continue
            old = cfg.get(key)
            if old != value:
                cfg[key] = value
                changed[key] = (old, value)
        return changed

    def notes(self, cfg: Mapping, given: Iterable[str]) -> List[str]:
        """A log line per flag in `given` that the reference ignored, saying what it would have run, and one per
        `config_notes` entry that applies."""
        given = set(given)
        lines = []
        for flag, (used, default) in self.ignored_flags.items():
            if flag in given:
                ref = cfg.get(used) if used in given else default
                lines.append(f"--{flag} {cfg.get(flag)} is applied; the reference ignores --{flag} and would have "
                             f"run {flag} = {ref} (its --{used})")
        lines += [line for line in (CONFIG_NOTES[name](cfg, given) for name in self.config_notes) if line]
        return lines


@dataclass(frozen=True)
class Protocol:
    """A named protocol: a recipe for SAM defenses (`sam`) and one for plain fine-tuning (`plain`)."""

    name: str
    help: str
    sam: Recipe
    plain: Recipe

    def recipe(self, uses_sam: bool) -> Recipe:
        return self.sam if uses_sam else self.plain


FIXED = Protocol(
    name="fixed",
    help="our defaults: class-balanced sorted subset, per-epoch schedule over the run's epochs, restore by copy",
    sam=Recipe(config_notes=("amp_vs_ftsam_py",)),
    plain=Recipe(config_notes=("amp_vs_ft_py", "smoothing_vs_ft_py")),
)

# What BackdoorBench's defense/ft-sam.py and defense/ft.py (main @ f02e353) effectively ran.
BACKDOORBENCH = Protocol(
    name="backdoorbench",
    help="reproduce the reference: ftsam as defense/ft-sam.py ran (class-balanced choose_by_class subset, cosine "
         "T_max 100 stepped per batch, restore by subtraction, rho 2 / label smoothing 0.1 on every dataset, rho "
         "following the lr from --rho_max to --rho_min, no AMP); ft-baseline as defense/ft.py (uniform choose_index subset, its epochs and scheduler per dataset "
         "stepped per epoch, plain cross-entropy, fp16 AMP on CUDA); flags given win",
    # ft-sam.py: its non-None argparse defaults beat its YAML (rho_max 8 / label_smoothing 0 on gtsrb, tiny); its
    # `amp: True` is never read; its train loss is an AverageMeter weighted by batch size; its rho follows the lr
    # (ProportionScheduler, rho_max -> rho_min: constant 2 unless --rho_max/--rho_min are given); it ignores --rho.
    # Its tiny YAML's ReduceLROnPlateau crashed when stepped per batch without a metric: our tiny config's cosine
    # is kept.
    sam=Recipe(subset="choose_by_class", step_per_batch=True, cos_t_max=100, restore="subtract",
               effective=_frozen({"rho": 2.0, "rho_min": 2.0, "rho_schedule": "proportional", "alpha": 0.0,
                                  "label_smoothing": 0.1, "adaptive": True, "eta": 0.0}),
               by_dataset=_frozen({"cifar10": {"epochs": 100}, "cifar100": {"epochs": 100}, "gtsrb": {"epochs": 50},
                                   "tiny": {"epochs": 100}}),
               amp="off", ignored_flags=_frozen({"rho": ("rho_max", 2.0)})),
    # ft.py: PureCleanModelTrainer (scheduler stepped per epoch, plateau with the epoch's mean batch loss, train
    # loss the plain mean over batches), config/defense/ft/<dataset>.yaml
    plain=Recipe(subset="uniform", cos_t_max=100, restore="subtract",
                 effective=_frozen({"label_smoothing": 0.0}),
                 by_dataset=_frozen({
                     "cifar10": {"epochs": 100, "lr_scheduler": "CosineAnnealingLR"},
                     "cifar100": {"epochs": 100, "lr_scheduler": "CosineAnnealingLR"},
                     "gtsrb": {"epochs": 100, "lr_scheduler": "CosineAnnealingLR"},
                     "tiny": {"epochs": 200, "lr_scheduler": "ReduceLROnPlateau"}}),
                 amp="fp16_on_cuda", train_loss_per_sample=False),
)

# name -> Protocol
PROTOCOLS = {p.name: p for p in (FIXED, BACKDOORBENCH)}


def get_recipe(name: str, uses_sam: bool) -> Recipe:
    """The recipe of protocol `name` (a PROTOCOLS key, checked by config.validate) for a SAM or plain defense."""
    return PROTOCOLS[name].recipe(uses_sam)
