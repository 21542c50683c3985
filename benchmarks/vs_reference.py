"""Speed side by side: BackdoorBench's own defense/ft-sam.py vs our `ftsam --protocol backdoorbench`, on CPU.

    nice -n 10 .venv/bin/python benchmarks/vs_reference.py --bb /path/to/BackdoorBench   # or BACKDOORBENCH_ROOT

Steps (each cached under --cache, default benchmarks/.cache/vs_reference):
  1. a CIFAR-10 subset of ../shared/data/cifar10-jpeg.tar.xz (the first --train_per_class / --test_per_class
     images of each class) as an image folder (what we read), and the same images, decoded once by our loader in
     its order, as torchvision's cifar-10-batches-py pickles (what BackdoorBench's loader reads): index i is the
     same image on both sides;
  2. a full-width PreAct-ResNet18 BadNets record (`ftsam attack`, --attack_epochs; the full width is what
     BackdoorBench's script builds);
  3. --rounds rounds of: the reference, then ours under --protocol backdoorbench, alternating, each a fresh
     process with the same record, seed, --ratio, --epochs, batch 256, evaluation after every epoch (both sides'
     schedule); then our default protocol once. Every run times each training epoch and each evaluation
     separately (perf_counter around the epoch's training call and the evaluation call), and keeps the metrics;
  4. the last round's two runs under cProfile (training and evaluation profiled apart, both sides alike),
     summarised: where each side spends an epoch;
  5. benchmarks/results/vs_reference.json (settings, machine, every run's per-epoch times and metrics, the profile
     rows) and benchmarks/results/vs_reference.md generated from it, rewritten after every run; `--report_only`
     rewrites the report from the JSON alone.

The reference runs through `reference` below, in a subprocess with BackdoorBench's root on PYTHONPATH and that
root's data layout (record/ and data/ under the cache): it loads defense/ft-sam.py by path, turns off
torchvision's CIFAR-10 md5 check (the JPEG-derived pickles fail it, and its download=True would then go to the
network), wraps `_train_sam` and `eval_step` with timers, and makes the calls the script's __main__ block makes.
The algorithm is untouched; none of its code is copied here.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import os
import pickle
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from typing import Dict, List, Optional

from defense_cpu import log, quick_subset, unpack  # same folder: run as a script, benchmarks/ is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from ftsam_plugin.provenance import git_commit, machine, machine_short  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results", "vs_reference.md")
DATA = os.path.join(REPO, "benchmarks", "results", "vs_reference.json")
ARMS = ("reference", "ours-backdoorbench", "ours-default")


# ------------------------------------------------------------------------------------------------ timing in a run


class Timers:
    """perf_counter around named calls; optionally a cProfile per name; what the calls returned, kept."""

    def __init__(self, profile: bool):
        self.times: Dict[str, List[float]] = {"train": [], "eval": []}
        self.results: List[object] = []
        self.profiles = {name: cProfile.Profile() for name in self.times} if profile else {}

    def wrap(self, fn, name):
        def timed(*args, **kwargs):
            prof = self.profiles.get(name)
            if prof:
                prof.enable()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.times[name].append(time.perf_counter() - start)
            if prof:
                prof.disable()
            if name == "eval":
                self.results.append(out)
            return out
        return timed

    def dump(self, out: str, metrics: List[dict]) -> None:
        for name, prof in self.profiles.items():
            prof.dump_stats(f"{out}.{name}.prof")
        with open(out, "w") as handle:
            json.dump({"times": self.times, "metrics": metrics}, handle)


def reference(opts, argv) -> None:
    """BackdoorBench's defense/ft-sam.py, as its __main__ runs it, with timers (cwd: the folder holding record/)."""
    import torchvision.datasets.cifar as tv_cifar

    tv_cifar.check_integrity = lambda *a, **k: True  # the JPEG-derived pickles are not the md5-listed files
    tv_cifar.CIFAR10._check_integrity = lambda self: True
    spec = importlib.util.spec_from_file_location("bb_ft_sam", os.path.join(opts.bb, "defense", "ft-sam.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    timers = Timers(opts.profile)
    module.dsam._train_sam = timers.wrap(module.dsam._train_sam, "train")
    module.dsam.eval_step = timers.wrap(module.dsam.eval_step, "eval")
    parser = argparse.ArgumentParser()
    module.dsam.add_arguments(parser)
    args = module.args = parser.parse_args(argv)  # its __main__ binds the module-global `args` train_sam reads
    module.dsam(args).defense(args.result_file)
    names = ("clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch", "ra_test_loss_avg_over_batch",
             "test_acc", "test_asr", "test_ra")
    timers.dump(opts.out, [dict(zip(names, r)) for r in timers.results])


def ours(opts, argv) -> None:
    """`ftsam defend` in-process, with the same timers around FineTune.train_epoch and FineTune.evaluate."""
    from ftsam_plugin.defense.cli import main
    from ftsam_plugin.defense.finetune import FineTune

    timers = Timers(opts.profile)
    FineTune.train_epoch = timers.wrap(FineTune.train_epoch, "train")
    FineTune.evaluate = timers.wrap(FineTune.evaluate, "eval")
    code = main(argv)
    if code:
        sys.exit(code)
    timers.dump(opts.out, timers.results)


# ------------------------------------------------------------------------------------------------ data and record


def cifar_pickles(folder: str, dest: str) -> None:
    """torchvision's cifar-10-batches-py from the image folder, in our loader's order, each image decoded once."""
    import numpy as np

    from ftsam_plugin.data.datasets import build_clean_datasets

    if os.path.isfile(os.path.join(dest, "batches.meta")):
        return
    train, test = build_clean_datasets("cifar10", folder)
    os.makedirs(dest + ".tmp", exist_ok=True)

    def dump(name, items):
        data = np.stack([np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).reshape(-1) for img, _ in items])
        with open(os.path.join(dest + ".tmp", name), "wb") as handle:
            pickle.dump({"data": data, "labels": [int(y) for _, y in items]}, handle)

    items = [train[i] for i in range(len(train))]
    for k, chunk in enumerate(np.array_split(np.arange(len(items)), 5), start=1):
        dump(f"data_batch_{k}", [items[i] for i in chunk])
    dump("test_batch", [test[i] for i in range(len(test))])
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(dest + ".tmp", "batches.meta"), "wb") as handle:
        pickle.dump({"label_names": names}, handle)
    os.replace(dest + ".tmp", dest)


def prepare(opts) -> str:
    """The record (name) under <cache>/record, its data under <cache>/data (pickles) and <cache>/jpeg (images)."""
    cache = opts.cache
    subset = quick_subset(unpack(cache), cache, opts.train_per_class, opts.test_per_class)
    for top in ("data", "jpeg"):
        folder = os.path.join(cache, top, "cifar10")
        os.makedirs(folder, exist_ok=True)
        for split in ("train", "test"):
            link = os.path.join(folder, split)
            if not os.path.islink(link):
                os.symlink(os.path.join(subset, split), link)
    name = f"vsref_cifar10_{opts.train_per_class}_preactresnet18_badnet_e{opts.attack_epochs}"
    record = os.path.join(cache, "record", name)
    if not os.path.isfile(os.path.join(record, "attack_result.pt")):
        shutil.rmtree(record, ignore_errors=True)
        # before the pickles exist: our loader would take the torchvision layout, whose md5 check refuses them
        shutil.rmtree(os.path.join(cache, "data", "cifar10", "cifar-10-batches-py"), ignore_errors=True)
        log(f"attack: {name}")
        run_logged([sys.executable, "-m", "ftsam_plugin", "attack", "--attack", "badnet", "--dataset", "cifar10",
                    "--dataset_path", os.path.join(cache, "data"), "--model", "preactresnet18", "--width", "1",
                    "--epochs", str(opts.attack_epochs), "--batch_size", "128", "--device", "cpu",
                    "--num_workers", "0", "--record_root", os.path.join(cache, "record"), "--save_folder_name", name,
                    "--progress", "False"], os.path.join(cache, f"{name}.attack.log"), cwd=REPO)
    cifar_pickles(os.path.join(cache, "jpeg", "cifar10"), os.path.join(cache, "data", "cifar10",
                                                                       "cifar-10-batches-py"))
    return name


def run_logged(cmd, log_path, cwd, env=None) -> float:
    start = time.perf_counter()
    with open(log_path, "w") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if code:
        with open(log_path) as handle:
            tail = handle.read()[-3000:]
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited {code}; log {log_path}:\n{tail}")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ the runs


def common(opts, epochs) -> List[str]:
    return ["--device", "cpu", "--epochs", str(epochs), "--ratio", str(opts.ratio), "--random_seed", str(opts.seed),
            "--num_workers", "0", "--batch_size", str(opts.batch_size)]


def run_arm(opts, arm: str, name: str, tag: str, epochs: int, profile: bool) -> dict:
    """One defense run in a fresh process; its timings, metrics, clean subset and wall time."""
    cache = opts.cache
    run_dir = os.path.join(cache, "runs", tag)
    os.makedirs(run_dir, exist_ok=True)
    out = os.path.join(run_dir, "times.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), PYTHONWARNINGS="ignore")
    me = [sys.executable, os.path.abspath(__file__)]
    flags = ["--bb", opts.bb, "--out", out] + (["--profile"] if profile else [])
    if arm == "reference":
        folder = os.path.join(cache, "record", name, "defense", "ft-sam")
        argv = ["--yaml_path", os.path.join(opts.bb, "config", "defense", "ft-sam", "cifar10.yaml"),
                "--result_file", name, "--dataset", "cifar10", "--dataset_path", "./data", "--pin_memory", "False",
                "--non_blocking", "False", *common(opts, epochs)]
        env.update(PYTHONPATH=os.pathsep.join([opts.bb, REPO]), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
        cmd = me + ["_reference"] + flags + ["--"] + argv
    else:
        folder = os.path.join(cache, "record", name, "defense", "ftsam")
        argv = ["--defense", "ftsam", "--result_file", os.path.join(cache, "record", name), "--yaml_path",
                "cifar10", "--dataset_path", os.path.join(cache, "jpeg"), "--pin_memory", "false",
                "--non_blocking", "false", "--eval_every", "1", *common(opts, epochs)]
        if arm == "ours-backdoorbench":
            argv += ["--protocol", "backdoorbench"]
        env.update(PYTHONPATH=REPO)
        cmd = me + ["_ours"] + flags + ["--"] + argv
    shutil.rmtree(folder, ignore_errors=True)
    log(f"{tag}: {arm}, {epochs} epochs{' (profiled)' if profile else ''}")
    wall = run_logged(cmd, os.path.join(run_dir, "run.log"), cwd=cache, env=env)
    with open(out) as handle:
        got = json.load(handle)
    with open(os.path.join(folder, "log", "index.txt")) as handle:
        got["index"] = [int(v) for v in handle.read().split()]
    got.update(arm=arm, wall=wall, epochs=epochs, profile=profile, tag=tag, cmd=" ".join(cmd[2:]))
    with open(os.path.join(run_dir, "summary.json"), "w") as handle:
        json.dump(got, handle)
    return got


# ------------------------------------------------------------------------------------------------ report


def mean(values):
    return statistics.fmean(values) if values else float("nan")


def profile_rows(prefix: str) -> List[tuple]:
    """(phase, what, seconds) from a run's cProfile dumps: the phase total and its main parts."""
    parts = {
        "train": [("data loading (DataLoader __next__)", ("dataloader.py", "__next__")),
                  ("backward (Tensor.backward)", ("_tensor.py", "backward")),
                  ("SGD base step", ("sgd.py", "step")),
                  ("reference SAM: perturb_weights", ("sam.py", "perturb_weights")),
                  ("reference SAM: unperturb", ("sam.py", "unperturb")),
                  ("reference SAM: gradient_decompose (alpha 0)", ("sam.py", "gradient_decompose")),
                  ("our SAM: first_step", ("sam.py", "first_step")),
                  ("our SAM: second_step (restore + base step)", ("sam.py", "second_step")),
                  ("logging (reference: one line per step)", ("__init__.py", "info"))],
        "eval": [("data loading (DataLoader __next__)", ("dataloader.py", "__next__"))],
    }
    rows = []
    for phase, wanted in parts.items():
        path = f"{prefix}.{phase}.prof"
        if not os.path.isfile(path):
            continue
        stats = pstats.Stats(path).stats
        total = sum(tt for (_, _, _), (_, _, tt, _, _) in stats.items())
        rows.append((phase, "total (profiled)", total))
        forward = max((ct for (f, _, fn), (_, _, _, ct, _) in stats.items()
                       if f.endswith("preact_resnet.py") and fn == "forward"), default=0.0)
        rows.append((phase, "model forward (PreActResNet18.forward)", forward))
        for label, (file_end, fn_name) in wanted:
            ct = sum(ct for (f, _, fn), (_, _, _, ct, _) in stats.items() if f.endswith(file_end) and fn == fn_name)
            if ct > 0:
                rows.append((phase, label, ct))
    return rows


def eval_images(test_per_class: int) -> Dict[str, int]:
    """Test images one evaluation passes over: the reference runs clean, poisoned and RA test sets apart (10 + 9 + 9
    images per --test_per_class), ours clean and poisoned once, reading ASR and RA off the same pass (10 + 9)."""
    return {"reference": 28 * test_per_class, "ours-backdoorbench": 19 * test_per_class,
            "ours-default": 19 * test_per_class}


def run_summary(r: dict) -> dict:
    """One run's row of the report from its raw per-epoch times and metrics: epoch 1 apart (first-call costs), the
    mean of epochs 2.. (of all epochs when there is one), the process wall time, the last evaluation."""
    tr, ev = r["times"]["train"], r["times"]["eval"]
    last = r["metrics"][-1]
    return {"tag": r["tag"], "arm": r["arm"], "profile": r["profile"], "epochs": len(tr),
            "train_rest": mean(tr[1:] or tr), "eval_rest": mean(ev[1:] or ev),
            "train_eval_rest": mean(tr[1:] or tr) + mean(ev[1:] or ev), "train_first": tr[0],
            "eval_first": ev[0], "wall": r["wall"], "final": {k: last[k] for k in ("test_acc", "test_asr", "test_ra")},
            "times": r["times"], "subset_size": len(r["index"]), "cmd": r["cmd"]}


def derive(rows: List[dict]) -> dict:
    """Per arm: the mean train and eval seconds per epoch (2..) over its runs' epochs, and the final ACC/ASR of each."""
    arms: Dict[str, dict] = {}
    for r in rows:
        a = arms.setdefault(r["arm"], {"train": [], "eval": [], "acc": [], "asr": []})
        n = max(r["epochs"] - 1, 1)  # the epochs each run's mean is over
        a["train"] += [r["train_rest"]] * n
        a["eval"] += [r["eval_rest"]] * n
        a["acc"].append(r["final"]["test_acc"])
        a["asr"].append(r["final"]["test_asr"])
    return {arm: {"train": mean(a["train"]), "eval": mean(a["eval"]), "train_eval": mean(a["train"]) + mean(a["eval"]),
                  "acc": a["acc"], "asr": a["asr"]} for arm, a in arms.items()}


def ratios(arms: dict, images: Dict[str, int]) -> Optional[dict]:
    """Reference / ours (--protocol backdoorbench): training, evaluation, whole epoch, as run and per image."""
    ref, mine = arms.get("reference"), arms.get("ours-backdoorbench")
    if not (ref and mine):
        return None
    r_tr, r_ev, o_tr, o_ev = ref["train"], ref["eval"], mine["train"], mine["eval"]
    n_ref, n_ours = images["reference"], images["ours-backdoorbench"]
    return {"train": r_tr / o_tr, "eval": r_ev / o_ev, "epoch": (r_tr + r_ev) / (o_tr + o_ev),
            "eval_per_image": (r_ev / n_ref) / (o_ev / n_ours),
            "epoch_equal_work": (r_tr + r_ev * n_ours / n_ref) / (o_tr + o_ev)}


def measured_data(opts, name: str, runs: List[dict]) -> dict:
    """The data file of a run of this script: settings, machine, each run's raw times and its row, the profile."""
    rows = [run_summary(r) for r in runs]
    subsets = {r["arm"]: r["index"] for r in runs}
    profile = [{"arm": r["arm"], "phase": ph, "what": what, "s": sec} for r in runs if r["profile"]
               for ph, what, sec in profile_rows(os.path.join(opts.cache, "runs", r["tag"], "times.json"))]
    return {"source": "measured by benchmarks/vs_reference.py", "when": f"{datetime.now():%Y-%m-%d %H:%M}",
            "commit": git_commit(REPO), "machine": machine(opts.threads),
            "machine_text": f"{machine_short(opts.threads)}, nice {os.nice(0)}; other jobs may share the cores "
                            "(absolute seconds are noisy, the alternating order keeps the comparison fair)",
            "record": name, "settings": {k: getattr(opts, k) for k in SETTINGS}, "runs": rows,
            "subset_identical": (subsets["reference"] == subsets["ours-backdoorbench"]
                                 if "reference" in subsets and "ours-backdoorbench" in subsets else None),
            "profile": profile, "notes": opts.notes or "(filled in by hand after the run)"}


SETTINGS = ("train_per_class", "test_per_class", "attack_epochs", "epochs", "rounds", "ratio", "batch_size", "seed",
            "threads")


def render(data: dict) -> str:
    """The report, from the data file alone. A recovered session carries the per-arm means and ratios as its report
    printed them (computed then from unrounded times); a measured one has them computed here from its runs."""
    st = data["settings"]
    rows = data["runs"]
    images = eval_images(st["test_per_class"])
    clean = rows[0]["subset_size"] if rows else round(st["ratio"] * 10 * st["train_per_class"])
    steps = -(-clean // st["batch_size"])
    arms = data.get("recovered_arms") or derive(rows)
    rat = data.get("recovered_ratios") or ratios(arms, images)
    lines = [
        "# FT-SAM vs BackdoorBench's own defense/ft-sam.py on CPU", "",
        f"Generated by `benchmarks/vs_reference.py --report_only` from [`vs_reference.json`](vs_reference.json). "
        f"Source: {data['source']}. Measured {data['when']} at commit {data['commit']}; machine: "
        f"{data['machine_text']}.", "",
        "## What was run", "",
        f"- Data: real CIFAR-10 (../shared JPEG copy), the first {st['train_per_class']} train and "
        f"{st['test_per_class']} test images of each class ({10 * st['train_per_class']} / {10 * st['test_per_class']}).",
        f"- Record `{data['record']}`: `ftsam attack` BadNets (10% poison, target 0), full-width PreAct-ResNet18, "
        f"{st['attack_epochs']} epoch(s), batch 128.",
        f"- Defense: {st['epochs']} epochs, clean ratio {st['ratio']} (class-balanced choose_by_class draw, seed "
        f"{st['seed']}; {clean} images, {steps} optimizer steps per epoch), batch {st['batch_size']}, lr 0.01, ASAM "
        f"rho 2, label smoothing 0.1, evaluation after every epoch on both sides, num_workers 0. {st['rounds']} rounds "
        "alternating reference / ours; each run a fresh process.",
        "- Reference: BackdoorBench `defense/ft-sam.py` (main @ f02e353) with its `config/defense/ft-sam/cifar10.yaml`, "
        "run by this script's `_reference` wrapper (md5 check off, timers on; algorithm untouched).",
        "- Ours: `ftsam defend --defense ftsam --protocol backdoorbench --yaml_path cifar10 --eval_every 1` "
        "(and once with our default protocol, `fixed`).", "",
        "Commands (as run, relative to the cache folder):", ""]
    for arm in ARMS:
        first = next((r for r in rows if r["arm"] == arm and r.get("cmd")), None)
        if first:
            lines.append(f"- {arm}: `python benchmarks/vs_reference.py {first['cmd']}`")
    lines += ["", "## Per epoch (seconds; epoch 1 is shown apart: it includes first-call costs)", "",
              "| run | epochs | train s/epoch (2..) | eval s/epoch (2..) | train+eval s/epoch (2..) | epoch 1 train / eval "
              "| process wall s | final ACC | final ASR | final RA |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["final"]
        lines.append(f"| {r['tag']} ({r['arm']}{', profiled' if r['profile'] else ''}) | {r['epochs']} | "
                     f"{r['train_rest']:.1f} | {r['eval_rest']:.1f} | {r['train_eval_rest']:.1f} | "
                     f"{r['train_first']:.1f} / {r['eval_first']:.1f} | {r['wall']:.0f} | {f['test_acc']:.4f} | "
                     f"{f['test_asr']:.4f} | {f['test_ra']:.4f} |")
    lines += ["", "## Side by side (means over all timed runs, epochs 2..)", "",
              "| | train s/epoch | eval s/epoch | train+eval s/epoch | final ACC (runs) | final ASR (runs) |",
              "|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        lines.append(f"| {arm} | {a['train']:.1f} | {a['eval']:.1f} | {a['train_eval']:.1f} | "
                     f"{', '.join(f'{v:.4f}' for v in a['acc'])} | {', '.join(f'{v:.4f}' for v in a['asr'])} |")
    if rat:
        lines += ["", f"Reference / ours (--protocol backdoorbench): training {rat['train']:.2f}x, evaluation "
                      f"{rat['eval']:.2f}x, whole epoch {rat['epoch']:.2f}x (target: >= 1.5x for the whole epoch).",
                  "", f"The two sides do not evaluate the same work: the reference passes over "
                      f"{images['reference']} test images per evaluation, ours over {images['ours-backdoorbench']}. "
                      f"Per image evaluated: evaluation {rat['eval_per_image']:.2f}x; whole epoch with the reference's "
                      f"evaluation scaled to our {images['ours-backdoorbench']} images {rat['epoch_equal_work']:.2f}x."]
    if data.get("subset_identical") is not None:
        lines += ["", f"Clean subset: reference `log/index.txt` and ours "
                      f"{'identical' if data['subset_identical'] else 'DIFFERENT'} ({clean} indices)."]
    if data.get("profile"):
        lines += ["", "## Profile (cProfile over a whole run, all its epochs; training and evaluation profiled "
                      "separately; cumulative seconds, nested parts overlap)", "", "| run | phase | what | s |",
                  "|---|---|---|---|"]
        lines += [f"| {p['arm']} | {p['phase']} | {p['what']} | {p['s']:.1f} |" for p in data["profile"]]
    lines += ["", "## Reading it", "", data["notes"], ""]
    return "\n".join(lines)


def write_outputs(data: dict, data_path: str, report_path: str) -> None:
    with open(data_path + ".tmp", "w") as handle:
        json.dump(data, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    os.replace(data_path + ".tmp", data_path)
    write_report(data, report_path)


def write_report(data: dict, report_path: str) -> None:
    os.makedirs(os.path.dirname(report_path), exist_ok=True)
    with open(report_path + ".tmp", "w") as handle:
        handle.write(render(data))
    os.replace(report_path + ".tmp", report_path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_reference", "_ours"):  # a child run (see run_arm)
        inner = argparse.ArgumentParser()
        inner.add_argument("--bb")
        inner.add_argument("--out", required=True)
        inner.add_argument("--profile", action="store_true")
        split = argv.index("--")
        opts = inner.parse_args(argv[1:split])
        (reference if argv[0] == "_reference" else ours)(opts, argv[split + 1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bb", default=os.environ.get("BACKDOORBENCH_ROOT"), help="BackdoorBench checkout")
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache", "vs_reference"))
    parser.add_argument("--train_per_class", type=int, default=500)
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--attack_epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--batch_size", type=int, default=256,
                        help="training (and the reference's evaluation) batch on both sides; the YAML's is 256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no_profile", action="store_true")
    parser.add_argument("--notes", help="a paragraph for the report's last section")
    parser.add_argument("--report_only", action="store_true",
                        help=f"rewrite the report from its data file ({os.path.relpath(DATA, REPO)}), no runs")
    opts = parser.parse_args(argv)
    if opts.report_only:
        with open(DATA) as handle:
            write_report(json.load(handle), RESULTS)
        log(f"wrote {RESULTS}")
        return 0
    if not opts.bb or not os.path.isfile(os.path.join(opts.bb, "defense", "ft-sam.py")):
        print("error: no BackdoorBench checkout; pass --bb <root> or set BACKDOORBENCH_ROOT", file=sys.stderr)
        return 2
    opts.bb, opts.cache = os.path.abspath(opts.bb), os.path.abspath(opts.cache)
    for word in ("record", "data"):  # BackdoorBench cuts paths at these words
        if word in opts.cache:
            print(f"error: --cache {opts.cache} contains '{word}'; BackdoorBench's loader cuts paths at that word",
                  file=sys.stderr)
            return 2
    name = prepare(opts)
    runs: List[dict] = []
    for k in range(1, opts.rounds + 1):
        for arm in ARMS[:2]:
            profile = k == opts.rounds and not opts.no_profile
            runs.append(run_arm(opts, arm, name, f"r{k}-{arm}", opts.epochs, profile=profile))
            write_outputs(measured_data(opts, name, runs), DATA, RESULTS)
    runs.append(run_arm(opts, "ours-default", name, "ours-default", opts.epochs, profile=False))
    write_outputs(measured_data(opts, name, runs), DATA, RESULTS)
    log(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
