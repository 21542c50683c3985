"""How long `measure_pasr` (P-ASR and its control, in-process) takes on `ftsam demo`'s data, for the demo's budget.

    OMP_NUM_THREADS=1 python benchmarks/retune_demo_time.py --data <CIFAR-10 folder>   # -> results/retune_demo_time.md

Builds the demo's data (`select_data`: 500 train / 100 test images per class) and a demo record with the demo's
attack code (Blended, PreAct-ResNet18 width 0.25; --attack_epochs, default 1: the time of the retuning does not
depend on how well the model was trained), then times `measure_pasr(record model, record)` with the reference
settings (2% of the 5,000 train images = 100, 5 poisoned, 5 epochs; the attack is evaluated before and after, the
control after: 3 passes over the 1,000 + 900 test images), and with evaluate_before=False (2 passes: the demo knows
O-ASR already), --repeats times each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    from ftsam_plugin.data.records import load_attack_result
    from ftsam_plugin.demo import run_attack, select_data
    from ftsam_plugin.provenance import machine_short
    from ftsam_plugin.retune import measure_pasr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 folder, as `ftsam demo --data`")
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache", "retune_demo"))
    parser.add_argument("--attack_epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "retune_demo_time.md"))
    args = parser.parse_args(argv)

    data = select_data(args.data, os.path.join(args.cache, "data"), offline=True)
    record = os.path.join(args.cache, "record", "demo_blended")
    if not os.path.isfile(os.path.join(record, "attack_result.pt")):
        run_attack(data, os.path.join(args.cache, "record"), "demo_blended", "blended", args.attack_epochs, 0.25,
                   "cpu", 0, progress=False)
    loaded = load_attack_result(record)
    variants = (("measure_pasr(model, record)", True), ("measure_pasr(model, record, evaluate_before=False)", False))
    times = {call: [] for call, _ in variants}
    result = None
    for _ in range(args.repeats):
        for call, before in variants:
            start = time.perf_counter()
            out = measure_pasr(loaded["model"], loaded, device="cpu", evaluate_before=before)
            times[call].append(time.perf_counter() - start)
            result = out if before else result
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["# `measure_pasr` on the demo's data (CPU)", "",
             f"`OMP_NUM_THREADS=1 python benchmarks/retune_demo_time.py --data {args.data}`", "",
             f"Data: {data.description}. Record: Blended, PreAct-ResNet18 width 0.25, {args.attack_epochs} attack "
             f"epoch(s). The reference settings (100 retuning images, 5 poisoned, 5 epochs) plus the control; "
             f"{machine_short()}, 1-minute load average {load:.1f} at the end (the machine was shared, so "
             f"these are upper bounds).", "",
             "| call | runs | mean | min | max |", "|---|---|---|---|---|"]
    lines += [f"| `{call}` | {len(t)} | {statistics.mean(t):.1f} s | {min(t):.1f} s | {max(t):.1f} s |"
              for call, t in times.items()]
    lines += ["", "Last result (fractions): " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "seconds"),
              ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
