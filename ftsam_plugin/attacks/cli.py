"""`ftsam attack`: train a backdoored model and write a BackdoorBench attack record.

    ftsam attack --attack badnet --dataset cifar10 --dataset_path ./data --model preactresnet18 \
        --save_folder_name badnet_0_1
    BACKDOORBENCH_ROOT=~/BackdoorBench ftsam attack --attack lf ...   # BackdoorBench's own trigger code (catalog.py)

Settings come from (lowest to highest): built-in defaults (BackdoorBench's prototype/attack YAMLs), the
`--yaml_path` file (BackdoorBench key names), then the command line. The record goes to
`<record_root>/<save_folder_name>/` (which must not exist yet): attack_result.pt, bd_train_dataset/ and
bd_test_dataset/ (PNG), attack_df.csv, attack_df_summary.csv, train_poison_index_list.pickle, info.pickle (the
settings, plus trigger_source and trigger_settings: whose code and files made the trigger), a log.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import time
from typing import Any, Dict, Set

import torch

from ftsam_plugin.data.backdoor import TransformDataset
from ftsam_plugin.data.datasets import DATASETS, build_clean_datasets, get_dataset_info, resolve_dataset_dir
from ftsam_plugin.data.records import save_attack_result, write_metrics_csv, write_metrics_summary_csv
from ftsam_plugin.data.transforms import get_transform
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import atomic_save
from ftsam_plugin.lock import FolderLock
from ftsam_plugin.logfile import LogFile
from ftsam_plugin.settings import (TRAINING_RULES, Number, Text, check_numbers, quote, read_yaml, seed_everything,
                                   str2bool)

from . import catalog
from .poison import make_backdoor_datasets
from .train import train_backdoored_model

__all__ = ["add_arguments", "run", "resolve_config", "DEFAULTS"]

logger = logging.getLogger(__name__)

# BackdoorBench's prototype + attack defaults (config/attack/prototype/<ds>.yaml, config/attack/<atk>/default.yaml)
DEFAULTS: Dict[str, Any] = {
    "attack": "badnet",
    "dataset": "cifar10",
    "dataset_path": "./data",
    "model": "preactresnet18",
    "batch_size": 128,
    "lr": 0.01,
    "sgd_momentum": 0.9,
    "wd": 5e-4,
    "pratio": 0.1,
    "attack_target": 0,
    "attack_label_trans": "all2one",
    "blended_alpha": 0.2,
    "patch_size": 3,
    "width": 1.0,
    "num_workers": 2,
    "random_seed": 0,
    "record_root": "./record",
}
EPOCHS = {"cifar10": 100, "cifar100": 100, "gtsrb": 50, "tiny": 200}
# BackdoorBench YAML names -> ours
YAML_ALIASES = {"attack_train_blended_alpha": "blended_alpha"}
# settings of ftsam's own triggers; BackdoorBench's take theirs from --bd_yaml_path
FTSAM_TRIGGER_FLAGS = ("blended_alpha", "patch_size")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `ftsam attack`'s options (BackdoorBench's spelling; every default is None so the YAML decides)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the attack list's lines
    parser.epilog = catalog.overview()
    parser.add_argument("--attack", choices=catalog.names(), metavar="ATTACK",
                        help=f"attack (default badnet): {', '.join(catalog.names())}; which need BackdoorBench: "
                             f"see the list below")
    parser.add_argument("--trigger_from", choices=catalog.SOURCES,
                        help="whose trigger code makes the attack: ftsam (badnet, blended) or backdoorbench (needs "
                             "BACKDOORBENCH_ROOT); default ftsam where ftsam has the attack")
    parser.add_argument("--bd_yaml_path", help="BackdoorBench's attack settings (with --trigger_from backdoorbench), "
                                               "default <BACKDOORBENCH_ROOT>/config/attack/<attack>/default.yaml")
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="dataset name (default cifar10)")
    parser.add_argument("--dataset_path", help="folder holding <dataset>/ (default ./data), or the dataset folder")
    parser.add_argument("--model", help="architecture, BackdoorBench's name (default preactresnet18)")
    parser.add_argument("--save_folder_name", help="record folder name under --record_root (must not exist)")
    parser.add_argument("--record_root", help="folder of records (default ./record)")
    parser.add_argument("--yaml_path", help="YAML with defaults, BackdoorBench's key names")
    parser.add_argument("--epochs", type=int, help="training epochs (default: cifar 100, gtsrb 50, tiny 200)")
    parser.add_argument("--batch_size", type=int, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, help="SGD learning rate (default 0.01), cosine over the epochs")
    parser.add_argument("--sgd_momentum", type=float, help="SGD momentum (default 0.9)")
    parser.add_argument("--wd", type=float, help="weight decay (default 5e-4)")
    parser.add_argument("--pratio", type=float, help="fraction of train samples poisoned (default 0.1)")
    parser.add_argument("--attack_target", type=int, help="target class (default 0)")
    parser.add_argument("--attack_label_trans", choices=["all2one"], help="label change (only all2one)")
    parser.add_argument("--blended_alpha", "--attack_train_blended_alpha", dest="blended_alpha", type=float,
                        help="ftsam's Blended: mixing weight of the trigger (default 0.2)")
    parser.add_argument("--patch_size", type=int, help="ftsam's BadNets: patch side in pixels (default 3)")
    parser.add_argument("--width", type=float,
                        help="PreAct-ResNet width multiplier (default 1.0), stored in the record")
    parser.add_argument("--device", help="torch device (default cuda if available, else cpu; cuda without a GPU "
                                         "is an error)")
    parser.add_argument("--num_workers", "-n", type=int, help="DataLoader workers (default 2)")
    parser.add_argument("--random_seed", type=int, help="seed (default 0)")
    parser.add_argument("--progress", type=str2bool, help="show progress bars (true/false, default true)")
    return parser


def resolve_config(args: argparse.Namespace) -> Dict[str, Any]:
    """Defaults < YAML (`yaml_path`) < non-None command-line values; returns a plain dict."""
    cli = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "debug")}
    from_yaml: Dict[str, Any] = {}
    if cli.get("yaml_path"):
        from_yaml = {YAML_ALIASES.get(k, k): v for k, v in read_yaml(cli["yaml_path"]).items()}
    config = dict(DEFAULTS)
    config.update(from_yaml)
    config.update(cli)
    config.setdefault("epochs", EPOCHS.get(str(config["dataset"]).lower(), 100))
    config.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    config.setdefault("progress", True)
    return config


# what each numeric setting may be (attack_target and patch_size also depend on the dataset: `_validate`)
RULES = {
    **TRAINING_RULES,
    "pratio": Number(low=0, high=1, low_open=True),
    "attack_target": Number(integer=True, low=0),
    "blended_alpha": Number(low=0, high=1),
    "patch_size": Number(integer=True, low=1),
    # paths and names: text only (a YAML `record_root: 5` or `dataset_path: [data]` is refused, not used)
    "record_root": Text(), "dataset_path": Text(), "yaml_path": Text(), "save_folder_name": Text("a folder name"),
    "model": Text("a model name"), "dataset": Text("a dataset name"), "attack": Text("an attack name"),
    "device": Text("a device name"), "trigger_from": Text("a trigger source"), "bd_yaml_path": Text(),
}


def _validate(config: Dict[str, Any], given: Set[str]) -> None:
    """Every setting checked (and numbers parsed in place) before anything is read or written; `given`: the settings
    set on the command line. Sets config["trigger_from"] to the trigger code that will run."""
    check_numbers(config, RULES)
    config["trigger_from"] = catalog.resolve_source(config["attack"], config.get("trigger_from"))
    ftsam = config["trigger_from"] == catalog.FTSAM
    wrong = sorted(set(FTSAM_TRIGGER_FLAGS) & given) if not ftsam else \
        (["bd_yaml_path"] if config.get("bd_yaml_path") else [])
    if wrong:
        raise FtsamError(f"--{wrong[0]} sets {'BackdoorBench' if ftsam else 'ftsam'}'s triggers, but attack "
                         f"{config['attack']} runs {config['trigger_from']}'s; "
                         + ("drop it or add --trigger_from backdoorbench" if ftsam else
                            "set BackdoorBench's trigger in the YAML given by --bd_yaml_path"))
    info = get_dataset_info(config["dataset"])
    if config.get("attack_label_trans", "all2one") != "all2one":
        raise FtsamError(f"attack_label_trans {quote(config['attack_label_trans'])} is not supported; use all2one")
    if config["attack_target"] >= info.num_classes:
        raise FtsamError(f"--attack_target {config['attack_target']} is not a class of {info.name} "
                         f"(0..{info.num_classes - 1}); fix --attack_target")
    side = min(info.img_size[:2])
    if config["patch_size"] > side:
        raise FtsamError(f"--patch_size {config['patch_size']} is larger than the {side}x{side} images of "
                         f"{info.name}; pass 1..{side}")
    try:
        config["progress"] = str2bool(config["progress"])
    except argparse.ArgumentTypeError as exc:
        raise FtsamError(f"progress: {exc}; fix --progress") from None


def _stored_data_path(data_dir: str, root: str) -> str:
    # BackdoorBench stores './data/<ds>' relative to the folder holding record/; keep that form when possible
    data_abs, root_abs = os.path.abspath(data_dir), os.path.abspath(root)
    if os.path.commonpath([data_abs, root_abs]) == root_abs:
        return "./" + os.path.relpath(data_abs, root_abs).replace(os.sep, "/")
    return data_abs


def run(args: argparse.Namespace) -> int:
    """Run `ftsam attack` (see the module docstring); returns 0. Errors raise FtsamError."""
    config = resolve_config(args)
    _validate(config, {k for k, v in vars(args).items() if v is not None})
    info = get_dataset_info(config["dataset"])
    attack = str(config["attack"]).lower()
    record_root = os.path.normpath(os.fspath(config["record_root"]))
    name = config.get("save_folder_name") or (
        f"{time.strftime('%Y_%m_%d_%H_%M_%S')}_attack_{attack}_{secrets.token_hex(2)}"
    )
    if os.sep in name or "/" in name or name in (".", ".."):
        raise FtsamError(f"--save_folder_name {quote(name)} must be a plain folder name; "
                         f"pass --record_root for the location")
    record_dir = os.path.join(record_root, name)
    lock = FolderLock(record_dir, what="record folder")
    if os.path.exists(record_dir):
        raise _taken(record_dir, lock)
    prepared = catalog.prepare(attack, config["trigger_from"], config, info.img_size)

    data_dir = resolve_dataset_dir(os.fspath(config["dataset_path"]), info.name)
    raw_train, raw_test = build_clean_datasets(info.name, data_dir)
    prepared.poisoning.train_indicator(raw_train.targets)  # a dry run: FtsamError (e.g. pratio) before any output
    from ftsam_plugin.defense.ddp import resolve_device
    from ftsam_plugin.models import create_model  # FtsamError for an unknown model, before anything is written

    config["device"] = str(resolve_device(config["device"]))  # FtsamError "...; pass --device cpu" without a GPU
    seed = config["random_seed"]
    seed_everything(seed)
    model = create_model(str(config["model"]), info.num_classes, image_size=info.img_size[0], width=config["width"])
    try:
        os.makedirs(record_root, exist_ok=True)
        os.mkdir(record_dir)
    except FileExistsError:
        raise _taken(record_dir, lock) from None  # another `ftsam attack` made it meanwhile
    except OSError as exc:
        raise FtsamError(f"cannot create record folder {record_dir}: {exc.strerror}; check --record_root") from None
    with lock:  # held until the record is complete, so a second run on this name names this one
        rows = _write_record(config, info, model, prepared, raw_train, raw_test, data_dir, record_root, name)
    last = rows[-1]
    print(f"record written to {record_dir}: test_acc {last['test_acc']:.4f}, test_asr {last['test_asr']:.4f}, "
          f"test_ra {last['test_ra']:.4f}")
    return 0


def _taken(record_dir: str, lock: FolderLock) -> FtsamError:
    """The error for a record name already in use: by a live run (named), or by an earlier record."""
    lock.check()  # raises, naming the live run that is writing it
    unfinished = "" if os.path.isfile(os.path.join(record_dir, "attack_result.pt")) else \
        " (an unfinished record: no attack_result.pt)"
    return FtsamError(f"record folder {record_dir} already exists{unfinished}; choose another --save_folder_name "
                      f"or remove it")


def _write_record(config, info, model, prepared, raw_train, raw_test, data_dir, record_root, name) -> list:
    """Poison, train and save into the (new, locked) record folder; returns the per-epoch metric rows."""
    record_dir = os.path.join(record_root, name)
    seed = config["random_seed"]
    handler = LogFile(os.path.join(record_dir, time.strftime("%Y_%m_%d_%H_%M_%S") + ".log"), fix="check --record_root")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    handler.setLevel(logging.INFO)
    package_logger = logging.getLogger("ftsam_plugin")
    package_logger.addHandler(handler)
    old_level = package_logger.level
    package_logger.setLevel(logging.INFO)
    try:
        config = {**config, "trigger_source": prepared.trigger_source, "trigger_settings": prepared.trigger_settings}
        logger.info("ftsam attack: %s", config)
        atomic_save({k: v for k, v in config.items() if isinstance(v, (str, int, float, bool))},
                    os.path.join(record_dir, "info.pickle"))
        root = os.path.dirname(os.path.abspath(record_root))
        stored_prefix = f"./{os.path.basename(os.path.abspath(record_root))}/{name}"
        bd_train, bd_test = make_backdoor_datasets(raw_train, raw_test, prepared.poisoning, seed, record_dir,
                                                   stored_prefix, progress=bool(config["progress"]))
        atomic_save(bd_train.poison_indicator.copy(), os.path.join(record_dir, "train_poison_index_list.pickle"))

        train_tf, test_tf = get_transform(info.name, True), get_transform(info.name, False)
        test_set = TransformDataset(raw_test, test_tf)
        csv_path = os.path.join(record_dir, "attack_df.csv")
        rows = train_backdoored_model(
            model, TransformDataset(bd_train, train_tf), test_set, TransformDataset(bd_test, test_tf),
            epochs=int(config["epochs"]), batch_size=int(config["batch_size"]), lr=float(config["lr"]),
            momentum=float(config["sgd_momentum"]), weight_decay=float(config["wd"]), device=config["device"],
            num_workers=int(config["num_workers"]), seed=seed, progress=bool(config["progress"]),
            on_epoch=lambda rows: (write_metrics_csv(csv_path, rows), logger.info("epoch %s", rows[-1])),
        )
        write_metrics_summary_csv(os.path.join(record_dir, "attack_df_summary.csv"), rows)
        save_attack_result(
            model_name=str(config["model"]),
            num_classes=info.num_classes,
            model=model,
            data_path=_stored_data_path(data_dir, root),
            img_size=info.img_size,
            clean_data=info.name,
            bd_train=bd_train,
            bd_test=bd_test,
            save_path=record_dir,
            width=float(config["width"]),
        )
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)
        handler.close()
    return rows
