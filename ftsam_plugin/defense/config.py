"""Arguments and YAML configs of the FT / FT-SAM defenses.

One YAML per dataset ships in `ftsam_plugin/configs/ftsam/` and serves both defenses (FT ignores the SAM keys).
Every argparse option defaults to None, so the YAML decides and only flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from importlib import resources
from typing import Dict

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.settings import TRAINING_RULES, Number, Text, check_numbers, quote, read_yaml
from ftsam_plugin.settings import str2bool  # re-exported for compatibility

from ftsam_plugin.optim.sam import PERTURBATIONS

from .factories import BASE_OPTIMIZERS, SCHEDULERS
from .protocols import PROTOCOLS, get_recipe
from .rho_schedule import RHO_SCHEDULES
from .unlearn import UNLEARNERS

__all__ = [
    "add_arguments",
    "str2bool",
    "packaged_config",
    "list_packaged_configs",
    "load_yaml",
    "merge_config",
    "validate",
    "KNOWN_KEYS",
    "SCHEDULER_NAMES",
    "OPTIMIZER_NAMES",
]

logger = logging.getLogger("ftsam_plugin.defense")

CONFIG_PACKAGE = "ftsam_plugin"
DEFAULT_CONFIG_FOLDER = "ftsam"
AMP_DTYPES = ("bf16", "fp16")


class _BareFlag:
    """What a flag given without its value parses to (see --adaptive); not a string, so argparse keeps it."""

    def __repr__(self):
        return "<flag given without a value>"


BARE_FLAG = _BareFlag()

# the registries' keys (scheduler names matched case-insensitively)
SCHEDULER_NAMES = tuple(SCHEDULERS)
OPTIMIZER_NAMES = tuple(BASE_OPTIMIZERS)
PERTURBATION_NAMES = tuple(sorted(PERTURBATIONS))  # what a SAM step perturbs along (optim/sam.py)

# Keys a YAML may hold. BackdoorBench's keys first (some are accepted and unused: they appear in its YAMLs).
BB_KEYS = {
    "device", "amp", "pin_memory", "non_blocking", "prefetch", "checkpoint_load", "checkpoint_save", "log",
    "dataset_path", "dataset", "result_file", "epochs", "batch_size", "num_workers", "lr", "lr_scheduler",
    "steplr_stepsize", "steplr_gamma", "steplr_milestones", "model", "client_optimizer", "sgd_momentum", "wd",
    "frequency_save", "random_seed", "yaml_path", "ratio", "index", "print_freq", "checkpoint_path", "bd_yaml_path",
    "cos_t_max", "ReduceLROnPlateau_factor",
    # ft-sam extras
    "rho", "rho_max", "rho_min", "adaptive", "label_smoothing", "alpha",
}
OUR_KEYS = {"eta", "amp_dtype", "eval_every", "protocol", "restore", "resume", "width", "rho_schedule",
            "keep_checkpoint", "rho_auto_budget", "rho_auto_grid", "rho_auto_epochs", "rho_auto_holdout",
            "sam_every", "sam_prob", "sam_epochs", "perturbation", "path_rho", "unlearn", "unlearn_eps",
            "unlearn_frac", "eval_subset"}
RHO_AUTO = "auto"  # `--rho auto`: chosen from the clean subset (rho_auto.py)
KNOWN_KEYS = BB_KEYS | OUR_KEYS


def _number_list(kind, what: str, example: str):
    """An argparse type: text like '50,75' or '[50, 75]' as a list of `kind`."""
    def parse(value):
        text = str(value).strip().strip("[]")
        try:
            return [kind(v) for v in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a list of {what} like '{example}', got '{value}'") from None
    return parse


_int_list = _number_list(int, "integers", "50,75")
_float_list = _number_list(float, "numbers", "1,2,4,8")


def _rho(value):
    if str(value).strip().lower() == RHO_AUTO:
        return RHO_AUTO
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got '{value}'") from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add BackdoorBench's defense flags (with correct types) and the FT-SAM ones; every default is None."""
    add = parser.add_argument
    add("--device", type=str, help="cpu, cuda or cuda:N (multi-GPU: launch with torchrun)")
    add("-pm", "--pin_memory", type=str2bool, help="DataLoader pin_memory (true/false)")
    add("-nb", "--non_blocking", type=str2bool, help=".to(device, non_blocking=...) (true/false)")
    add("-pf", "--prefetch", type=str2bool, help="accepted for BackdoorBench compatibility; unused")
    add("--amp", type=str2bool, help="mixed precision (true/false); dtype from --amp_dtype")
    add("--amp_dtype", type=str, choices=AMP_DTYPES, help="bf16 (no loss scaling) or fp16 (GradScaler)")
    add("--checkpoint_load", type=str, help="accepted for BackdoorBench compatibility; unused (see --resume and "
                                            "--checkpoint_path)")
    add("--checkpoint_save", type=str, help="checkpoint folder (default <save_path>/checkpoint/)")
    add("--log", type=str, help="log folder (default <save_path>/log/)")
    add("--dataset_path", type=str, help="data root holding <dataset>/ (default: where the record says)")
    add("--dataset", type=str, help="cifar10, cifar100, gtsrb, tiny")
    add("--result_file", type=str, help="record name under ./record/, or a path to a record folder")
    add("--epochs", type=int)
    add("--batch_size", type=int, help="global batch size (split across torchrun processes)")
    add("--num_workers", type=int)
    add("--lr", type=float)
    add("--lr_scheduler", type=str, help=", ".join(SCHEDULER_NAMES))
    add("--steplr_stepsize", type=int)
    add("--steplr_gamma", type=float)
    add("--steplr_milestones", type=_int_list, help="e.g. 50,75")
    add("--cos_t_max", type=int,
        help="cosine T_max (backdoorbench protocol: 100, in steps for ftsam and in epochs for ft-baseline)")
    add("--model", type=str, help="model name (default: the record's)")
    add("--client_optimizer", type=str, help=f"{', '.join(OPTIMIZER_NAMES)} (the SAM base optimizer)")
    add("--sgd_momentum", type=float)
    add("--wd", type=float, help="weight decay")
    add("--frequency_save", type=int, help="accepted for BackdoorBench compatibility; a checkpoint is kept each epoch")
    add("--print_freq", type=int, help="accepted for BackdoorBench compatibility")
    add("--random_seed", type=int)
    add("--yaml_path", type=str,
        help="YAML config, or the name of a packaged one (cifar10, cifar100, gtsrb, tiny, cpu); "
             "default: the packaged config of the dataset")
    add("--ratio", type=float, help="fraction of the clean training set used, in (0, 1] (drawn as the protocol says: "
                                    "class-balanced, or uniform for ft-baseline under backdoorbench)")
    add("--index", type=str, help="text file with the clean-subset indices (one per line); overrides --ratio")
    add("--width", type=float, help="model width multiplier if the record does not say")
    # SAM
    add("--rho", type=_rho, help="SAM neighbourhood size (ASAM scale: 2 cifar, 8 gtsrb/tiny), or 'auto': chosen "
                                 "from the clean subset by short probes (see --rho_auto_*)")
    add("--rho_auto_budget", type=float,
        help="--rho auto: largest allowed drop of held-out clean accuracy below the smallest rho's probe, in points (default 2)")
    add("--rho_auto_grid", type=_float_list, help="--rho auto: the rho values probed, smallest first (default 0.5,1,2,4,8,16)")
    add("--rho_auto_epochs", type=int, help="--rho auto: epochs per probe (default 3)")
    add("--rho_auto_holdout", type=float, help="--rho auto: fraction of the clean subset held out (default 0.2)")
    add("--rho_max", type=float, help="BackdoorBench alias of --rho (the rho at the configured lr)")
    add("--rho_min", type=float, help="--rho_schedule proportional: the rho at lr 0 (BackdoorBench's rho_min)")
    add("--rho_schedule", type=str, choices=sorted(RHO_SCHEDULES),
        help="constant (default): rho throughout; proportional: rho follows the lr from --rho down to --rho_min, "
             "as BackdoorBench's ProportionScheduler (the backdoorbench protocol's default)")
    add("--adaptive", type=str2bool, nargs="?", const=BARE_FLAG,
        help="ASAM (true, default) or SAM (false); a bare --adaptive is refused (in BackdoorBench it turns ASAM off)")
    add("--eta", type=float, help="ASAM eta: T_w = |w| + eta (0 in FT-SAM)")
    add("--alpha", type=float, help="GSAM alpha: the step drops alpha x the first-pass gradient's component "
                                    "orthogonal to the second-pass one (0, FT-SAM's value: plain ASAM)")
    add("--label_smoothing", type=float, help="epsilon: 1-eps on the true class, eps/(C-1) on the others")
    add("--restore", type=str, choices=("copy", "subtract"), help="how SAM undoes the perturbation")
    # cheaper SAM schedules (docs/optimizer.md): the other steps are plain steps of the base optimizer
    add("--sam_every", type=int, help="SAM on every k-th step only (default 1: every step)")
    add("--sam_prob", type=float, help="SAM on each (k-th) step with this probability, seeded by --random_seed "
                                       "(default 1)")
    add("--sam_epochs", type=str, help="SAM only in epochs FIRST-LAST, e.g. 1-5 (default: every epoch)")
    # the perturbation (docs/optimizer.md#path-aware-perturbation)
    add("--perturbation", type=str, choices=PERTURBATION_NAMES,
        help="what a SAM step perturbs along: gradient (default: ASAM, two passes) or path (towards the backdoored "
             "weights theta0, radius --rho absolute, one pass: PAM)")
    add("--path_rho", type=float, help="> 0: the steps the SAM schedule makes plain are path steps of this absolute "
                                       "radius instead (e.g. --sam_epochs 1-5 --path_rho 0.5); default 0")
    # trigger-free unlearning (unlearn.py), FT and FT-SAM alike
    add("--unlearn", type=str, choices=tuple(UNLEARNERS),
        help="none (default), or uap / uap-l2: find the class a targeted universal perturbation (L-inf / L2 "
             "bounded) reaches most easily on the clean subset and unlearn that perturbation in every step "
             "(docs/optimizer.md#unlearning-an-inverted-trigger---unlearn-uap)")
    add("--unlearn_eps", type=float, help="--unlearn: the perturbation's radius in pixel levels out of 255 (default: "
                                          "uap 10 per pixel, uap-l2 510 over the image, i.e. 2.0 on the 0..1 scale)")
    add("--unlearn_frac", type=float, help="--unlearn uap: share of each batch added again with the perturbation "
                                           "(default 0.25)")
    # run control
    add("--eval_every", type=int, help="evaluate ACC/ASR/RA every k epochs (the last epoch always)")
    add("--eval_subset", type=int, help="evaluate before the last epoch on fixed test subsets, N clean and up to N "
                                        "poisoned images spread over the classes, in columns subset_test_* (the "
                                        "last epoch: the whole test sets); default: the whole test sets every time")
    add("--protocol", type=str, choices=sorted(PROTOCOLS),
        help="; ".join(f"{p.name}: {p.help}" for p in PROTOCOLS.values()) + " (default: fixed)")
    add("--resume", type=str2bool, nargs="?", const=True, help="continue from <save_path>/checkpoint/last.pt")
    add("--keep_checkpoint", type=str2bool, nargs="?", const=True,
        help="keep checkpoint/last.pt once the run has finished (default false: it is removed when the result is "
             "written; an unfinished run's is always kept, for --resume)")
    add("--force", action="store_true", default=None,
        help="start over even if the checkpoint holds an unfinished run (it is overwritten); flag only, not a YAML key")
    add("--bd_yaml_path", type=str, help="accepted for BackdoorBench compatibility; unused")
    add("--checkpoint_path", type=str,
        help="start from an earlier defense result instead of the attack's model: a folder holding "
             "defense_result.pt (a name under ./record/, e.g. badnet_0_1/defense/ft, as BackdoorBench's) or the file")
    return parser


def list_packaged_configs(folder: str = DEFAULT_CONFIG_FOLDER):
    """Names (without .yaml) of the configs shipped in `ftsam_plugin/configs/<folder>/`."""
    root = resources.files(CONFIG_PACKAGE) / "configs" / folder
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def packaged_config(name: str, folder: str = DEFAULT_CONFIG_FOLDER):
    """The packaged YAML `configs/<folder>/<name>.yaml`, falling back to the shared `configs/ftsam/` folder."""
    for sub in dict.fromkeys((folder, DEFAULT_CONFIG_FOLDER)):
        ref = resources.files(CONFIG_PACKAGE) / "configs" / sub / f"{name}.yaml"
        if ref.is_file():
            return ref
    raise FtsamError(f"no packaged config '{name}'; pass --yaml_path FILE or one of "
                     f"{', '.join(list_packaged_configs())}")


def _resolve_yaml(yaml_path, dataset, folder):
    if yaml_path is None:
        if dataset is None:
            raise FtsamError("no config: pass --yaml_path or --dataset")
        return packaged_config(str(dataset).lower(), folder)
    text = str(yaml_path)
    if not os.path.exists(text) and os.sep not in text and not text.endswith((".yaml", ".yml")):
        return packaged_config(text, folder)
    return text


def load_yaml(yaml_path=None, dataset=None, folder: str = DEFAULT_CONFIG_FOLDER) -> Dict:
    """Read a YAML config (a path, a packaged name, or the packaged config of `dataset`) into a dict.

    Unknown keys are dropped with a warning naming them; a file that is missing or does not parse is an FtsamError.
    """
    source = _resolve_yaml(yaml_path, dataset, folder)
    data = read_yaml(source)
    unknown = sorted((k for k in data if k not in KNOWN_KEYS), key=str)
    if unknown:
        shown = ", ".join(quote(k) if not isinstance(k, str) or len(k) > 40 else k for k in unknown[:10])
        logger.warning("config %s: unknown keys ignored: %s%s", source, shown,
                       f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
    data = {k: v for k, v in data.items() if k in KNOWN_KEYS}  # ignored means not kept (nor logged) either
    data["yaml_path"] = str(source)
    return data


def merge_config(yaml_cfg: Dict, cli: Dict) -> Dict:
    """YAML values, overridden by the command-line values that are not None; BackdoorBench aliases resolved."""
    cfg = dict(yaml_cfg)
    given = {k: v for k, v in cli.items() if v is not None}
    cfg.update(given)
    cfg["yaml_path"] = yaml_cfg.get("yaml_path", cfg.get("yaml_path"))
    # rho: --rho > --rho_max > yaml rho > yaml rho_max
    for source in (given, yaml_cfg):
        if source.get("rho") is not None:
            cfg["rho"] = source["rho"]
            break
        if source.get("rho_max") is not None:
            cfg["rho"] = source["rho_max"]
            break
    return cfg


DEFAULTS = {
    "device": "cpu", "amp": False, "amp_dtype": "bf16", "pin_memory": False, "non_blocking": False,
    "epochs": 100, "batch_size": 256, "num_workers": 0, "lr": 0.01, "lr_scheduler": "CosineAnnealingLR",
    "client_optimizer": "sgd", "sgd_momentum": 0.9, "wd": 5e-4, "random_seed": 0, "ratio": 0.05,
    "rho": 2.0, "adaptive": True, "eta": 0.0, "alpha": 0.0, "label_smoothing": 0.1, "eval_every": 1,
    "rho_schedule": "constant",
    "protocol": "fixed", "resume": False, "keep_checkpoint": False, "steplr_gamma": 0.1, "steplr_stepsize": 30,
    "sam_every": 1, "sam_prob": 1.0,  # SAM on every step (sam_epochs None: in every epoch)
    "perturbation": "gradient", "path_rho": 0.0,
    "unlearn": "none", "unlearn_frac": 0.25,  # unlearn_eps: the unlearner's own default (unlearn.py)
}
BOOL_KEYS = ("amp", "pin_memory", "non_blocking", "adaptive", "resume", "keep_checkpoint", "prefetch")
LIST_KEYS = {"steplr_milestones", "rho_auto_grid", "sam_epochs"}  # every other key holds one value
MAX_MILESTONES = 100
# what each numeric setting may be (unused BackdoorBench keys such as frequency_save are not checked)
RULES = {
    **TRAINING_RULES,
    "eval_every": Number(integer=True, low=1),
    "eval_subset": Number(integer=True, low=1),
    "steplr_stepsize": Number(integer=True, low=1),
    "cos_t_max": Number(integer=True, low=1),
    "ratio": Number(low=0, high=1, low_open=True),
    "label_smoothing": Number(low=0, high=1, high_open=True),
    "steplr_gamma": Number(low=0, high=1, low_open=True),
    "ReduceLROnPlateau_factor": Number(low=0, high=1, low_open=True, high_open=True),
    "unlearn_eps": Number(low=0, low_open=True),
    "unlearn_frac": Number(low=0, high=1, low_open=True),
}
SAM_RULES = {  # checked for every defense (plain fine-tuning ignores the values, but not bad ones)
    "rho": Number(low=0, low_open=True),
    "rho_max": Number(low=0, low_open=True),
    "rho_min": Number(low=0, low_open=True),
    "eta": Number(low=0),
    "alpha": Number(),
    "sam_every": Number(integer=True, low=1),
    "sam_prob": Number(low=0, high=1, low_open=True),
    "path_rho": Number(low=0),
}
# flags only SAM defenses use: given to plain fine-tuning, a warning says they are ignored
SAM_ONLY_FLAGS = sorted({*SAM_RULES, "sam_epochs", "rho_schedule", "adaptive", "restore", "perturbation",
                         "rho_auto_budget", "rho_auto_grid", "rho_auto_epochs", "rho_auto_holdout"})
# paths and names: text only (a YAML `index: 5` would open file descriptor 5, `log: true` a folder named True)
PATH_RULES = {key: Text() for key in ("checkpoint_save", "log", "dataset_path", "result_file", "index", "yaml_path")}
PATH_RULES.update(dataset=Text("a dataset name"), model=Text("a model name"))
CHOICES = {"restore": ("copy", "subtract"), "perturbation": PERTURBATION_NAMES, "unlearn": tuple(UNLEARNERS)}  # the flags' argparse choices, for values from the YAML too
FIX = "fix --{key} (or {key} in the YAML)"


def _milestones(value) -> list:
    """steplr_milestones as a strictly increasing list of epochs (a YAML list, or text like '50,75')."""
    items = str(value).strip().strip("[]").replace(",", " ").split() if isinstance(value, str) else value
    if isinstance(items, (int, float)) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, list) or len(items) > MAX_MILESTONES:
        items = None
    rule = Number(integer=True, low=1)
    parsed = [rule.parse(v) for v in items] if items is not None else [None]
    if None in parsed or parsed != sorted(set(parsed)):
        raise FtsamError(f"steplr_milestones must be increasing epoch numbers like 50,75 (at most {MAX_MILESTONES}), "
                         f"got {quote(value)}; {FIX.format(key='steplr_milestones')}")
    return parsed


def _sam_epochs(value, epochs: int) -> list:
    """sam_epochs as [first, last], 1 <= first <= last, first within the run (text '1-5' or '1,5', or a list)."""
    items = value
    if isinstance(value, str):
        match = re.fullmatch(r"\[?\s*(\d+)\s*[-, ]\s*(\d+)\s*\]?", value.strip())
        items = list(match.groups()) if match else None
    rule = Number(integer=True, low=1)
    parsed = [rule.parse(v) for v in items] if isinstance(items, (list, tuple)) and len(items) == 2 else [None]
    if None in parsed or parsed[0] > parsed[1]:
        raise FtsamError(f"sam_epochs must be an epoch window FIRST-LAST like 1-5, got {quote(value)}; "
                         f"{FIX.format(key='sam_epochs')}")
    if parsed[0] > epochs:
        raise FtsamError(f"sam_epochs {parsed[0]}-{parsed[1]} starts after the run's last epoch ({epochs}): no step "
                         f"would be a SAM step; {FIX.format(key='sam_epochs')}")
    return parsed


def _rho_auto_settings(cfg: Dict):
    """`--rho auto`'s settings (rho_auto.AutoRhoSettings) from the rho_auto_* keys, checked."""
    from .rho_auto import AutoRhoSettings

    default = AutoRhoSettings()
    check_numbers(cfg, {"rho_auto_budget": Number(low=0, high=100), "rho_auto_epochs": Number(integer=True, low=1),
                        "rho_auto_holdout": Number(low=0, high=1, low_open=True, high_open=True)}, FIX)
    grid = cfg.get("rho_auto_grid")
    if grid is not None:
        items = str(grid).strip().strip("[]").replace(",", " ").split() if isinstance(grid, str) else grid
        rule = Number(low=0, low_open=True)
        parsed = [rule.parse(v) for v in items] if isinstance(items, (list, tuple)) else []
        if len(parsed) < 2 or None in parsed or len(parsed) > 64:
            raise FtsamError(f"rho_auto_grid must be two or more positive numbers like 0.5,1,2,4, got {quote(grid)}; "
                             f"{FIX.format(key='rho_auto_grid')}")
        grid = tuple(parsed)

    def given(key, fallback):
        return fallback if cfg.get(key) is None else cfg[key]

    return AutoRhoSettings(budget=float(given("rho_auto_budget", default.budget)), grid=grid or default.grid,
                           probe_epochs=int(given("rho_auto_epochs", default.probe_epochs)),
                           holdout=float(given("rho_auto_holdout", default.holdout))).check()


def apply_protocol(cfg: Dict, uses_sam: bool, given=()) -> Dict[str, tuple]:
    """Set the values cfg['protocol']'s recipe imposes (see `protocols.Recipe`), except for the keys in `given`
    (flags given on the command line). Returns {key: (config value, value used)} for what changed; the recipe's
    notes on flags the reference ignored go to cfg['protocol_notes']."""
    given = set(given)
    recipe = get_recipe(cfg["protocol"], uses_sam)
    cfg["protocol_notes"] = recipe.notes(cfg, given)  # flags the reference ignored, config values it did not run
    if "rho" in given and not given & {"rho_min", "rho_schedule"}:
        # our --rho X is a constant X (it wins over --rho_max; the reference ignored it): no rho schedule imposed
        given |= {"rho_min", "rho_schedule"}
        cfg["rho_min"], cfg["rho_schedule"] = None, "constant"
    if "rho_max" in given:
        given.add("rho")
    return recipe.apply(cfg, given)


def _check_rho_schedule(cfg: Dict) -> None:
    """rho_schedule a known name; rho_min only where it means something (proportional), and at most rho."""
    name = cfg["rho_schedule"]
    if not isinstance(name, str) or name not in RHO_SCHEDULES:
        raise FtsamError(f"rho_schedule must be one of {', '.join(sorted(RHO_SCHEDULES))}, got {quote(name)}; "
                         f"{FIX.format(key='rho_schedule')}")
    rho, rho_min = cfg["rho"], cfg.get("rho_min")
    if rho_min is not None and cfg["rho_auto"]:
        if name == "constant":
            raise FtsamError(f"rho_min {rho_min} means nothing with --rho auto and a constant rho; drop rho_min or "
                             f"pass --rho_schedule proportional")
        rho = min(cfg["rho_auto_settings"].grid)  # the smallest rho it may choose
    if rho_min is None:
        return
    if name == "constant" and float(rho_min) != float(rho):
        raise FtsamError(f"rho_min {rho_min} differs from rho {rho} but rho_schedule is constant; pass "
                         f"--rho_schedule proportional (rho follows the lr from rho down to rho_min, as BackdoorBench's "
                         f"ft-sam.py) or drop rho_min")
    if name == "proportional" and float(rho_min) > float(rho):
        raise FtsamError(f"rho_min {rho_min} is above rho {rho}; the proportional schedule goes from rho (at the "
                         f"configured lr) down to rho_min (at lr 0): fix --rho_min or --rho")


def validate(cfg: Dict, uses_sam: bool, given=()) -> Dict:
    """Fill defaults for missing keys, apply the protocol (`given`: keys set on the command line), check and parse
    every value, and raise FtsamError one-liners on bad ones (quoting the value as given). What the protocol changed
    is in cfg['protocol_overrides']."""
    for key in KNOWN_KEYS:
        cfg.setdefault(key, None)
    for key, value in DEFAULTS.items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg.get("adaptive") is BARE_FLAG:
        raise FtsamError("--adaptive needs a value: --adaptive true (ASAM, the default) or --adaptive false (SAM); "
                         "BackdoorBench's bare --adaptive meant false")
    for key in sorted(KNOWN_KEYS - LIST_KEYS):
        value = cfg[key]
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise FtsamError(f"{key} must be a single value, got {quote(value)}; {FIX.format(key=key)}")
    for key in BOOL_KEYS:
        if cfg.get(key) is not None:
            try:
                cfg[key] = str2bool(cfg[key])
            except argparse.ArgumentTypeError:
                raise FtsamError(f"{key} must be true or false, got {quote(cfg[key])}; {FIX.format(key=key)}") from None
    rho_auto = str(cfg.get("rho")).strip().lower() == RHO_AUTO
    cfg["rho_auto"] = uses_sam and rho_auto
    sam_rules = {k: r for k, r in SAM_RULES.items() if not (k == "rho" and rho_auto)}
    check_numbers(cfg, {**RULES, **sam_rules, **PATH_RULES}, FIX)
    unused = [f"--{k}" for k in SAM_ONLY_FLAGS if k in set(given)] if not uses_sam else []
    if unused:
        logger.warning("%s: %s to a defense without SAM (plain fine-tuning); ignored", ", ".join(unused),
                       "does not apply" if len(unused) == 1 else "do not apply")
    for key, allowed in CHOICES.items():
        if cfg.get(key) is not None and cfg[key] not in allowed:
            raise FtsamError(f"{key} must be one of {', '.join(allowed)}, got {quote(cfg[key])}; {FIX.format(key=key)}")
    if cfg["rho_auto"]:
        cfg["rho"] = RHO_AUTO
        cfg["rho_auto_settings"] = _rho_auto_settings(cfg)
    unlearner = UNLEARNERS[cfg["unlearn"]]
    if unlearner is not None and cfg["unlearn_eps"] is None:  # the unlearner's own radius (its norm decides it)
        cfg["unlearn_eps"] = unlearner.DEFAULT_EPS
    if cfg["steplr_milestones"] is not None:
        cfg["steplr_milestones"] = _milestones(cfg["steplr_milestones"])
    if not isinstance(cfg["protocol"], str) or cfg["protocol"] not in PROTOCOLS:
        raise FtsamError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {quote(cfg['protocol'])}")
    cfg["protocol_overrides"] = apply_protocol(cfg, uses_sam, given)
    if cfg["sam_epochs"] is not None:  # after the protocol: it may set the epochs
        cfg["sam_epochs"] = _sam_epochs(cfg["sam_epochs"], int(cfg["epochs"]))
    schedulers = {name.lower(): name for name in SCHEDULER_NAMES}
    key = str(cfg["lr_scheduler"]).lower()
    if key not in schedulers:
        raise FtsamError(f"unknown lr_scheduler {quote(cfg['lr_scheduler'])}; use one of {', '.join(SCHEDULER_NAMES)}")
    cfg["lr_scheduler"] = schedulers[key]
    key = str(cfg["client_optimizer"]).lower()
    if key not in OPTIMIZER_NAMES:
        raise FtsamError(f"unknown client_optimizer {quote(cfg['client_optimizer'])}; use one of "
                         f"{', '.join(OPTIMIZER_NAMES)}")
    cfg["client_optimizer"] = key
    if str(cfg["amp_dtype"]) not in AMP_DTYPES:
        raise FtsamError(f"amp_dtype must be bf16 or fp16, got {quote(cfg['amp_dtype'])}; fix --amp_dtype")
    if uses_sam:
        _check_rho_schedule(cfg)
    if cfg.get("restore") is None:
        cfg["restore"] = get_recipe(cfg["protocol"], uses_sam).restore
    return cfg
