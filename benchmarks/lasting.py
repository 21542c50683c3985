"""Removal that lasts (issue 29): long defense runs with weight snapshots, and what comes back along them.

    # one run: `ftsam defend` flags after --, snapshots of the weights every 5 epochs (resumes if interrupted)
    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lasting.py run --attack blended \
        --tag ftsam_rho4_e100_s0 -- --defense ftsam --rho 4 --epochs 100 --random_seed 0
    # issue 29's frozen rule (configs/ftsam/cifar10_lasting.yaml) on a held-out seed or attack
    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lasting.py run --attack lf \
        --tag rule_e100_s0 -- --defense ftsam --yaml_path cifar10_lasting --epochs 100 --random_seed 0
    # the diagnosis along its snapshots (subset ACC/ASR, distance to theta0, neuron norms/TAC, BN statistics,
    # the straight line back to theta0), then the report
    .venv/bin/python benchmarks/lasting.py analyse --attack blended --tag ftsam_rho4_e100_s0
    # the trigger-free signal: --unlearn uap's targeted-UAP scan on snapshots 0 (theta0), 5, 20, 100
    .venv/bin/python benchmarks/lasting.py uap --attack blended --tag ftsam_rho4_e100_s0
    # the 100-epoch table's grid (benchmarks/grids/lasting.yaml, for a cluster): its finished cells into summaries
    .venv/bin/python benchmarks/lasting.py collect
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
import glob
import hashlib
import json
import math
import os
import re
import statistics
import sys
import tarfile
import time
from datetime import datetime
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from ftsam_plugin.provenance import git_commit, machine, machine_short, sha256_file  # noqa: E402

from defense_cpu import link_record, unpack  # noqa: E402  (the study's: CIFAR-10 unpacked once, per-run record links)

SHARED = os.path.join(REPO, "..", "shared")
RECORDS = {  # attack -> (archive in ../shared/records, or a record folder made here under <cache>/record)
    "badnet": "cifar10_preactresnet18_w0.25_badnet_e15",
    "blended": "cifar10_preactresnet18_w0.25_blended_e15",
    "lf": "cifar10_preactresnet18_w0.25_lf_e15",  # made here by defense_cpu.py's command (BACKDOORBENCH_ROOT)
}
RESULTS = os.path.join(REPO, "benchmarks", "results", "lasting_runs")
REPORT = os.path.join(REPO, "benchmarks", "results", "lasting.md")
EVAL_SUBSET = 2000  # the during-run evaluation subsets: 200 clean test images per class, 2,000 poisoned
PATH_POINTS = 11  # alphas 0, 0.1, ..., 1 on the line from the defended model to theta0


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def read_json(path: str) -> Optional[dict]:
    """A result file's contents, or None where there is none yet (a run's analysis, P-ASR or scans)."""
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def read_csv_rows(path: str) -> List[dict]:
    """A defense's per-epoch CSV as written (text values; the unnamed first column is BackdoorBench's index)."""
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def atomic_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(obj, handle, indent=1)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------ data and records
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


def run_dir(cache: str, attack: str, tag: str) -> str:
    return os.path.join(cache, "lasting", attack, tag)


# ------------------------------------------------------------------------------------------------ running
def base_flags(data: str, flags: Sequence[str] = ()) -> List[str]:
    """The study's protocol; the packaged cifar10 config unless the run's own flags name one (the frozen rule is
    `--yaml_path cifar10_lasting`)."""
    config = [] if "--yaml_path" in flags else ["--yaml_path", "cifar10"]
    return [*config, "--dataset_path", data, "--device", "cpu", "--num_workers", "0",
            "--pin_memory", "false", "--non_blocking", "false", "--ratio", "0.05"]


def cmd_run(args) -> int:
    import torch

    from ftsam_plugin.defense import cli as defense_cli
    from ftsam_plugin.defense.registry import DEFENSES

    cache = os.path.abspath(args.cache)
    done = os.path.join(RESULTS, args.attack, args.tag + ".json")
    if os.path.isfile(done):  # finished (its checkpoint is gone once the result is written): nothing to run
        log(f"{args.attack} {args.tag}: finished already ({done})")
        return 0
    data = unpack(cache)
    record = record_dir(cache, args.attack)
    folder = run_dir(cache, args.attack, args.tag)
    rec = link_record(record, folder)
    snaps = os.path.join(folder, "snapshots")
    os.makedirs(snaps, exist_ok=True)
    flags = list(args.flags[1:] if args.flags[:1] == ["--"] else args.flags)
    parser = defense_cli.add_arguments(argparse.ArgumentParser())
    opts = parser.parse_args(["--result_file", rec, *base_flags(data, flags), *flags])
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
    started, started_commit = time.time(), git_commit(REPO)  # the code the run loads is the code at its start
    Snapshots(namespace).defense(rec)
    wall = time.time() - started
    rows = read_csv_rows(os.path.join(work, f"{opts.defense}_df.csv"))
    summary = {
        "tag": args.tag, "attack": args.attack, "record": os.path.basename(record),
        "record_sha256": sha256_file(os.path.join(record, "attack_result.pt")),
        "command": "ftsam defend --result_file <record> " + " ".join(base_flags("<data>", flags) + flags),
        "flags": flags, "snapshot_every": every, "resumed": resume, "wall_s": wall, "rows": rows,
        "machine": machine(), "started_commit": started_commit, "commit": git_commit(REPO),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    atomic_json(os.path.join(RESULTS, args.attack, args.tag + ".json"), summary)
    log(f"{args.attack} {args.tag}: done in {wall / 60:.1f} min")
    return 0


# ------------------------------------------------------------------------------------------------ the diagnosis
def eval_subsets(loaded: dict) -> Dict[str, List[int]]:
    """The fixed during-run subsets, those of `ftsam defend --eval_subset 2000`: 200 clean test images per class,
    1,998 poisoned test images (the first 222 of each of the 9 source classes, in index order)."""
    from ftsam_plugin.defense.subsets import fixed_eval_subsets

    clean, bd = fixed_eval_subsets(loaded["clean_test"], loaded["bd_test"], EVAL_SUBSET)
    return {"clean": clean, "bd": bd}


def params_only(state: dict) -> Dict[str, "torch.Tensor"]:
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def l2(tensors) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


def cmd_analyse(args) -> int:
    """ASR/ACC on the fixed subsets, distance to theta0, neuron norms/TAC, BN statistics along the snapshots; the
    loss/ACC/ASR on the straight line from chosen snapshots back to theta0."""
    import numpy as np
    import torch
    from torch.utils.data import Subset

    from ftsam_plugin.data.records import load_attack_result
    from ftsam_plugin.metrics import evaluate_backdoor
    from ftsam_plugin.norms import PairedTriggerSet, channel_weight_norms, resolve_layer, trigger_activated_change

    torch.set_num_threads(1)
    cache = os.path.abspath(args.cache)
    data = unpack(cache)
    record = record_dir(cache, args.attack)
    folder = run_dir(cache, args.attack, args.tag)
    rows = []  # the run's CSV (its lr column), also while it is still running
    for path in glob.glob(os.path.join(folder, "rec", "defense", "*", "*_df.csv")):
        rows = read_csv_rows(path)
    lr_of = {int(r["epoch"]): float(r["lr"]) for r in rows}
    loaded = load_attack_result(record, dataset_path=data)
    model = loaded["model"]
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    subsets = eval_subsets(loaded)
    clean = Subset(loaded["clean_test"], subsets["clean"])
    bd = Subset(loaded["bd_test"], subsets["bd"])
    path_clean = Subset(loaded["clean_test"], subsets["clean"][::4])
    path_bd = Subset(loaded["bd_test"], subsets["bd"][::4])
    pairs = PairedTriggerSet(loaded["bd_test"], loaded["clean_test"], num_samples=500)
    layer, conv = resolve_layer(model, None)
    tac0 = trigger_activated_change(model, layer, pairs)
    top = np.argsort(-tac0)[: max(1, len(tac0) // 10)]  # the backdoored model's top-10% TAC channels
    rest = np.setdiff1d(np.arange(len(tac0)), top)
    bn_keys = [k for k in theta0 if k.endswith("running_mean") or k.endswith("running_var")]
    p_0 = params_only(theta0)
    norm_0 = l2(p_0.values())  # ||theta0||, once

    def measure(state: dict, epoch: int) -> dict:
        model.load_state_dict(state)
        m = evaluate_backdoor(model, clean, bd, batch_size=256, with_loss=True)
        norms = channel_weight_norms(dict(model.named_modules())[layer])
        tac = trigger_activated_change(model, layer, pairs)
        mixed = dict(state)
        mixed.update({k: theta0[k] for k in bn_keys})  # this snapshot's weights with theta0's BN statistics
        model.load_state_dict(mixed)
        swap = evaluate_backdoor(model, clean, bd, batch_size=256)
        p_now = params_only(state)
        dist = l2([p_now[k] - p_0[k] for k in p_0])
        return {
            "epoch": epoch, "lr": lr_of.get(epoch), "acc": m["acc"], "asr": m["asr"], "ra": m["ra"],
            "clean_loss": m["clean_loss"], "bd_loss": m["bd_loss"],
            "dist_theta0": dist, "rel_dist_theta0": dist / norm_0,
            "top_tac_norm": float(norms[top].mean()), "rest_norm": float(norms[rest].mean()),
            "top_tac_tac": float(tac[top].mean()), "rest_tac": float(tac[rest].mean()),
            "bn_rel_dist": l2([state[k] - theta0[k] for k in bn_keys]) / l2([theta0[k] for k in bn_keys]),
            "asr_with_theta0_bn": swap["asr"], "acc_with_theta0_bn": swap["acc"],
        }

    log(f"{args.attack} {args.tag}: analysing (layer {layer}, top-TAC channels {sorted(int(c) for c in top)})")
    files = sorted(glob.glob(os.path.join(folder, "snapshots", "epoch_*.pt")))
    if not files:
        raise SystemExit(f"error: no snapshots in {folder}; run the study first")
    from ftsam_plugin.io import safe_load

    snaps = {0: theta0}
    for path in files:
        item = safe_load(path, what="snapshot")
        snaps[int(item["epoch"])] = item["model"]
    out_path = os.path.join(RESULTS, args.attack, args.tag + ".analysis.json")
    known = {}  # an earlier analysis of the same snapshots (a running run is analysed as it goes)
    earlier = read_json(out_path)
    if earlier is not None and earlier.get("top_tac_channels") == sorted(int(c) for c in top):
        known = {a["epoch"]: a for a in earlier["along"] if a.get("digest")}
    along = []
    for epoch, state in sorted(snaps.items()):
        digest = hashlib.sha256(b"".join(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                                         for t in state.values())).hexdigest()[:16]
        row = known.get(epoch)
        if row is None or row["digest"] != digest:
            row = dict(measure(state, epoch), digest=digest)
        row["lr"] = lr_of.get(epoch)
        along.append(row)
    last = max(snaps)
    line_from = sorted({e for e in (10, last) if e in snaps})
    lines = {}
    for epoch in line_from:
        points = []
        for i in range(PATH_POINTS):
            alpha = i / (PATH_POINTS - 1)
            state = {k: (snaps[epoch][k].double() + alpha * (theta0[k].double() - snaps[epoch][k].double())
                         ).to(theta0[k].dtype) if theta0[k].is_floating_point() else snaps[epoch][k]
                     for k in theta0}
            model.load_state_dict(state)
            m = evaluate_backdoor(model, path_clean, path_bd, batch_size=256, with_loss=True)
            points.append({"alpha": alpha, "acc": m["acc"], "asr": m["asr"], "clean_loss": m["clean_loss"]})
        lines[str(epoch)] = points
    out = {"tag": args.tag, "attack": args.attack, "layer": layer, "top_tac_channels": sorted(int(c) for c in top),
           "subset_sizes": {k: len(v) for k, v in subsets.items()}, "path_subset_sizes": [len(path_clean),
                                                                                           len(path_bd)],
           "along": along, "lines": lines, "machine": machine(), "commit": git_commit(REPO),
           "finished": datetime.now().isoformat(timespec="seconds")}
    atomic_json(out_path, out)
    log(f"{args.attack} {args.tag}: analysis written")
    return 0


# ------------------------------------------------------------------------------------------------ the UAP scan
def cmd_uap(args) -> int:
    """`--unlearn`'s scan (the defense's own code, `--unlearner` uap or uap-l2) on chosen snapshots: each class's
    targeted-UAP success on the fixed clean test subset (first 1,000 images: fit on the even ones, measure on the
    odd ones), added to <tag>.uap.json. Does the trigger-free signal see the backdoor, and its return?"""
    import torch

    from ftsam_plugin.data.datasets import get_dataset_info
    from ftsam_plugin.data.records import load_attack_result
    from ftsam_plugin.defense.unlearn import SCAN_IMAGES, create_unlearner
    from ftsam_plugin.io import safe_load

    torch.set_num_threads(1)
    cache = os.path.abspath(args.cache)
    loaded = load_attack_result(record_dir(cache, args.attack), dataset_path=unpack(cache))
    model = loaded["model"].eval()
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pool = eval_subsets(loaded)["clean"][:SCAN_IMAGES]
    items = [loaded["clean_test"][i] for i in pool]
    images, labels = torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])
    info = get_dataset_info(loaded["clean_data"])
    folder = run_dir(cache, args.attack, args.tag)
    out_path = os.path.join(RESULTS, args.attack, args.tag + ".uap.json")
    done = {(r["unlearner"], r["epoch"]): r for r in (read_json(out_path) or {"scans": []})["scans"]}
    for epoch in args.epochs:
        if (args.unlearner, epoch) in done:
            continue
        state = theta0 if epoch == 0 else safe_load(os.path.join(folder, "snapshots", f"epoch_{epoch:03d}.pt"),
                                                    what="snapshot")["model"]
        model.load_state_dict(state)
        scan = create_unlearner(args.unlearner, eps=args.eps, frac=0.25, num_classes=int(loaded["num_classes"]),
                                mean=info.mean, std=info.std, seed=0)
        started = time.time()
        scan.scan(model, images, labels)
        done[(args.unlearner, epoch)] = {"unlearner": args.unlearner, "eps255": round(scan.eps * 255, 4),
                                         "epoch": epoch, "success": scan.success, "suspect": scan.target,
                                         "wall_s": round(time.time() - started, 1)}
        atomic_json(out_path, {"tag": args.tag, "attack": args.attack,
                               "scans": sorted(done.values(), key=lambda r: (r["unlearner"], r["epoch"])),
                               "machine": machine(), "commit": git_commit(REPO)})
        log(f"{args.attack} {args.tag}: {args.unlearner} epoch {epoch}: targeted-UAP success {scan.success}")
    return 0


# ------------------------------------------------------------------------------------------------ P-ASR
RETUNE_SEEDS = (42, 43, 44)
POISON_NUM = 5  # the retuning set: 2% of the training set (1,000 images) holding 5 poisoned ones; control: none


def cmd_retune(args) -> int:
    """`ftsam retune` on a finished run's model: the attack (5 poisoned images) and its control (none) for each
    retuning seed, each a subprocess; results collected in <tag>.retune.json (a finished pair is kept)."""
    import subprocess

    cache = os.path.abspath(args.cache)
    data = unpack(cache)
    folder = run_dir(cache, args.attack, args.tag)
    with open(os.path.join(RESULTS, args.attack, args.tag + ".json")) as handle:
        summary = json.load(handle)
    defense = summary["flags"][summary["flags"].index("--defense") + 1] if "--defense" in summary["flags"] \
        else "ftsam"
    rec = os.path.join(folder, "rec")
    target = summary.get("retune_target")  # a grid cell's model: <record>/defense/<cell folder>/
    if target:
        rec, defense = os.path.join(cache, target["result_file"]), target["defense"]
    out_path = os.path.join(RESULTS, args.attack, args.tag + ".retune.json")
    done = {(r["poison_num"], r["seed"]): r for r in (read_json(out_path) or {"runs": []})["runs"]}
    for seed in args.seeds:
        for poison in (POISON_NUM, 0):
            if (poison, seed) in done:
                continue
            argv = ["retune", "--result_file", rec, "--defense", defense, "--dataset_path", data, "--device", "cpu",
                    "--poison_num", str(poison), "--random_seed", str(seed), "--eval_every", "5", "--force"]
            argv += ["--eval_before", "false"] if poison == 0 else []
            started = time.time()
            log_path = os.path.join(cache, "logs", f"lasting_{args.attack}_{args.tag}_retune_p{poison}_s{seed}.log")
            with open(log_path, "w") as handle:
                code = subprocess.call([sys.executable, "-m", "ftsam_plugin", *argv], stdout=handle,
                                       stderr=subprocess.STDOUT, cwd=REPO,
                                       env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
            if code != 0:
                raise SystemExit(f"error: ftsam retune failed with exit code {code}; see {log_path}")
            found = sorted(glob.glob(os.path.join(rec, "defense", defense, "retune", f"p{poison}_*_s{seed}",
                                                  "summary.json")), key=os.path.getmtime)
            with open(found[-1]) as handle:
                result = json.load(handle)
            done[(poison, seed)] = {"poison_num": poison, "seed": seed, "before": result.get("before"),
                                    "after": result["after"], "settings": result["settings"],
                                    "wall_s": round(time.time() - started, 1),
                                    "command": "ftsam " + " ".join(a.replace(cache, "<cache>") for a in argv)}
            atomic_json(out_path, {"tag": args.tag, "attack": args.attack, "runs": list(done.values()),
                                   "machine": machine(), "commit": git_commit(REPO)})
            log(f"{args.attack} {args.tag}: retune poison {poison} seed {seed}: ASR {result['after']['asr']:.4f}")
    return 0


GRID = os.path.join(REPO, "benchmarks", "grids", "lasting.yaml")  # the 100-epoch table's cells, for a cluster
COMMON_FLAGS = ("dataset_path", "device", "num_workers", "pin_memory", "non_blocking", "ratio")  # the protocol's


def cmd_collect(args) -> int:
    """A summary in lasting_runs/ for each finished cell of benchmarks/grids/lasting.yaml that has none: its CSV
    rows (subset evaluations every 5 epochs, the whole test sets at the end) stand in for the snapshots' analysis;
    `retune` then finds its model in the cell's folder."""
    from ftsam_plugin.grid.slurm import SlurmQuery
    from ftsam_plugin.grid.spec import load_grid
    from ftsam_plugin.grid.state import cell_state

    cache = os.path.abspath(args.cache)
    attacks = {folder: attack for attack, folder in RECORDS.items()}
    query, written = SlurmQuery(), 0
    for cell in load_grid(GRID, need_records=False).cells:
        attack = attacks.get(os.path.basename(cell.record))
        path = os.path.join(RESULTS, str(attack), cell.folder_name + ".json")
        if attack is None or os.path.isfile(path):
            continue
        state = cell_state(cell, query)
        if state.state != "done":
            continue
        rows = read_csv_rows(os.path.join(cell.folder, f"{cell.defense}_df.csv"))
        flags = ["--defense", cell.defense]  # the cell's own flags, written as the grid writes them
        for key, value in cell.settings:
            if key not in COMMON_FLAGS and (key, value) != ("yaml_path", "cifar10"):
                flags += [f"--{key}", cell.text(value)]
        grid = state.summary
        atomic_json(path, {
            "tag": cell.folder_name, "attack": attack, "record": os.path.basename(cell.record),
            "record_sha256": sha256_file(os.path.join(cell.record, "attack_result.pt")),
            "command": cell.command().replace(cache, "<cache>"), "flags": flags, "resumed": bool(
                grid.get("resumed")) or int(grid.get("attempts") or 1) > 1, "wall_s": float(grid["wall_s"]),
            "rows": rows, "machine": grid["machine"], "commit": grid.get("commit", "unknown"),
            "finished": grid["finished"], "grid_cell": os.path.relpath(cell.folder, REPO),
            "retune_target": {"result_file": os.path.relpath(cell.record, cache), "defense": cell.folder_name}})
        log(f"{attack} {cell.folder_name}: collected -> {path}")
        written += 1
    log(f"{written} grid cell(s) collected")
    return 0


# ------------------------------------------------------------------------------------------------ the report
def pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def load_runs() -> Dict[str, Dict[str, dict]]:
    """{attack: {tag: {"summary": ..., "analysis": ... or None}}} from benchmarks/results/lasting_runs/."""
    runs: Dict[str, Dict[str, dict]] = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "*", "*.json"))):
        if path.endswith((".analysis.json", ".retune.json", ".uap.json")):
            continue
        with open(path) as handle:
            summary = json.load(handle)
        stem = path[:-len(".json")]
        runs.setdefault(summary["attack"], {})[summary["tag"]] = {
            "summary": summary, **{part: read_json(f"{stem}.{part}.json") for part in ("analysis", "retune", "uap")}}
    return runs


def mean_sd(values: Sequence[float], scale: float = 100.0) -> str:
    """Mean ± sample standard deviation (n - 1) of fractions, in % ("–" for none)."""
    if not values:
        return "–"
    sd = f" ± {scale * statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{scale * statistics.mean(values):.2f}{sd}"


def p_asr(retune: Optional[dict], poison: int) -> str:
    """Mean ± sample standard deviation of the ASR after retuning over the seeds, and their count."""
    values = [r["after"]["asr"] for r in (retune or {"runs": []})["runs"] if r["poison_num"] == poison]
    return f"{mean_sd(values)} (n={len(values)})" if values else "–"


def worst_after(along: List[dict], first_epoch: int = 10) -> Optional[float]:
    """The largest subset ASR at the evaluations from `first_epoch` on (the relapse measure)."""
    values = [a["asr"] for a in along if a["epoch"] >= first_epoch]
    return max(values) if values else None


SEED_TAG = re.compile(r"^(?:lasting_)?(?P<head>.+?)_s(?P<seed>\d+)(?P<tail>_[a-z]+)?$")  # grid cell: lasting_<tag>
STUDY = os.path.join(REPO, "benchmarks", "results", "defense_cpu_runs")  # the CPU study's FT-100 runs: the reference


def along_of(item: dict) -> List[dict]:
    """The subset ASR along a run: its snapshots' analysis, or a grid cell's own evaluations (--eval_subset: every
    5 epochs on the subsets, column subset_test_asr; the last epoch on the whole test sets, test_asr); [] when
    neither was measured."""
    if item.get("analysis"):
        return item["analysis"]["along"]
    rows = item["summary"]["rows"]
    if not any(r.get("subset_test_asr") not in (None, "") for r in rows):
        return []
    along = []
    for r in rows:
        asr = next((r[k] for k in ("subset_test_asr", "test_asr") if r.get(k) not in (None, "")), None)
        if asr is not None:
            along.append({"epoch": int(float(r["epoch"])), "asr": float(asr)})
    return along


def cpu_vendor(text: str) -> str:
    """AMD or Intel: CPU runs reproduce to the digit only on the same kind of CPU."""
    return "AMD" if "AMD" in text else "Intel" if "Intel" in text else text


def setting_rows(attack: str, tags: Dict[str, dict]) -> List[str]:
    """The attack's table by setting, means over its defense seeds: ACC, final ASR, worst subset ASR from epoch 10
    (mean and largest over the seeds), P-ASR and control over every defense seed x retuning seed, training time
    and its ratio to the CPU study's FT-100 on this attack (runs on the same kind of CPU, AMD or Intel, only)."""
    groups: Dict[str, Dict[int, dict]] = {}
    for tag, item in sorted(tags.items()):
        m = SEED_TAG.match(tag)
        if m:  # the same seed twice (a snapshot run and a grid cell): the one with the snapshots' analysis
            setting = m["head"] + (m["tail"] or "")
            seen = groups.setdefault(setting, {}).get(int(m["seed"]))
            if seen is None or (item.get("analysis") and not seen.get("analysis")):
                groups[setting][int(m["seed"])] = item
    vendors = {cpu_vendor(item["summary"]["machine"]["cpu"]) for item in tags.values()}
    ft100 = [s for s in (read_json(p) for p in sorted(glob.glob(os.path.join(STUDY, attack, "ft_e100_s*.json"))))
             if s and cpu_vendor(str(s.get("machine"))) in vendors]
    timed = [float(s["rows"][-1]["train_time_s"]) for s in ft100 if s["rows"][-1].get("train_time_s")]
    ref = statistics.mean(timed) if timed else None
    lines = ["| setting | defense seeds | ACC | final ASR | worst ASR, epochs 10–100: mean (largest) | P-ASR | "
             "control | train time, s (÷ FT-100's) |", "|---|---|---|---|---|---|---|---|"]
    if ft100:
        worst = [max(float(r["test_asr"]) for r in s["rows"] if r.get("test_asr") is not None
                     and float(r["epoch"]) >= 10) for s in ft100]
        lines.append(f"| FT-100, CPU study (whole test set every 10 epochs) | "
                     f"{', '.join(SEED_TAG.match(s['tag'])['seed'] for s in ft100)} | {mean_sd([s['rows'][-1]['test_acc'] for s in ft100])} | "
                     f"{mean_sd([s['rows'][-1]['test_asr'] for s in ft100])} | {mean_sd(worst)} "
                     f"({pct(max(worst))}) | – | – | " + (f"{ref:.0f} (1.00, n={len(timed)})" if ref else "–") + " |")
    for setting, seeds in sorted(groups.items()):
        items = [seeds[s] for s in sorted(seeds)]
        last = [item["summary"]["rows"][-1] for item in items]
        worst = [w for w in (worst_after(along_of(item)) for item in items) if w is not None]
        runs = [r for item in items for r in ((item.get("retune") or {}).get("runs") or [])]
        after = {p: [r["after"]["asr"] for r in runs if r["poison_num"] == p] for p in (POISON_NUM, 0)}
        times = [float(r["train_time_s"]) for r in last if r.get("train_time_s")]
        time = f"{statistics.mean(times):.0f}" + (f" ({statistics.mean(times) / ref:.2f})" if ref else "") \
            if times else "–"
        lines.append(f"| {setting} | {', '.join(str(s) for s in sorted(seeds))} | "
                     f"{mean_sd([float(r['test_acc']) for r in last])} | "
                     f"{mean_sd([float(r['test_asr']) for r in last])} | "
                     + (f"{mean_sd(worst)} ({pct(max(worst))}), n={len(worst)}" if worst else "–") +
                     f" | {mean_sd(after[POISON_NUM])} (n={len(after[POISON_NUM])}) | {mean_sd(after[0])} | {time} |")
    return lines + [""]


def plot_run(attack: str, tag: str, analysis: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    along = analysis["along"]
    epochs = [a["epoch"] for a in along]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    ax = axes[0]
    ax.plot(epochs, [100 * a["asr"] for a in along], "r.-", label="ASR")
    ax.plot(epochs, [100 * a["acc"] for a in along], "b.-", label="ACC")
    ax.plot(epochs, [100 * a["asr_with_theta0_bn"] for a in along], "m:", label="ASR, theta0's BN statistics")
    ax.set_xlabel("epoch"), ax.set_ylabel("%"), ax.legend(fontsize=7), ax.set_title("on the fixed test subsets")
    twin = ax.twinx()
    twin.plot([a["epoch"] for a in along if a["lr"] is not None], [a["lr"] for a in along if a["lr"] is not None],
              "k--", lw=0.8)
    twin.set_ylabel("lr (dashed)")
    ax = axes[1]
    ax.plot(epochs, [a["dist_theta0"] for a in along], "g.-")
    ax.set_xlabel("epoch"), ax.set_ylabel("||theta - theta0||"), ax.set_title("distance to the backdoored weights")
    ax = axes[2]
    ax.plot(epochs, [a["top_tac_norm"] / a["rest_norm"] for a in along], "c.-", label="norm ratio")
    ax.plot(epochs, [a["top_tac_tac"] / max(a["rest_tac"], 1e-12) for a in along], "y.-", label="TAC ratio")
    ax.set_xlabel("epoch"), ax.legend(fontsize=7)
    ax.set_title(f"top-10% TAC channels of theta0 / rest\n({analysis['layer']})", fontsize=9)
    ax = axes[3]
    for start, points in sorted(analysis["lines"].items(), key=lambda kv: int(kv[0])):
        alphas = [p["alpha"] for p in points]
        ax.plot(alphas, [100 * p["asr"] for p in points], ".-", label=f"ASR from epoch {start}")
        ax.plot(alphas, [100 * p["acc"] for p in points], ".--", label=f"ACC from epoch {start}")
    twin = ax.twinx()
    for start, points in sorted(analysis["lines"].items(), key=lambda kv: int(kv[0])):
        twin.plot([p["alpha"] for p in points], [p["clean_loss"] for p in points], ":", lw=1)
    twin.set_ylabel("clean loss (dotted)")
    ax.set_xlabel("alpha: (1 - alpha) theta_t + alpha theta0"), ax.set_ylabel("%"), ax.legend(fontsize=7)
    ax.set_title("the straight line back to theta0")
    fig.suptitle(f"{attack} {tag}")
    fig.tight_layout()
    fig.savefig(out + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(out + ".tmp.png", out)


def cmd_report(args) -> int:
    runs = load_runs()
    lines = ["# Removal that lasts: long runs and what comes back (issue 29)", "",
             "Written by `python benchmarks/lasting.py report` from `benchmarks/results/lasting_runs/` (each run's "
             "summary and its analysis; the commands are in the files). Records: the study's "
             "(`../shared/records`, and LF made here by `defense_cpu.py`'s command; CIFAR-10, PreAct-ResNet18 width "
             "0.25, 15 attack epochs, 10% poison). Defenses: packaged CIFAR-10 config (lr 0.01 cosine, batch 256, "
             "label smoothing 0.1), 5% class-balanced clean subset, one thread; `--protocol backdoorbench` in the "
             "settings: BackdoorBench's recipe instead (plain cross-entropy, uniform subset). ACC / ASR / RA at the "
             "end on the whole test set (in-run); along the run on the "
             f"fixed subsets ({EVAL_SUBSET // 10} clean test images per class, {EVAL_SUBSET // 9 * 9} poisoned test "
             "images evenly "
             "from the non-target classes) from weight snapshots every 5 epochs. **Worst ASR after epoch 10**: the "
             "largest subset ASR at the evaluations from epoch 10 on (the target: ≤ 5% at every one). **P-ASR**: "
             "`ftsam retune` (1,000 clean training images holding 5 poisoned ones, 5 epochs, lr 0.01) on the final "
             "model, mean ± sample standard deviation over retuning seeds 42–44; **control**: the same without "
             "poisoned images. Each attack's first table groups the runs by setting (the tag without its seed; a "
             "grid cell of `benchmarks/grids/lasting.yaml`, collected by `lasting.py collect`, counts as the run of "
             "its tag without `lasting_`, its subset ASR read from its own evaluations): means over the defense "
             "seeds, the worst ASR as the mean and the largest over them, P-ASR over every defense seed × retuning "
             "seed. **rule_e100** is the frozen rule (`--yaml_path cifar10_lasting`); every run of it is held out "
             "(LF, and seeds 3–5 of BadNets and Blended); its design runs are `ftsam_rho4_sam1-5_uapl2_e100`, seed "
             "0 of BadNets and Blended. Train time: the runs' training seconds (evaluation excluded) on a 2-core "
             "machine shared with one or two other jobs, so the ratios to the CPU study's FT-100 are rough.", ""]
    for attack, tags in sorted(runs.items()):
        lines += [f"## {attack}", ""] + setting_rows(attack, tags)
        lines += ["| run | settings | ACC | ASR | RA | worst ASR, epochs 10–end | subset ASR at "
                  "epochs 10 / 20 / 40 / 60 / 80 / 100 | P-ASR | control | machine | code (at the run's start) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for tag, item in sorted(tags.items()):
            summary = item["summary"]
            last = summary["rows"][-1]
            along = along_of(item)
            at = {a["epoch"]: a["asr"] for a in along}
            m = summary["machine"]
            lines.append(f"| {tag} | `{' '.join(summary['flags'])}` | {pct(float(last['test_acc']))} | "
                         f"{pct(float(last['test_asr']))} | {pct(float(last['test_ra']))} | "
                         f"{pct(worst_after(along)) if along else '–'} | "
                         + " / ".join(pct(at.get(e)) for e in (10, 20, 40, 60, 80, 100)) +
                         f" | {p_asr(item['retune'], POISON_NUM)} | {p_asr(item['retune'], 0)}"
                         f" | {m['cpu']}, {m['threads']} thread(s), torch {m['torch']} | "
                         f"{summary.get('started_commit', summary['commit'])} |")
        lines.append("")
        scans = [(tag, item["uap"]) for tag, item in sorted(tags.items()) if item.get("uap")]
        if scans:
            lines += ["Targeted-UAP scans (`lasting.py uap`: `--unlearn`'s scan on the snapshot; uap: L∞ radius "
                      "in pixel levels out of 255, uap-l2: L2 radius over the image in the same unit; 1,000 images "
                      "of the clean test subset): the share of the other classes' images a targeted UAP sends to "
                      "the attack's target class 0, against the largest share for another class, and the class the "
                      "scan suspects.", "",
                      "| run | scan | epoch | subset ASR | class 0 | largest other | suspect |",
                      "|---|---|---|---|---|---|---|"]
            for tag, uap in scans:
                at = {a["epoch"]: a["asr"] for a in (tags[tag]["analysis"] or {}).get("along", [])}
                for r in uap["scans"]:
                    lines.append(f"| {tag} | {r['unlearner']}, {r['eps255']:g} | {r['epoch']} | "
                                 f"{pct(at.get(r['epoch']))} | {r['success'][0]:.1f} | {max(r['success'][1:]):.1f} | "
                                 f"{r['suspect']} |")
            lines.append("")
        for tag, item in sorted(tags.items()):
            if item["analysis"]:
                name = f"lasting_{attack}_{tag}.png"
                plot_run(attack, tag, item["analysis"], os.path.join(os.path.dirname(REPORT), name))
                lines += [f"![{attack} {tag}]({name})", ""]
    text = "\n".join(lines) + "\n"
    with open(REPORT + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(REPORT + ".tmp", REPORT)
    log(f"wrote {REPORT}")
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
    analyse = sub.add_parser("analyse", help="the diagnosis along a finished run's snapshots")
    analyse.add_argument("--attack", required=True)
    analyse.add_argument("--tag", required=True)
    retune = sub.add_parser("retune", help="P-ASR of a finished run's model (attack and control per seed)")
    retune.add_argument("--attack", required=True)
    retune.add_argument("--tag", required=True)
    retune.add_argument("--seeds", type=int, nargs="+", default=list(RETUNE_SEEDS))
    uap = sub.add_parser("uap", help="--unlearn uap's targeted-UAP scan on chosen snapshots (0: theta0)")
    uap.add_argument("--attack", required=True)
    uap.add_argument("--tag", required=True)
    uap.add_argument("--epochs", type=int, nargs="+", default=[0, 5, 20, 100])
    uap.add_argument("--unlearner", default="uap", choices=("uap", "uap-l2"), help="whose scan (default uap)")
    uap.add_argument("--eps", type=float, help="radius in pixel levels out of 255 (default: the unlearner's)")
    sub.add_parser("collect", help="summaries of the finished cells of benchmarks/grids/lasting.yaml")
    sub.add_parser("report", help="benchmarks/results/lasting.md and its plots from the committed files")
    args = parser.parse_args(argv)
    commands = {"run": cmd_run, "analyse": cmd_analyse, "retune": cmd_retune, "uap": cmd_uap, "report": cmd_report,
                "collect": cmd_collect}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
