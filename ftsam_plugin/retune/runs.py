"""Retuning runs on disk: which result is attacked, where the run goes, its cache key, and its outputs.

A run attacks one result file of a record: the backdoored model (`attack_result.pt`, defense name `none`) or a
defense result (`defense/<name>/defense_result.pt`, ours or BackdoorBench's). It writes beside that file, in
`<folder of the result>/retune/<settings tag>/`:
  retune_df.csv          per epoch, BackdoorBench's columns (epoch 0: the model before retuning)
  retune_df_summary.csv  rows last / valid_max / exist_nan_value
  retune.log             settings (and where each default comes from), data, per-epoch metrics
  retune_result.pt       the retuned weights ({model_name, num_classes, model}), only with save_model
  summary.json           written last: the key, settings, before/after ACC/ASR/RA; a run without it is unfinished
The key is the result file's size, mtime_ns and sha256, the attack record's size and mtime_ns, the dataset-path
override and the settings: a summary whose key matches is the run's cached result (`ftsam leaderboard --retune`
reuses it), otherwise the run is redone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Iterable, Optional

import torch

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import atomic_write_text, file_fingerprint, remove_stale_temp_files
from ftsam_plugin.lock import FolderLock
from ftsam_plugin.logfile import LogFile
from ftsam_plugin.settings import FRACTION, Number

from .settings import RetuneSettings, describe
from .train import logger, retune_model

__all__ = ["NO_DEFENSE", "SUMMARY_NAME", "result_path", "output_dir", "run_key", "read_summary", "summary_problem",
           "find_summary",
           "load_result_model", "retune_and_save"]

NO_DEFENSE = "none"
SUMMARY_NAME = "summary.json"
WEIGHTS_NAME = "retune_result.pt"
LOG_NAME = "retune.log"
FORMAT = "ftsam-retune"
VERSION = 1
STARTED = time.time()  # temp files older than this process are left over from killed runs


def result_path(record_dir: str, defense: str) -> str:
    """The file a run attacks: `<record>/attack_result.pt` for `none`, else
    `<record>/defense/<defense>/defense_result.pt`.

    Raises:
        FtsamError: no such result (the message lists the record's defense results).
    """
    from ftsam_plugin.data.records import find_defenses

    if defense == NO_DEFENSE:
        return os.path.join(record_dir, "attack_result.pt")
    path = os.path.join(record_dir, "defense", defense, "defense_result.pt")
    if not os.path.isfile(path):
        found = [NO_DEFENSE, *find_defenses(record_dir)]
        raise FtsamError(f"no defense result {path}; pass --defense with one of {found} (or run the defense first)")
    return path


def output_dir(result: str, settings: RetuneSettings) -> str:
    """`<folder of the result>/retune/<settings tag>/`."""
    return os.path.join(os.path.dirname(os.path.abspath(result)), "retune", settings.tag)


def run_key(result: str, record_dir: str, settings: RetuneSettings, dataset_path: Optional[str]) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "result": file_fingerprint(result),
        "attack_result": file_fingerprint(os.path.join(record_dir, "attack_result.pt"), with_hash=False),
        "dataset_path": os.path.abspath(dataset_path) if dataset_path else None,
        "settings": settings.as_dict(),
    }


def read_summary(folder: str, key: Optional[dict] = None) -> Optional[dict]:
    """The run's summary.json (None if missing, unreadable, or, given `key`, made for another key). A summary of the
    key whose values are impossible (`summary_problem`) is named in a warning and not used: the run is redone."""
    path = os.path.join(folder, SUMMARY_NAME)
    try:
        with open(path) as handle:
            summary = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or (key is not None and summary.get("key") != key):
        return None
    problem = summary_problem(summary)
    if problem is not None:
        print(f"warning: {path} is damaged ({problem}); not used, the retuning attack is run again", file=sys.stderr)
        return None
    return summary


COUNT, SECONDS = Number(integer=True, low=0), Number(low=0)


def summary_problem(summary: dict) -> Optional[str]:
    """What makes a summary unusable, or None: `after` (and `before`, unless null) must hold ACC, ASR and RA as
    fractions in [0, 1]; the settings, the retuning set's size and the seconds, what the reports print, must be
    there and be the key's."""
    for part in ("after", "before"):
        values = summary.get(part)
        if part == "before" and values is None:
            continue
        if not isinstance(values, dict):
            return f"{part} is {values!r}, not ACC/ASR/RA"
        for metric in ("acc", "asr", "ra"):
            if FRACTION.parse(values.get(metric)) is None:
                return f"{part}.{metric} is {values.get(metric, 'missing')!r}, not a fraction in [0, 1]"
    key = summary.get("key")
    if not isinstance(key, dict) or summary.get("settings") != key.get("settings"):
        return "its settings are not its key's"
    size = summary.get("retune_set", {}).get("size") if isinstance(summary.get("retune_set"), dict) else None
    if COUNT.parse(size) is None or SECONDS.parse(summary.get("seconds")) is None:
        return "the retuning set's size or the run's seconds are missing"
    return None


def find_summary(result: str, record_dir: str, settings: RetuneSettings,
                 dataset_path: Optional[str] = None) -> Optional[dict]:
    """The finished run of `settings` on `result` whose key still matches, or None."""
    return read_summary(output_dir(result, settings), run_key(result, record_dir, settings, dataset_path))


def load_result_model(result: str, record: dict, device="cpu") -> torch.nn.Module:
    """The model stored in `result`: the record's own for its attack_result.pt, else the defense result's."""
    from ftsam_plugin.data.records import load_defense_model

    if os.path.basename(result) == "attack_result.pt":
        return record["model"]
    return load_defense_model(result, record, device)


@contextlib.contextmanager
def _logging_to(path: str, console: bool):
    fmt = logging.Formatter("%(asctime)s [%(levelname)-8s] %(message)s", datefmt="%Y-%m-%d:%H:%M:%S")
    handlers = [LogFile(path, mode="w")]
    if console:
        handlers.append(logging.StreamHandler())
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)


def _claim_folder(folder: str) -> FolderLock:
    """Create the run's folder and take its lock (one writer per folder); then clear what an earlier run left that
    would make it look finished or that a killed write left behind. Returns the held lock."""
    from ftsam_plugin.defense.locations import make_output_folder

    make_output_folder(folder)
    lock = FolderLock(folder, what="retune folder").acquire()
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, SUMMARY_NAME))  # an earlier run's: this folder is unfinished until the end
    remove_stale_temp_files(folder, before=STARTED)
    return lock


def retune_and_save(model: torch.nn.Module, record: dict, result: str, settings: RetuneSettings,
                    defense: str, dataset_path: Optional[str] = None, device="cpu", eval_every: int = 1,
                    eval_batch_size: int = 256, num_workers: int = 0, save_model: bool = False,
                    evaluate_before: bool = True, console: bool = False, given: Iterable[str] = ()) -> dict:
    """Run the attack on `model` (the model in `result`) and write the run's folder (see the module docstring).

    Args:
        model, record: the attacked model and its record (`load_attack_result`); `model` is not modified.
        result: the attacked file (names the output folder and keys the run).
        settings: the attack's settings.
        defense: the defense name (`none` for the backdoored model), for the log and the summary.
        dataset_path: the dataset override the record was loaded with (part of the key).
        device, eval_every, eval_batch_size, num_workers, evaluate_before: see `retune_model` (without the
            evaluation before, the summary's `before` is null).
        save_model: also write the retuned weights.
        console: log to the console too (the log file always gets everything).
        given: names of the settings given on the command line (the log says where the others come from).

    Returns:
        The summary (also written to summary.json). Raises FtsamError on bad input, before anything is written.
    """
    from ftsam_plugin.data.records import save_defense_result, write_metrics_csv, write_metrics_summary_csv

    from .data import build_retune_set

    record_dir = record["record_dir"]
    key = run_key(result, record_dir, settings, dataset_path)
    retune_set = build_retune_set(record, settings)  # checks the sizes before anything is written
    folder = output_dir(result, settings)
    with _claim_folder(folder), _logging_to(os.path.join(folder, LOG_NAME), console):
        logger.info("retuning attack (Min et al., NeurIPS 2024) on %s (defense %s), record %s", result, defense,
                    record_dir)
        logger.info("settings:\n%s", describe(settings, given))
        n_poisoned = int(retune_set.poisoned.sum())
        logger.info("retuning set: %d samples of the %d clean training samples, %d replaced by poisoned training "
                    "images (bd_train positions %s); device %s", len(retune_set), len(record["clean_train"]),
                    n_poisoned, retune_set.index[retune_set.poisoned].tolist(), device)
        csv_path = os.path.join(folder, "retune_df.csv")
        run = retune_model(model, record, settings, device, retune_set=retune_set, evaluate_before=evaluate_before,
                           eval_every=eval_every, eval_batch_size=eval_batch_size, num_workers=num_workers,
                           on_epoch=lambda rows: write_metrics_csv(csv_path, rows))
        write_metrics_csv(csv_path, run.history)
        write_metrics_summary_csv(os.path.join(folder, "retune_df_summary.csv"), run.history)
        weights = None
        if save_model:
            save_defense_result(record["model_name"], record["num_classes"], run.model, folder, WEIGHTS_NAME)
            weights = WEIGHTS_NAME
        summary = {
            "key": key,
            "record": record_dir,
            "result": os.path.abspath(result),
            "defense": defense,
            "settings": settings.as_dict(),
            "retune_set": {"size": len(retune_set), "poisoned": n_poisoned,
                           "poisoned_positions": retune_set.index[retune_set.poisoned].tolist()},
            "before": run.before,
            "after": run.after,
            "seconds": round(run.seconds, 3),
            "device": str(device),
            "weights": weights,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(os.path.join(folder, SUMMARY_NAME), json.dumps(summary, indent=1) + "\n")
        before = run.before or {"asr": float("nan"), "acc": float("nan")}
        logger.info("O-ASR %.4f -> P-ASR %.4f (ACC %.4f -> %.4f) in %.1f s; wrote %s", before["asr"],
                    run.after["asr"], before["acc"], run.after["acc"], run.seconds, folder)
    return summary
