"""BackdoorBench's side of tests/test_attacks_backdoorbench.py, run in a subprocess with BackdoorBench's root first on
PYTHONPATH (its folders import as `attack.*`, `utils.*`). Nothing of BackdoorBench is copied: every reference comes
from calling its code. `numpy.float` is set to `float` first: BackdoorBench f02e353 was written for NumPy < 1.24.

    python tests/bb_attacks.py stage1 JOBS.json
        JOBS.json: {"data_dir": ..., "jobs": [{"out": OUT.npz, "work_dir": ..., "module": "attack.lf",
        "cls": "LowFrequency", "argv": [...]}, ...]}. For each job: BackdoorBench's attack class as its __main__ runs
        it (its parser on argv, its YAML merge, process_args), then `prepare`'s seeding (fix_random) and its own
        `stage1_non_training_data_prepare`, on the clean images ftsam reads from data_dir (only `benign_prepare` is
        swapped for them: BackdoorBench would read torchvision's CIFAR-10 files). Its poisoned samples (written under
        work_dir, read back through its dataset) go to OUT.npz.
    python tests/bb_attacks.py load OUT.npz RECORD_PT
        BackdoorBench's `load_attack_result` on a record (run from the folder holding record/ and data/); what it
        rebuilt goes to OUT.npz.
"""

import argparse
import importlib
import json
import os
import sys

import numpy as np

np.float = float  # BackdoorBench f02e353's NumPy (< 1.24) had this alias of the builtin float


def _poisoned(bd_dataset):
    """{indices, bd_labels, orig_labels, images} of the poisoned samples of a prepro_cls_DatasetBD_v2, read back
    through its container (PNG files), in index order."""
    container = bd_dataset.bd_data_container
    indices = sorted(int(i) for i in np.flatnonzero(np.asarray(bd_dataset.poison_indicator) == 1))
    items = [container[i] for i in indices]
    return {"indices": np.array(indices, dtype=np.int64),
            "bd_labels": np.array([int(item[1]) for item in items], dtype=np.int64),
            "orig_labels": np.array([int(item[2]) for item in items], dtype=np.int64),
            "images": np.stack([np.asarray(item[0].convert("RGB"), dtype=np.uint8) for item in items])}


def _save(out, train, test, **extra):
    arrays = {f"train_{k}": v for k, v in train.items()}
    arrays.update({f"test_{k}": v for k, v in test.items()})
    arrays.update(extra)
    np.savez(out, **arrays)


def stage1(out, data_dir, work_dir, module, cls, argv):
    from utils.aggregate_block.fix_random import fix_random
    from utils.bd_dataset_v2 import get_labels

    from ftsam_plugin.data.datasets import build_clean_datasets

    attack = getattr(importlib.import_module(module), cls)()
    parser = attack.set_bd_args(attack.set_args(argparse.ArgumentParser()))
    args = parser.parse_args(argv)
    attack.add_bd_yaml_to_args(args)
    attack.add_yaml_to_args(args)
    args = attack.process_args(args)
    os.makedirs(work_dir)
    args.save_path = work_dir  # prepare() would make ./record/<name>; the rest of it that matters is the seeding
    fix_random(int(args.random_seed))
    attack.args = args
    train, test = build_clean_datasets(args.dataset, data_dir)
    attack.benign_prepare = lambda: (train, None, None, test, None, None, None, get_labels(train), None,
                                     get_labels(test))
    attack.stage1_non_training_data_prepare()
    _, _, bd_train, bd_test = attack.stage1_results
    _save(out, _poisoned(bd_train.wrapped_dataset), _poisoned(bd_test.wrapped_dataset),
          train_indicator=np.asarray(bd_train.wrapped_dataset.poison_indicator),
          test_order=np.asarray(bd_test.wrapped_dataset.original_index_array))


def load(out, record_pt):
    from utils.save_load_attack import load_attack_result

    result = load_attack_result(record_pt)
    bd_train, bd_test = result["bd_train"].wrapped_dataset, result["bd_test"].wrapped_dataset
    _save(out, _poisoned(bd_train), _poisoned(bd_test),
          lens=np.array([len(result[k]) for k in ("clean_train", "clean_test", "bd_train", "bd_test")]),
          test_order=np.asarray(bd_test.original_index_array))


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "stage1":
        with open(rest[0]) as handle:
            spec = json.load(handle)
        for job in spec["jobs"]:
            stage1(job["out"], spec["data_dir"], job["work_dir"], job["module"], job["cls"], job["argv"])
    else:
        load(*rest)
