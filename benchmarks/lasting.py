"""Removal that lasts (issue 29): long defense runs with weight snapshots, and what comes back along them.

    # one run: `ftsam defend` flags after --, snapshots of the weights every 5 epochs (resumes if interrupted)
    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lasting.py run --attack blended \
        --tag ftsam_rho4_e100_s0 -- --defense ftsam --rho 4 --epochs 100 --random_seed 0
    # the diagnosis along its snapshots (subset ACC/ASR, distance to theta0, neuron norms/TAC, BN statistics,
    # the straight line back to theta0), then the report
    .venv/bin/python benchmarks/lasting.py analyse --attack blended --tag ftsam_rho4_e100_s0
    .venv/bin/python benchmarks/lasting.py report

Runs use the study's records (`../shared/records`, unpacked into --cache) and its protocol: packaged CIFAR-10
config, 5% class-balanced clean subset, CPU, no workers. In-run evaluation happens once, at the end, on the whole
test set; the ASR along the run is measured afterwards on the snapshots, on a fixed class-balanced subset of the
test sets (200 clean images per class, 2,000 poisoned images drawn evenly from the non-target classes). Evaluation no
longer touches the training RNG (metrics._own_rng), so this equals evaluating during the run.

Each finished run writes `benchmarks/results/lasting_runs/<attack>/<tag>.json` (its command, CSV rows, machine,
commit); `analyse` adds `<tag>.analysis.json` beside it; `report` writes `benchmarks/results/lasting.md` and its
plots from those files alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tarfile
import time
from datetime import datetime
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from ftsam_plugin.provenance import git_commit, machine, machine_short  # noqa: E402

SHARED = os.path.join(REPO, "..", "shared")
RECORDS = {  # attack -> (archive in ../shared/records, or a record folder made here under <cache>/record)
    "badnet": "cifar10_preactresnet18_w0.25_badnet_e15",
    "blended": "cifar10_preactresnet18_w0.25_blended_e15",
}
RESULTS = os.path.join(REPO, "benchmarks", "results", "lasting_runs")
REPORT = os.path.join(REPO, "benchmarks", "results", "lasting.md")
CLEAN_PER_CLASS, BD_TOTAL = 200, 2000  # the during-run evaluation subset
PATH_POINTS = 11  # alphas 0, 0.1, ..., 1 on the line from the defended model to theta0


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def atomic_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(obj, handle, indent=1)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------ data and records
def unpack_data(cache: str) -> str:
    dest = os.path.join(cache, "cifar10-jpeg")
    if not os.path.isfile(os.path.join(dest, ".complete")):
        with tarfile.open(os.path.join(SHARED, "data", "cifar10-jpeg.tar.xz")) as tar:
            tar.extractall(cache, filter="data")
        open(os.path.join(dest, ".complete"), "w").close()
    return dest


def record_dir(cache: str, attack: str) -> str:
    name = RECORDS.get(attack, attack)
    folder = os.path.join(cache, "record", name)
    archive = os.path.join(SHARED, "records", name + ".tar.xz")
    if not os.path.isfile(os.path.join(folder, "attack_result.pt")) and os.path.isfile(archive):
        os.makedirs(os.path.join(cache, "record"), exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(os.path.join(cache, "record"), filter="data")
    if not os.path.isfile(os.path.join(folder, "attack_result.pt")):
        raise SystemExit(f"error: no record for attack {attack!r} at {folder}; make it first")
    return folder


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_dir(cache: str, attack: str, tag: str) -> str:
    return os.path.join(cache, "lasting", attack, tag)


def linked_record(record: str, folder: str) -> str:
    """A per-run record folder: links to the record's files and a defense/ of its own (runs overlap safely)."""
    rec = os.path.join(folder, "rec")
    os.makedirs(os.path.join(rec, "defense"), exist_ok=True)
    for name in os.listdir(record):
        if name != "defense" and not os.path.lexists(os.path.join(rec, name)):
            os.symlink(os.path.join(os.path.abspath(record), name), os.path.join(rec, name))
    return rec


# ------------------------------------------------------------------------------------------------ running
def base_flags(data: str) -> List[str]:
    return ["--yaml_path", "cifar10", "--dataset_path", data, "--device", "cpu", "--num_workers", "0",
            "--pin_memory", "false", "--non_blocking", "false", "--ratio", "0.05"]


def cmd_run(args) -> int:
    import torch

    from ftsam_plugin.defense import cli as defense_cli
    from ftsam_plugin.defense.registry import DEFENSES

    cache = os.path.abspath(args.cache)
    data = unpack_data(cache)
    record = record_dir(cache, args.attack)
    folder = run_dir(cache, args.attack, args.tag)
    rec = linked_record(record, folder)
    snaps = os.path.join(folder, "snapshots")
    os.makedirs(snaps, exist_ok=True)
    flags = list(args.flags[1:] if args.flags[:1] == ["--"] else args.flags)
    parser = defense_cli.add_arguments(argparse.ArgumentParser())
    opts = parser.parse_args(["--result_file", rec, *base_flags(data), *flags])
    epochs = int(opts.epochs)
    opts.eval_every = epochs  # once, at the end: the snapshots give the ASR along the run
    work = os.path.join(rec, "defense", opts.defense)
    resume = os.path.isfile(os.path.join(work, "checkpoint", "last.pt"))
    opts.resume = resume
    every = int(args.snapshot_every)

    class Snapshots(DEFENSES[opts.defense]):
        def _after_epoch(self, epoch: int) -> None:
            if epoch % every == 0 or epoch == epochs:
                from ftsam_plugin.data.records import cpu_state_dict

                path = os.path.join(snaps, f"epoch_{epoch:03d}.pt")
                torch.save({"epoch": epoch, "model": cpu_state_dict(self._model_for_snapshot)}, path + ".tmp")
                os.replace(path + ".tmp", path)

        def setup_training(self, model):
            self._model_for_snapshot = model
            super().setup_training(model)

    namespace = argparse.Namespace(**{k: v for k, v in vars(opts).items() if k != "defense"})
    log(f"{args.attack} {args.tag}: {'resuming' if resume else 'starting'} ({machine_short()})")
    started = time.time()
    Snapshots(namespace).defense(rec)
    wall = time.time() - started
    import csv

    with open(os.path.join(work, f"{opts.defense}_df.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    summary = {
        "tag": args.tag, "attack": args.attack, "record": os.path.basename(record),
        "record_sha256": sha256_file(os.path.join(record, "attack_result.pt")),
        "command": "ftsam defend --result_file <record> " + " ".join(base_flags("<data>") + flags),
        "flags": flags, "snapshot_every": every, "resumed": resume, "wall_s": wall, "rows": rows,
        "machine": machine(), "commit": git_commit(REPO), "finished": datetime.now().isoformat(timespec="seconds"),
    }
    atomic_json(os.path.join(RESULTS, args.attack, args.tag + ".json"), summary)
    log(f"{args.attack} {args.tag}: done in {wall / 60:.1f} min")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache"))
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one defense run with weight snapshots")
    run.add_argument("--attack", required=True)
    run.add_argument("--tag", required=True)
    run.add_argument("--snapshot_every", type=int, default=5)
    run.add_argument("flags", nargs=argparse.REMAINDER, help="-- then `ftsam defend` flags")
    args = parser.parse_args(argv)
    return {"run": cmd_run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
