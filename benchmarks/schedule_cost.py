"""What an epoch of each cheaper FT-SAM schedule costs against a plain FT epoch, side by side in one run (issue 22);
also `--unlearn`'s epochs and scan, and issue 29's frozen rule.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/schedule_cost.py --rounds 3 --epochs 2
    python benchmarks/schedule_cost.py --report_only        # rewrite the report from its JSON
    # --unlearn's cost (the frozen rule): its own report
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/schedule_cost.py --rounds 2 --epochs 3 \
        --kinds SAM "FT + unlearn uap-l2" "SAM + unlearn uap-l2" --out benchmarks/results/unlearn_cost.md

The cheap table of `defense_cpu.py` compares runs made at different times on a shared machine, so its time ratios
carry the machine's drift. Here each round runs one short `ftsam defend` process per kind of epoch, in a rotated
order: FT; FT-SAM rho 4 (SAM on every step); SAM on every 2nd step; SAM with probability 0.5. All on the CPU
study's Blended record and clean subset, `--epochs` epochs each, evaluated once at the end. From each process's
per-epoch CSV it takes the training seconds of every epoch and the one evaluation's seconds; the report gives each
kind's median epoch time as a ratio to FT's, and from those the cost of each schedule of the cheap table as a ratio
to FT over 100 epochs, both evaluated once at the end (training + one evaluation; setup excluded).
Needs the study's cache (`benchmarks/.cache`: data and the Blended record, made by `defense_cpu.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from datetime import datetime
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import defense_cpu as study  # noqa: E402  (the study's record, data and run helpers)

sys.path.insert(0, study.REPO)  # run from a checkout without installing
from ftsam_plugin.provenance import git_commit, machine, machine_short  # noqa: E402

# kind of epoch -> the FT-SAM flags that make it (None: plain FT)
KINDS: Dict[str, Tuple[str, dict]] = {
    "FT": ("ft-baseline", {}),
    "SAM": ("ftsam", {}),
    "SAM every 2nd step": ("ftsam", {"sam_every": 2}),
    "SAM with p=0.5": ("ftsam", {"sam_prob": 0.5}),
    "FT + unlearn uap-l2": ("ft-baseline", {"unlearn": "uap-l2"}),  # issue 29's frozen rule's plain epochs
    "SAM + unlearn uap-l2": ("ftsam", {"unlearn": "uap-l2"}),  # and its SAM epochs
}
UNLEARN_KINDS = [k for k, (_, flags) in KINDS.items() if "unlearn" in flags]  # epoch 1 also holds the scan
DEFAULT_KINDS = [k for k in KINDS if k not in UNLEARN_KINDS]  # issue 22's report
# the cheap table's schedules as epochs of each kind
SCHEDULES: List[Tuple[str, Dict[str, int]]] = [
    ("FT, 100 epochs", {"FT": 100}),
    ("FT-SAM ρ=4, 20 epochs", {"SAM": 20}),
    ("FT-SAM ρ=4, SAM in epochs 1-5 only, 20 epochs", {"SAM": 5, "FT": 15}),
    ("FT-SAM ρ=4, SAM in epochs 1-5 only, 15 epochs", {"SAM": 5, "FT": 10}),
    ("FT-SAM ρ=4, SAM every 2 steps, 20 epochs", {"SAM every 2nd step": 20}),
    ("FT-SAM ρ=4, SAM with p=0.5, 20 epochs", {"SAM with p=0.5": 20}),
    ("FT-SAM ρ=4, 10 epochs", {"SAM": 10}),
    ("FT-SAM ρ=4, SAM in epochs 1-10 only, 20 epochs", {"SAM": 10, "FT": 10}),
    ("the frozen rule (`cifar10_lasting`): SAM in epochs 1-5 + unlearn uap-l2, 100 epochs, + its scan",
     {"SAM + unlearn uap-l2": 5, "FT + unlearn uap-l2": 95, "scan": 1}),
]


def measure(kind: str, rnd: int, epochs: int, record: str, data: str, cache: str, threads: int) -> dict:
    """One `ftsam defend` process of this kind; its per-epoch training seconds and its one evaluation's seconds."""
    defense, flags = KINDS[kind]
    run = study.Run("blended", defense, epochs, 0, rho=study.RECOMMENDED["rho"] if defense == "ftsam" else None,
                    eval_every=epochs, group="schedule_cost", **flags)
    folder = os.path.join(cache, "schedule_cost", f"{run.tag}_r{rnd}")
    shutil.rmtree(folder, ignore_errors=True)
    rec = study.link_record(record, folder)
    cmd = [sys.executable, "-m", "ftsam_plugin", *study.defense_argv(study.MODES["full"], run, rec, data)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    study.run_logged(cmd, os.path.join(folder, "defend.log"), env=env)
    rows = study.read_rows(os.path.join(rec, "defense", defense, f"{defense}_df.csv"))
    train = [r["train_time_s"] for r in rows]
    last = rows[-1]
    epochs_s = [b - a for a, b in zip([0.0] + train[:-1], train)]
    scan = {}
    if kind in UNLEARN_KINDS:  # epoch 1's total holds --unlearn's scan: the scan is that excess, the epoch is not timed
        scan = {"scan_s": epochs_s[0] - statistics.median(epochs_s[1:])}
        epochs_s = epochs_s[1:]
    return {"kind": kind, "round": rnd, "epochs_s": epochs_s, **scan,
            "eval_s": last["wall_time_s"] - last["train_time_s"],
            "sam_steps": last.get("sam_steps")}


def kinds_flags(args: argparse.Namespace, out: str) -> str:
    """The report's command: --kinds and --out where they are not the defaults."""
    kinds = [k for k in getattr(args, "kinds", None) or DEFAULT_KINDS if k != "FT"] or ["FT"]
    text = "" if set(kinds) == set(DEFAULT_KINDS) - {"FT"} else " --kinds " + " ".join(
        k if " " not in k else f'"{k}"' for k in kinds)
    rel = os.path.relpath(out, study.REPO)
    return text + ("" if rel == os.path.join("benchmarks", "results", "schedule_cost.md") else f" --out {rel}")


def report(items: List[dict], args: argparse.Namespace, out: str, made: Optional[dict] = None) -> None:
    """The report and its JSON; `made`: the commit and machine of the runs (a report rewritten later keeps them)."""
    load = os.getloadavg()
    made = made or {"commit": git_commit(study.REPO), "provenance": machine(args.threads),
                    "machine": f"{machine_short(args.threads)}; load average at the end {load[0]:.1f} / {load[1]:.1f} "
                               f"/ {load[2]:.1f} (the machine was shared with other jobs)",
                    "finished": datetime.now().isoformat(timespec="seconds")}
    per_kind = {k: [s for i in items if i["kind"] == k for s in i["epochs_s"]] for k in KINDS}
    med = {k: statistics.median(v) for k, v in per_kind.items() if v}
    scans = [i["scan_s"] for i in items if "scan_s" in i]
    # epoch 1's excess over the later epochs is the scan plus a warm-up that every process has: take FT's off
    warmups = [i["epochs_s"][0] - statistics.median(i["epochs_s"][1:]) for i in items
               if i["kind"] == "FT" and len(i["epochs_s"]) > 1]
    warmup = max(0.0, statistics.median(warmups)) if warmups else 0.0
    if scans:
        med["scan"] = statistics.median(scans) - warmup
    evaluation = statistics.median(i["eval_s"] for i in items)
    ft = med["FT"]
    ref = 100 * ft + evaluation
    lines = ["# Cost of the cheaper FT-SAM schedules and of `--unlearn`, side by side (issues 22, 29)", "",
             f"Command: `nice -n 10 env OMP_NUM_THREADS={args.threads} python benchmarks/schedule_cost.py --rounds "
             f"{args.rounds} --epochs {args.epochs}{kinds_flags(args, out)}`  ",
             f"Commit: {made['commit']}  ",
             f"Machine: {made['machine']}  ",
             f"Finished: {made['finished']}", "",
             f"Each of {args.rounds} rounds ran one `ftsam defend` process per kind of epoch, in a rotated order, on "
             f"the CPU study's Blended record (PreAct-ResNet18 width 0.25, 2,500 clean CIFAR-10 images, batch 256: "
             f"10 steps an epoch), {args.epochs} epochs each, evaluated once at the end (the 19,000 test images). "
             "Median over all their epochs; ratios to the median FT epoch."
             + (f" Load: {args.load_note}" if getattr(args, "load_note", "") else ""), "",
             "| kind of epoch | epochs timed | median s | vs FT |", "|---|---|---|---|"]
    for k in KINDS:
        if per_kind[k]:
            lines.append(f"| {k} | {len(per_kind[k])} | {med[k]:.2f} | {med[k] / ft:.2f}× |")
    if scans:
        lines.append(f"| `--unlearn`'s scan, once before epoch 1 (epoch 1's excess over the process's later "
                     f"epochs, less FT's own, {warmup:.2f} s) | {len(scans)} | {med['scan']:.2f} | "
                     f"{med['scan'] / ft:.2f}× |")
    lines += ["", f"One evaluation: {evaluation:.1f} s (median of {len(items)}).", "",
              "Each schedule of the cheap table from these parts, evaluated once at the end, as a ratio to FT over "
              "100 epochs evaluated once at the end (setup, ~10 s a process, excluded):", "",
              "| schedule | epochs (kind × count) | training + one evaluation, s | vs FT-100 |", "|---|---|---|---|"]
    measured = [(name, mix) for name, mix in SCHEDULES if all(k in med for k in mix)]  # a run of some kinds only
    totals = {name: sum(med[k] * n for k, n in mix.items()) + evaluation for name, mix in measured}
    for name, mix in measured:
        parts = " + ".join(f"{n} × {k}" for k, n in mix.items())
        lines.append(f"| {name} | {parts} | {totals[name]:.0f} | {totals[name] / ref:.3f}× |")
    if not kinds_flags(args, out):  # the issue-22 report
        lines += ["", "`defense_cpu.md`'s cheap table quotes the last column (its `side by side` column) and judges "
                      "the time target on it."]
    ratios = {name: total / ref for name, total in totals.items()}
    lines += ["", "Runs (training seconds per epoch, evaluation seconds):", ""]
    lines += [f"- round {i['round']}, {i['kind']}: " + ", ".join(f"{s:.1f}" for s in i["epochs_s"])
              + f"; eval {i['eval_s']:.1f}" for i in items]
    with open(out + ".tmp", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(out + ".tmp", out)
    with open(os.path.splitext(out)[0] + ".json.tmp", "w") as handle:
        json.dump({"args": vars(args), "items": items, "schedules": ratios, **made}, handle, indent=1)
    os.replace(os.path.splitext(out)[0] + ".json.tmp", os.path.splitext(out)[0] + ".json")
    study.log(f"report: {out}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per process (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=os.path.join(study.REPO, "benchmarks", ".cache"))
    parser.add_argument("--out", default=os.path.join(study.REPO, "benchmarks", "results", "schedule_cost.md"))
    parser.add_argument("--report_only", action="store_true", help="rewrite the report from its JSON (no runs)")
    parser.add_argument("--load_note", default="", help="what else ran on the machine meanwhile (for the report)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=DEFAULT_KINDS,
                        help="the kinds of epoch to time (default: issue 22's, those without --unlearn; FT is always "
                             "timed: the unit)")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(os.path.splitext(args.out)[0] + ".json") as handle:
            saved = json.load(handle)
        made = {k: saved[k] for k in ("commit", "machine", "finished", "provenance") if k in saved}
        complete = all(k in made for k in ("commit", "machine", "finished"))
        report(saved["items"], argparse.Namespace(**saved["args"]), args.out, made if complete else None)
        return 0
    cache = os.path.abspath(args.cache)
    record = os.path.join(cache, "record", study.record_name(study.MODES["full"], "blended"))
    if not os.path.isfile(os.path.join(record, "attack_result.pt")):
        sys.exit(f"error: {record} not found; run benchmarks/defense_cpu.py first (it makes the record)")
    data = study.unpack(cache)
    kinds = ["FT"] + [k for k in args.kinds if k != "FT"]
    if any(k in UNLEARN_KINDS for k in kinds) and args.epochs < 2:
        sys.exit("error: --unlearn's kinds need --epochs 2 or more (epoch 1 also holds the scan); raise --epochs")
    items = []
    for rnd in range(args.rounds):
        for kind in kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]:
            items.append(measure(kind, rnd, args.epochs, record, data, cache, args.threads))
    report(items, args, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
