"""Cost of the pre-flight image check against one defense epoch, on the CPU benchmark's record.

    python benchmarks/bench_image_check.py --record benchmarks/.cache/record/cifar10_preactresnet18_w0.25_blended_e15 \
        --dataset_path benchmarks/.cache/cifar10-jpeg --reps 3 --out benchmarks/results/image_check.md

The record and the data are only read: the defense's outputs go to a temporary folder of symlinks to the record's
files (as the CPU benchmark's per-run folders). In one process, alternating, `--reps` times each: the check of
every file a defense run reads (`check_record_images`: the record's poisoned images, the clean test set, the clean
subset), and one FT-SAM epoch and one FT epoch (training over the subset, then the evaluation that the packaged
CIFAR-10 config runs after every epoch), timed by phase. Medians are reported. Building the defenses already ran
the check once (as every run does), so the timed checks read from a warm page cache, as the epochs do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from ftsam_plugin.provenance import machine_short  # noqa: E402


def symlinked_record(record: str, work: str) -> str:
    run = os.path.join(work, "rec")
    os.makedirs(run)
    for name in os.listdir(record):
        if name != "defense":
            os.symlink(os.path.join(os.path.abspath(record), name), os.path.join(run, name))
    return run


def defense_for(name: str, record: str, dataset_path: str):
    from ftsam_plugin.defense import cli as defense_cli
    from ftsam_plugin.defense.registry import DEFENSES

    parser = defense_cli.add_arguments(argparse.ArgumentParser())
    opts = vars(parser.parse_args(["--result_file", record, "--yaml_path", "cifar10", "--device", "cpu",
                                   "--num_workers", "0", "--dataset_path", dataset_path, "--epochs", "1"]))
    opts.pop("defense")
    obj = DEFENSES[name](argparse.Namespace(**opts))
    obj.set_devices()
    obj.setup_training(obj.result["model"])
    return obj


def timed(fn, *args) -> dict:
    """Wall seconds and this process's CPU seconds (user + system) of `fn(*args)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def time_epoch(obj) -> dict:
    model = obj.result["model"]
    train_set = obj.build_train_set(obj.choose_subset())
    return {"train": timed(obj.train_epoch, model, train_set, 1), "eval": timed(obj.evaluate, model)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", required=True)
    parser.add_argument("--dataset_path", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "image_check.md"))
    args = parser.parse_args()

    import torch

    from ftsam_plugin.data.image_check import check_record_images, clean_files, poisoned_files

    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench_image_check_")
    record = symlinked_record(args.record, work)
    defenses = {name: defense_for(name, record, args.dataset_path) for name in ("ftsam", "ft-baseline")}
    result = defenses["ftsam"].result
    subset = defenses["ftsam"].choose_subset()
    counts = {"poisoned": len(poisoned_files(result["bd_train"])) + len(poisoned_files(result["bd_test"])),
              "clean test": len(clean_files(result["clean_test"])), "clean subset": len(subset)}
    checks, epochs = [], {name: [] for name in defenses}
    for _ in range(args.reps):
        checks.append(timed(check_record_images, result, subset))
        for name, obj in defenses.items():
            epochs[name].append(time_epoch(obj))
    check = {k: statistics.median(c[k] for c in checks) for k in ("wall", "cpu")}
    lines = [
        "# Pre-flight image check vs one defense epoch",
        "",
        f"Command: `python benchmarks/bench_image_check.py --record {args.record} --dataset_path {args.dataset_path} "
        f"--reps {args.reps} --threads {args.threads}`  ",
        f"Commit: {_commit()}  ",
        f"Machine: {machine_short(args.threads)}, load average {' / '.join(f'{v:.1f}' for v in os.getloadavg())} at the end  ",
        f"Files checked: {sum(counts.values()):,} ({', '.join(f'{k} {v:,}' for k, v in counts.items())})",
        "",
        f"Check: median {check['wall']:.3f} s wall, {check['cpu']:.3f} s CPU "
        f"({check['wall'] / sum(counts.values()) * 1e6:.1f} µs wall per file); each (wall): "
        f"{', '.join('%.3f' % c['wall'] for c in checks)} s",
        "",
        "| defense | clock | train s | eval s | epoch s | check / train | check / epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in epochs.items():
        for clock in ("wall", "cpu"):
            train = statistics.median(r["train"][clock] for r in runs)
            evaluate = statistics.median(r["eval"][clock] for r in runs)
            lines.append(f"| {name} | {clock} | {train:.2f} | {evaluate:.2f} | {train + evaluate:.2f} | "
                         f"{100 * check[clock] / train:.1f}% | {100 * check[clock] / (train + evaluate):.1f}% |")
    lines += ["", "Epoch = training over the 5% subset (2,500 images, batch 256) + the evaluation the packaged "
              "CIFAR-10 config runs after every epoch (`eval_every: 1`); medians over the reps. CPU = this process's "
              "user + system seconds (`time.process_time`), which other jobs on the machine inflate far less than "
              "wall time."]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(text)
    print(text)
    shutil.rmtree(work)  # the symlinks and the outputs; never what they point to
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
