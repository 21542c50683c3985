"""CPU benchmark: no defense vs FT vs FT-SAM on BadNets and Blended CIFAR-10 records (PreAct-ResNet18, width 0.25).

    nice -n 10 .venv/bin/python benchmarks/defense_cpu.py            # full run: hours on 2 cores, resumable
    .venv/bin/python benchmarks/defense_cpu.py --quick                # pipeline check on a data subset, < 10 min

Steps (each cached under --cache, default benchmarks/.cache, so a re-run skips what finished):
  1. unpack ../shared/data/cifar10-jpeg.tar.xz (the real CIFAR-10 as JPEG q75) once;
  2. `ftsam attack` BadNets and Blended: 10% poison, all-to-one target 0, PreAct-ResNet18 width 0.25
     (the full width trains at ~50 img/s on this CPU), batch 128, lr 0.01 cosine;
  3. on each record, `ftsam defend` (a subprocess: the real CLI and result files) with the packaged CIFAR-10
     config (lr 0.01, batch 256, 100 epochs, rho 2, ASAM, label smoothing 0.1), the same class-balanced 5% clean
     subset and seed for every defense: ft-baseline, then ftsam; results moved to <cache>/runs/<record>/<tag>/;
     an interrupted defense resumes from its checkpoint;
  4. a rho sweep of FT-SAM (--sweep_rhos, --sweep_epochs);
  5. a profile of one FT-SAM epoch (and one FT epoch) with manual timers: data loading, forward/backward,
     SAM/optimizer steps, evaluation;
  6. benchmarks/results/defense_cpu.md (+ defense_cpu.png), rewritten after every finished step.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg.tar.xz")
ATTACKS = ("badnet", "blended")
STALE_S = 3 * 3600  # an unfinished record untouched this long is reported as dead (never deleted)


@dataclass
class Mode:
    name: str
    attack_epochs: int
    defense_epochs: int
    eval_every: int
    sweep_rhos: Tuple[float, ...]
    sweep_epochs: int
    train_per_class: Optional[int] = None  # None: the whole data set
    test_per_class: Optional[int] = None
    profile_batches: Optional[int] = None  # None: one whole epoch
    rho: float = 2.0
    width: float = 0.25
    ratio: float = 0.05
    seed: int = 0
    notes: Tuple[str, ...] = ()


MODES = {
    "full": Mode("full", attack_epochs=15, defense_epochs=100, eval_every=5, sweep_rhos=(1.0, 2.0, 4.0, 8.0),
                 sweep_epochs=20,
                 notes=("Attack records: two `ftsam attack` processes at once, one thread each "
                        "(OMP_NUM_THREADS=1, nice 10); 15 epochs to fit the time available on a shared 2-core machine "
                        "(first attempt at 20 epochs was killed after 2 epochs).",
                        "Epoch times were measured while other jobs shared the 2 cores; the FT-SAM/FT ratio is the "
                        "robust number, the absolute seconds are not. The profile table times one epoch in-process "
                        "after one untimed warm-up step.",
                        "DER uses the backdoored model's numbers from the record's attack_df.csv (its last epoch).")),
    "quick": Mode("quick", attack_epochs=2, defense_epochs=3, eval_every=2, sweep_rhos=(1.0, 8.0), sweep_epochs=1,
                  train_per_class=100, test_per_class=30, profile_batches=2),
}


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ data, records


def unpack(cache: str) -> str:
    dest = os.path.join(cache, "cifar10-jpeg")
    if os.path.isdir(os.path.join(dest, "test", "truck")) and os.path.isdir(os.path.join(dest, "train", "truck")):
        return dest
    if not os.path.isfile(ARCHIVE):
        sys.exit(f"error: {ARCHIVE} not found; the benchmark needs ../shared/data/cifar10-jpeg.tar.xz")
    log(f"unpacking {ARCHIVE} into {cache}")
    os.makedirs(cache, exist_ok=True)
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(cache, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(cache)
    return dest


def quick_subset(full: str, cache: str, train_per_class: int, test_per_class: int) -> str:
    """The first N images (sorted names) of each class, copied to an image folder."""
    dest = os.path.join(cache, f"cifar10-jpeg-{train_per_class}-{test_per_class}")
    if os.path.isfile(os.path.join(dest, ".complete")):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for cls in sorted(os.listdir(os.path.join(full, split))):
            os.makedirs(os.path.join(dest, split, cls))
            for name in sorted(os.listdir(os.path.join(full, split, cls)))[:n]:
                shutil.copyfile(os.path.join(full, split, cls, name), os.path.join(dest, split, cls, name))
    open(os.path.join(dest, ".complete"), "w").close()
    return dest


def record_name(mode: Mode, attack: str) -> str:
    prefix = "quick_" if mode.name == "quick" else ""
    return f"{prefix}cifar10_preactresnet18_w{mode.width:g}_{attack}_e{mode.attack_epochs}"


def ensure_record(mode: Mode, attack: str, data: str, cache: str) -> str:
    root = os.path.join(cache, "record")
    name = record_name(mode, attack)
    record = os.path.join(root, name)
    waited = 0
    while os.path.isdir(record) and not os.path.isfile(os.path.join(record, "attack_result.pt")):
        files = glob.glob(os.path.join(record, "*"))
        age = time.time() - max(os.path.getmtime(f) for f in files) if files else STALE_S + 1
        if age > STALE_S:
            sys.exit(f"error: {record} is unfinished and untouched for {age / 60:.0f} min; delete it to train again")
        if waited % 600 == 0:
            done = len(read_rows(os.path.join(record, "attack_df.csv"))) if os.path.isfile(
                os.path.join(record, "attack_df.csv")) else 0
            log(f"{record} is being trained by another process ({done}/{mode.attack_epochs} epochs); waiting")
        time.sleep(60)
        waited += 60
    if os.path.isfile(os.path.join(record, "attack_result.pt")):
        return record
    cmd = [sys.executable, "-m", "ftsam_plugin", "attack", "--attack", attack, "--dataset", "cifar10",
           "--dataset_path", data, "--model", "preactresnet18", "--width", f"{mode.width:g}",
           "--epochs", str(mode.attack_epochs), "--batch_size", "128", "--pratio", "0.1", "--attack_target", "0",
           "--num_workers", "0", "--random_seed", str(mode.seed), "--device", "cpu", "--progress", "False",
           "--save_folder_name", name, "--record_root", root]
    run_logged(cmd, os.path.join(cache, "logs", f"attack_{name}.log"))
    return record


def run_logged(cmd: List[str], log_path: str) -> float:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log("$ " + " ".join(cmd) + f"   (log: {log_path})")
    start = time.perf_counter()
    with open(log_path, "a") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        sys.exit(f"error: command failed with exit code {code}; see {log_path}")
    return time.perf_counter() - start


def read_rows(path: str) -> List[dict]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        out.append({k: (float(v) if v not in ("", None, "None", "nan_value") and _isnum(v) else None)
                    for k, v in row.items() if k})
    return out


def _isnum(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ defenses


def defense_argv(mode: Mode, defense: str, record: str, epochs: int, rho: Optional[float]) -> List[str]:
    argv = ["defend", "--defense", defense, "--result_file", record, "--yaml_path", "cifar10",
            "--device", "cpu", "--num_workers", "0", "--pin_memory", "false", "--non_blocking", "false",
            "--ratio", f"{mode.ratio:g}", "--random_seed", str(mode.seed), "--epochs", str(epochs),
            "--eval_every", str(mode.eval_every)]
    if rho is not None:
        argv += ["--rho", f"{rho:g}"]
    return argv


def run_defense(mode: Mode, record: str, cache: str, defense: str, tag: str, epochs: int,
                rho: Optional[float]) -> str:
    """`ftsam defend` into <record>/defense/<name>/, then moved to <cache>/runs/<record>/<tag>/ (skip if there)."""
    dest = os.path.join(cache, "runs", os.path.basename(record), tag)
    if os.path.isfile(os.path.join(dest, "run.json")):
        return dest
    name = "ftsam" if defense == "ftsam" else "ft-baseline"
    work = os.path.join(record, "defense", name)
    tag_file = os.path.join(work, "bench_tag.txt")
    argv = defense_argv(mode, defense, record, epochs, rho)
    resume = (os.path.isfile(os.path.join(work, "checkpoint", "last.pt")) and os.path.isfile(tag_file)
              and open(tag_file).read().strip() == tag)
    if os.path.isdir(work) and not resume:
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    with open(tag_file, "w") as handle:
        handle.write(tag + "\n")
    cmd = [sys.executable, "-m", "ftsam_plugin", *argv] + (["--resume", "true"] if resume else [])
    wall = run_logged(cmd, os.path.join(cache, "logs", f"{os.path.basename(record)}_{tag}.log"))
    info = {"tag": tag, "defense": defense, "rho": rho, "epochs": epochs, "command": "ftsam " + " ".join(argv),
            "resumed": resume, "wall_s": wall, "finished": datetime.now().isoformat(timespec="seconds")}
    with open(os.path.join(work, "run.json"), "w") as handle:
        json.dump(info, handle, indent=1)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    shutil.move(work, dest)
    return dest


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d) \[INFO\s*\] \[\S+\] epoch (\d+): (.*)$")
START_LINE = re.compile(r"^(\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d) \[INFO\s*\] \[\S+\] clean subset: .* from epoch (\d+)")


def epoch_times(run_dir: str) -> Dict[str, Optional[float]]:
    """Mean wall seconds per epoch from the defense log's per-epoch lines (1 s resolution, averaged):
    'train' over epochs without evaluation, 'eval' = extra seconds of an epoch with evaluation."""
    plain, evald = [], []
    for path in sorted(glob.glob(os.path.join(run_dir, "log", "*.log"))):
        prev = None
        with open(path) as handle:
            for line in handle:
                m = LOG_LINE.match(line.strip())
                start = START_LINE.match(line.strip()) if not m else None
                if start:  # the line just before the first epoch of a run (or a resumed run)
                    t = datetime.strptime(start.group(1), "%Y-%m-%d:%H:%M:%S").timestamp()
                    prev = (t, int(start.group(2)) - 1)
                    continue
                if not m:
                    continue
                t = datetime.strptime(m.group(1), "%Y-%m-%d:%H:%M:%S").timestamp()
                epoch = int(m.group(2))
                if prev is not None and prev[1] == epoch - 1:
                    (evald if "test_acc" in m.group(3) else plain).append(t - prev[0])
                prev = (t, epoch)
    train = sum(plain) / len(plain) if plain else None
    ev = (sum(evald) / len(evald) - train) if evald and train is not None else None
    return {"train": train, "eval": ev, "n": len(plain)}


def run_summary(run_dir: str, partial: bool = False) -> Optional[dict]:
    """A finished run (run.json there), or with `partial` one still in progress (None if nothing evaluated yet)."""
    name = "ftsam" if os.path.isfile(os.path.join(run_dir, "ftsam_df.csv")) else "ft-baseline"
    csv_path = os.path.join(run_dir, f"{name}_df.csv")
    if partial and not os.path.isfile(csv_path):
        return None
    rows = read_rows(csv_path)
    evals = [r for r in rows if r.get("test_acc") is not None]
    if not evals:
        return None
    info = {}
    if not partial:
        with open(os.path.join(run_dir, "run.json")) as handle:
            info = json.load(handle)
    index = os.path.join(run_dir, "log", "index.txt")
    return {"rows": rows, "evals": evals, "last": evals[-1], "info": info, "times": epoch_times(run_dir),
            "index": open(index).read() if os.path.isfile(index) else None, "partial": partial,
            "result": os.path.join(run_dir, "defense_result.pt")}


# ------------------------------------------------------------------------------------------------ profile


def profile_epoch(mode: Mode, record: str, cache: str) -> dict:
    """One FT-SAM epoch and one FT epoch on the record, in-process, timed by phase (cached as JSON)."""
    out = os.path.join(cache, "runs", os.path.basename(record), "profile.json")
    if os.path.isfile(out):
        with open(out) as handle:
            return json.load(handle)
    import torch
    from torch.utils.data import DataLoader

    from ftsam_plugin.defense import cli as defense_cli
    from ftsam_plugin.defense.ftsam import DEFENSES

    result = {"threads": torch.get_num_threads()}
    for defense in ("ftsam", "ft-baseline"):
        parser = defense_cli.add_arguments(argparse.ArgumentParser())
        argv = defense_argv(mode, defense, record, 1, mode.rho if defense == "ftsam" else None)[1:]
        opts = vars(parser.parse_args(argv))
        opts.pop("defense")
        work = os.path.join(cache, "profile_tmp")
        shutil.rmtree(work, ignore_errors=True)
        opts.update(checkpoint_save=os.path.join(work, "ckpt") + os.sep, log=os.path.join(work, "log") + os.sep)
        obj = DEFENSES[defense](argparse.Namespace(**opts))
        obj.set_devices()
        model = obj.result["model"]
        train_set = obj.build_train_set(obj.choose_subset())
        obj.setup_training(model)
        opt = obj.optimizer
        timers = {"data": 0.0, "first_step": 0.0, "second_step": 0.0, "step_total": 0.0}

        def timed(fn, key):
            def wrapper(*a, **kw):
                t = time.perf_counter()
                r = fn(*a, **kw)
                timers[key] += time.perf_counter() - t
                return r
            return wrapper

        if defense == "ftsam":
            opt.first_step = timed(opt.first_step, "first_step")
            opt.second_step = timed(opt.second_step, "second_step")
        else:
            opt.step = timed(opt.step, "second_step")
        gen = torch.Generator().manual_seed(mode.seed)
        loader = DataLoader(train_set, batch_size=obj.args.batch_size, shuffle=True, num_workers=0, generator=gen)
        model.train()
        warm = next(iter(loader))  # untimed warm-up step: lazy imports, allocator, first-call costs
        obj.train_step(model, warm[0], torch.as_tensor(warm[1]).long())
        for key in timers:
            timers[key] = 0.0
        it, n_batches, n_images = iter(loader), 0, 0
        t_epoch = time.perf_counter()
        while mode.profile_batches is None or n_batches < mode.profile_batches:
            t = time.perf_counter()
            try:
                x, y = next(it)[:2]
            except StopIteration:
                break
            timers["data"] += time.perf_counter() - t
            t = time.perf_counter()
            obj.train_step(model, x, torch.as_tensor(y).long())
            timers["step_total"] += time.perf_counter() - t
            n_batches += 1
            n_images += len(y)
        epoch_s = time.perf_counter() - t_epoch
        t = time.perf_counter()
        metrics = obj.evaluate(model)
        eval_s = time.perf_counter() - t
        fwd_bwd = timers["step_total"] - timers["first_step"] - timers["second_step"]
        result[defense] = {
            "batches": n_batches, "images": n_images, "batch_size": obj.args.batch_size, "epoch_s": epoch_s,
            "data_s": timers["data"], "forward_backward_s": fwd_bwd, "first_step_s": timers["first_step"],
            "second_step_s": timers["second_step"], "other_s": epoch_s - timers["data"] - timers["step_total"],
            "eval_s": eval_s, "eval_images": len(obj.result["clean_test"]) + len(obj.result["bd_test"]),
            "metrics_after": metrics,
        }
        shutil.rmtree(work, ignore_errors=True)
        log(f"profile {defense}: {result[defense]}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(result, handle, indent=1)
    return result


# ------------------------------------------------------------------------------------------------ report


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((l.split(":", 1)[1].strip() for l in handle if l.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}; load average at "
            f"report time {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (the machine was shared with other jobs)")


def commit() -> str:
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain"], cwd=REPO, text=True).strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def secs(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.1f}"


def write_report(mode: Mode, state: dict, path: str, command: str) -> None:
    from ftsam_plugin.metrics import der

    lines = [f"# FT vs FT-SAM on CPU ({mode.name} mode)", ""]
    if mode.name == "quick":
        lines += ["**Quick mode: a pipeline check on a tiny subset, not a result.**", ""]
    lines += [
        f"- Command: `{command}`{state.get('command_note', '')}",
        f"- Commit: {commit()}; written {datetime.now():%Y-%m-%d %H:%M}",
        f"- Machine: {machine()}",
        f"- Data: CIFAR-10 as JPEG q75 (`../shared/data/cifar10-jpeg.tar.xz`)"
        + (f", subset {mode.train_per_class}/{mode.test_per_class} images per class (train/test)"
           if mode.train_per_class else ", full 50,000 / 10,000"),
        f"- Attacks: `ftsam attack`, 10% poison, all-to-one target 0, PreAct-ResNet18 **width {mode.width:g}** "
        f"(the full-width model trains at ~50 img/s on this CPU, too slow here), {mode.attack_epochs} epochs, "
        f"batch 128, SGD lr 0.01 cosine.",
        f"- Defenses: `ftsam defend` with the packaged CIFAR-10 config (SGD lr 0.01 cosine, momentum 0.9, wd 5e-4, "
        f"batch 256, label smoothing 0.1; FT-SAM: ASAM eta 0, rho {mode.rho:g}), {mode.defense_epochs} epochs, "
        f"class-balanced {mode.ratio:g} clean subset, seed {mode.seed}, evaluation every {mode.eval_every} epochs "
        f"(and the last).",
        "- ACC/ASR/RA in %, DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 in %. Epoch time: mean wall seconds of a "
        "training epoch without evaluation (from the defense log's per-epoch timestamps, 1 s resolution, averaged), "
        "while other jobs shared the 2 cores.",
        "",
    ]
    for attack in ATTACKS:
        entry = state.get(attack)
        if not entry:
            lines += [f"## {attack}", "", "_record not finished yet_", ""]
            continue
        bd = entry["backdoored"]
        lines += [f"## {attack} (record `{entry['record_name']}`)", "",
                  "| defense | epochs | ACC | ASR | RA | DER | s/epoch | eval s | status |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| no defense | – | {pct(bd['test_acc'])} | {pct(bd['test_asr'])} | {pct(bd['test_ra'])} "
                  f"| – | – "
                  f"| – | attack trained {mode.attack_epochs} epochs |"]
        times = {}
        for label, key in (("FT", "ft"), (f"FT-SAM ρ={mode.rho:g}", "ftsam")):
            run = entry.get(key)
            if run is None:
                lines.append(f"| {label} | {mode.defense_epochs} | | | | | | | not run yet |")
                continue
            last = run["last"]
            d = der(bd["test_acc"], last["test_acc"], bd["test_asr"], last["test_asr"])
            times[key] = run["times"]["train"]
            status = "done"
            if run.get("partial"):
                status = (f"**unfinished**: {len(run['rows'])}/{mode.defense_epochs} epochs trained, metrics of "
                          f"epoch {int(last['epoch'])}")
            lines.append(f"| {label} | {int(last['epoch'])} | {pct(last['test_acc'])} | {pct(last['test_asr'])} | "
                         f"{pct(last['test_ra'])} | {pct(d)} | {secs(run['times']['train'])} | "
                         f"{secs(run['times']['eval'])} | {status} |")
        lines.append("")
        if times.get("ft") and times.get("ftsam"):
            lines += [f"FT-SAM / FT epoch time: **{times['ftsam'] / times['ft']:.2f}×**", ""]
        if entry.get("ft") and entry.get("ftsam"):
            same = entry["ft"]["index"] == entry["ftsam"]["index"] and entry["ft"]["index"] is not None
            n = len(entry["ft"]["index"].split()) if entry["ft"]["index"] else "?"
            lines += [f"Same clean subset for FT and FT-SAM: {'yes' if same else 'NO'} ({n} images).", ""]
        if entry.get("ftsam") and entry["ftsam"]["info"]:
            lines += [f"FT-SAM command: `{entry['ftsam']['info']['command']}`", ""]
        sweep = entry.get("sweep") or {}
        if sweep:
            lines += [f"ρ sweep (FT-SAM, {mode.sweep_epochs} epochs, otherwise the same):", "",
                      "| ρ | ACC | ASR | RA | DER | s/epoch |", "|---|---|---|---|---|---|"]
            for rho in sorted(sweep):
                last = sweep[rho]["last"]
                d = der(bd["test_acc"], last["test_acc"], bd["test_asr"], last["test_asr"])
                flag = f" (unfinished: epoch {int(last['epoch'])})" if sweep[rho].get("partial") else ""
                lines.append(f"| {rho:g}{flag} | {pct(last['test_acc'])} | {pct(last['test_asr'])} | "
                             f"{pct(last['test_ra'])} | {pct(d)} | {secs(sweep[rho]['times']['train'])} |")
        lines.append("")
    prof = state.get("profile")
    if prof:
        lines += [f"## Where one epoch's time goes (record `{prof['record']}`, "
                  f"{prof['data']['threads']} torch threads)",
                  "", "| phase | FT-SAM s | FT-SAM % | FT s | FT % |", "|---|---|---|---|---|"]
        a, b = prof["data"]["ftsam"], prof["data"]["ft-baseline"]
        rows = (("data loading (decode, augment, collate)", "data_s"),
                ("forward + backward (FT-SAM: both passes)", "forward_backward_s"),
                ("SAM first_step (grad norm, perturb)", "first_step_s"),
                ("SAM second_step / SGD step (restore, update)", "second_step_s"),
                ("other (loop overhead)", "other_s"))
        for label, key in rows:
            lines.append(f"| {label} | {a[key]:.3f} | {100 * a[key] / a['epoch_s']:.1f} | {b[key]:.3f} | "
                         f"{100 * b[key] / b['epoch_s']:.1f} |")
        lines.append(f"| **training epoch** ({a['images']} images, {a['batches']} batches) | {a['epoch_s']:.2f} "
                     f"| 100 | "
                     f"{b['epoch_s']:.2f} | 100 |")
        lines.append(f"| evaluation ({a['eval_images']} images: clean test + backdoor test) | {a['eval_s']:.2f} | | "
                     f"{b['eval_s']:.2f} | |")
        lines += ["", f"Profiled FT-SAM/FT epoch ratio: {a['epoch_s'] / b['epoch_s']:.2f}×.", ""]
    if state.get("plot"):
        lines += [f"![ACC and ASR per epoch]({os.path.basename(state['plot'])})", ""]
    checks = []
    for attack in ATTACKS:
        entry = state.get(attack) or {}
        if entry.get("ft") and entry.get("ftsam") and not (entry["ft"]["partial"] or entry["ftsam"]["partial"]):
            bd, ft, sam = entry["backdoored"], entry["ft"]["last"], entry["ftsam"]["last"]
            drop = 100 * (bd["test_acc"] - sam["test_acc"])
            checks += [
                f"{attack}: FT-SAM ASR ≤ 5%: **{'met' if sam['test_asr'] <= 0.05 else 'NOT met'}** "
                f"({pct(sam['test_asr'])}%); clean-accuracy drop ≤ 2 points: "
                f"**{'met' if drop <= 2 else 'NOT met'}** ({drop:.2f} points); FT leaves the backdoor "
                f"(ASR > 5%): {'yes' if ft['test_asr'] > 0.05 else 'no'} ({pct(ft['test_asr'])}%)",
            ]
            t_ft, t_sam = entry["ft"]["times"]["train"], entry["ftsam"]["times"]["train"]
            if t_ft and t_sam:
                verdict = "met" if t_sam / t_ft <= 2.0 else "NOT met"
                checks.append(f"{attack}: FT-SAM epoch time ≤ 2.0× FT's: **{verdict}** ({t_sam / t_ft:.2f}×)")
    if checks:
        lines += ["## Targets", ""] + [f"- {c}" for c in checks] + [""]
    notes = (state.get("notes") or []) + list(mode.notes)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write("\n".join(lines))
    os.replace(tmp, path)


def plot(state: dict, path: str) -> Optional[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [a for a in ATTACKS if state.get(a) and (state[a].get("ft") or state[a].get("ftsam"))]
    if not panels:
        return None
    fig = Figure(figsize=(6 * len(panels), 4))
    FigureCanvasAgg(fig)
    for k, attack in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for key, label, colour in (("ft", "FT", "tab:blue"), ("ftsam", "FT-SAM", "tab:red")):
            run = state[attack].get(key)
            if not run:
                continue
            ep = [r["epoch"] for r in run["evals"]]
            ax.plot(ep, [100 * r["test_asr"] for r in run["evals"]], "-o", ms=3, color=colour, label=f"{label} ASR")
            ax.plot(ep, [100 * r["test_acc"] for r in run["evals"]], "--", color=colour, label=f"{label} ACC")
        bd = state[attack]["backdoored"]
        ax.axhline(100 * bd["test_asr"], color="grey", lw=0.8, ls=":", label="backdoored ASR")
        ax.set_title(attack)
        ax.set_xlabel("defense epoch")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------------------------------------------ main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pipeline check on a data subset (< 10 min)")
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache"), help="cache folder")
    parser.add_argument("--out", help="results markdown (default benchmarks/results/defense_cpu[_quick].md)")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--attack_epochs", type=int)
    parser.add_argument("--defense_epochs", type=int)
    parser.add_argument("--eval_every", type=int)
    parser.add_argument("--sweep_rhos", type=float, nargs="*", help="FT-SAM rho sweep (empty: none)")
    parser.add_argument("--sweep_epochs", type=int)
    parser.add_argument("--skip", nargs="*", default=[], choices=("sweep", "profile"), help="stages to skip")
    parser.add_argument("--report_only", action="store_true", help="rewrite the report from the cache, run nothing")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    for key in ("attack_epochs", "defense_epochs", "eval_every", "sweep_epochs"):
        if getattr(args, key) is not None:
            setattr(mode, key, getattr(args, key))
    if args.sweep_rhos is not None:
        mode.sweep_rhos = tuple(args.sweep_rhos)
    cache = os.path.abspath(args.cache)
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"defense_cpu{'_quick' if args.quick else ''}.md")
    png = os.path.splitext(out)[0] + ".png"
    command = "python benchmarks/defense_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    command = command.strip()
    note = ""
    if args.report_only:
        command = command.replace(" --report_only", "")
        note = " (this file was regenerated from cached results with `--report_only`; unfinished rows are marked)"
    state: dict = {"notes": [], "command_note": note}

    def report():
        state["plot"] = plot(state, png)
        write_report(mode, state, out, command)

    data = unpack(cache)
    if mode.train_per_class:
        data = quick_subset(data, cache, mode.train_per_class, mode.test_per_class)
    records = {}

    def collect(attack: str, key: str, tag: str) -> Optional[dict]:
        run_dir = os.path.join(cache, "runs", os.path.basename(records[attack]), tag)
        if os.path.isfile(os.path.join(run_dir, "run.json")):
            return run_summary(run_dir)
        # still running (or interrupted): the defense's working folder, if it belongs to this tag
        name = "ftsam" if tag.startswith("ftsam") else "ft-baseline"
        work = os.path.join(records[attack], "defense", name)
        tag_file = os.path.join(work, "bench_tag.txt")
        if os.path.isfile(tag_file) and open(tag_file).read().strip() == tag:
            return run_summary(work, partial=True)
        return None

    main_tags = {"ft": ("ft-baseline", f"ft_e{mode.defense_epochs}", None),
                 "ftsam": ("ftsam", f"ftsam_rho{mode.rho:g}_e{mode.defense_epochs}", mode.rho)}
    for attack in args.attacks:  # record, then the main comparison on it, one attack at a time
        rec = os.path.join(cache, "record", record_name(mode, attack))
        if args.report_only and not os.path.isfile(os.path.join(rec, "attack_result.pt")):
            continue
        records[attack] = rec if args.report_only else ensure_record(mode, attack, data, cache)
        bd_rows = read_rows(os.path.join(records[attack], "attack_df.csv"))
        last = bd_rows[-1]
        state[attack] = {"record_name": os.path.basename(records[attack]), "backdoored": last}
        if not mode.train_per_class and (last["test_acc"] < 0.80 or last["test_asr"] < 0.90):
            state["notes"].append(f"{attack} record is below the target (ACC {pct(last['test_acc'])}, "
                                  f"ASR {pct(last['test_asr'])}; wanted ≥ 80 / ≥ 90)")
        log(f"{attack}: backdoored ACC {pct(last['test_acc'])} ASR {pct(last['test_asr'])} RA {pct(last['test_ra'])}")
        report()
        for key, (defense, tag, rho) in main_tags.items():
            if not args.report_only:
                run_defense(mode, records[attack], cache, defense, tag, mode.defense_epochs, rho)
            state[attack][key] = collect(attack, key, tag)
            if state[attack][key]:
                m = state[attack][key]["last"]
                log(f"{attack} {tag}: ACC {pct(m['test_acc'])} ASR {pct(m['test_asr'])} RA {pct(m['test_ra'])}")
            report()
    if "profile" not in args.skip and records:
        rec = records.get("blended") or next(iter(records.values()))
        prof_path = os.path.join(cache, "runs", os.path.basename(rec), "profile.json")
        if not args.report_only or os.path.isfile(prof_path):
            state["profile"] = {"record": os.path.basename(rec), "data": profile_epoch(mode, rec, cache)}
        report()
    if "sweep" not in args.skip:
        for rho in mode.sweep_rhos:
            for attack in records:
                if rho == mode.rho and mode.sweep_epochs == mode.defense_epochs:
                    run = state[attack].get("ftsam")
                else:
                    tag = f"ftsam_rho{rho:g}_e{mode.sweep_epochs}"
                    if not args.report_only:
                        run_defense(mode, records[attack], cache, "ftsam", tag, mode.sweep_epochs, rho)
                    run = collect(attack, "sweep", tag)
                if run:
                    state[attack].setdefault("sweep", {})[rho] = run
                report()
    report()
    log(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
