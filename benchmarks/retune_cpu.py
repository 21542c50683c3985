"""P-ASR on the CPU benchmark's records: the retuning attack on no defense, FT and FT-SAM (issue 14).

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/retune_cpu.py                 # run what is missing, report
    python benchmarks/retune_cpu.py --report_only                                     # rewrite the report only

Inputs (read-only; by default the lead's CPU study, `benchmarks/defense_cpu.py`, in /work/main):
  --source/record/<record>/attack_result.pt                                   the backdoored models
  --source/runs/<record>/<tag>/rec/defense/<ft-baseline|ftsam>/defense_result.pt   their defense results
  --source_results/<attack>/<tag>.json                                        marks a defense run as finished
Steps:
  1. mirror each record into --cache (default benchmarks/.cache/retune_cpu): `record/<record>/` holds links to the
     record's files and `defense/<tag>/` links to each finished run's defense_result.pt and *_df_summary.csv, so
     `ftsam retune` writes its `retune/` folders into this cache, never into the source;
  2. for each seed (--seeds, default 42 43 44), each model (no defense first, then FT and FT-SAM runs, see
     PRIORITY) and both runs (the attack, --poison_num 5, and its control, --poison_num 0): `ftsam retune` in a
     subprocess (the real CLI), then a small summary JSON in benchmarks/results/retune_cpu_runs/<record>/<model>/
     <settings tag>.json. A run whose JSON exists is skipped, so an interrupted study resumes; the source is
     re-scanned after every run, so defense runs that finish meanwhile are picked up;
  3. benchmarks/results/retune_cpu.md from those JSON files and the study's committed summaries alone (`--report_only`
     needs nothing else): mean ± sample standard deviation over the seeds, with the commands.
The attack is evaluated before and after retuning only (`--eval_every 5`); the control after only
(`--eval_before false`): the model before retuning is the same as the attack's.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from ftsam_plugin.provenance import git_commit, machine, machine_short  # noqa: E402

MAIN = "/work/main/benchmarks"
SETTINGS = {"split_ratio": 0.02, "epochs": 5, "lr": 0.01, "sgd_momentum": 0.9, "wd": 0.0, "batch_size": 128}
POISON_NUM = 5
NO_DEFENSE = "none"
# models attacked first (then any other finished run of the study, by name): the undefended model, FT over 100
# epochs, FT-SAM at the CPU study's recommended setting (rho 4, 20 epochs) and at the paper's (rho 2, 100 epochs)
PRIORITY = (NO_DEFENSE, "ft_e100_s0", "ftsam_rho4_e20_s0", "ftsam_rho2_e100_s0", "ft-baseline", "ftsam")
LINKED_FILES = ("attack_result.pt", "bd_train_dataset", "bd_test_dataset", "info.pickle", "attack_df.csv",
                "attack_df_summary.csv")


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def attack_of(record: str) -> str:
    """The attack in a record's name (cifar10_preactresnet18_w0.25_<attack>_e15, demo_<attack>)."""
    m = re.search(r"(badnet|blended)", record)
    return m.group(1) if m else record


def is_study(record: str) -> bool:
    return not record.startswith("demo_")


def record_order(found) -> List[str]:
    """The CPU study's records first (blended, then badnet), then extra ones (--records)."""
    return sorted(found, key=lambda r: (not is_study(r), attack_of(r) != "blended", r))


def link(src: str, dst: str) -> None:
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(src), dst)


# ------------------------------------------------------------------------------------------------ mirror


def mirror(source: str, source_results: str, cache: str) -> Dict[str, List[str]]:
    """{record: [models]} for every finished record and defense run of the source, linked into `cache`."""
    found: Dict[str, List[str]] = {}
    for pt in sorted(glob.glob(os.path.join(source, "record", "*", "attack_result.pt"))):
        record = os.path.basename(os.path.dirname(pt))
        mine = os.path.join(cache, "record", record)
        os.makedirs(os.path.join(mine, "defense"), exist_ok=True)
        for name in LINKED_FILES:
            if os.path.lexists(os.path.join(os.path.dirname(pt), name)):
                link(os.path.join(os.path.dirname(pt), name), os.path.join(mine, name))
        models = [NO_DEFENSE]
        for run_json in sorted(glob.glob(os.path.join(source_results, attack_of(record), "*.json"))):
            tag = os.path.splitext(os.path.basename(run_json))[0]
            results = glob.glob(os.path.join(source, "runs", record, tag, "rec", "defense", "*", "defense_result.pt"))
            if len(results) != 1:
                continue
            folder = os.path.join(mine, "defense", tag)
            os.makedirs(folder, exist_ok=True)
            link(results[0], os.path.join(folder, "defense_result.pt"))
            for summary in glob.glob(os.path.join(os.path.dirname(results[0]), "*_df_summary.csv")):
                link(summary, os.path.join(folder, os.path.basename(summary)))
            models.append(tag)
        found[record] = by_priority(models)
    return found


def by_priority(models: List[str]) -> List[str]:
    return sorted(models, key=lambda m: (PRIORITY.index(m) if m in PRIORITY else len(PRIORITY), m))


def mirror_records(paths: Sequence[str], cache: str) -> Dict[str, List[str]]:
    """{record: [models]} for extra record folders in BackdoorBench's layout (e.g. `ftsam demo`'s): no defense and
    every `defense/<name>/defense_result.pt`, linked into `cache` like the study's."""
    found: Dict[str, List[str]] = {}
    for path in paths:
        record = os.path.basename(os.path.normpath(path))
        mine = os.path.join(cache, "record", record)
        os.makedirs(os.path.join(mine, "defense"), exist_ok=True)
        for name in os.listdir(path):
            if name not in ("defense", "retune"):
                link(os.path.join(path, name), os.path.join(mine, name))
        models = [NO_DEFENSE]
        for result in sorted(glob.glob(os.path.join(path, "defense", "*", "defense_result.pt"))):
            name = os.path.basename(os.path.dirname(result))
            os.makedirs(os.path.join(mine, "defense", name), exist_ok=True)
            for item in glob.glob(os.path.join(os.path.dirname(result), "*_df*.csv")) + [result]:
                link(item, os.path.join(mine, "defense", name, os.path.basename(item)))
            models.append(name)
        found[record] = by_priority(models)
    return found


# ------------------------------------------------------------------------------------------------ runs


def settings_tag(poison_num: int, seed: int) -> str:
    s = SETTINGS
    return (f"p{poison_num}_r{s['split_ratio']:.10g}_e{s['epochs']}_lr{s['lr']:.10g}_m{s['sgd_momentum']:.10g}_"
            f"wd{s['wd']:.10g}_b{s['batch_size']}_s{seed}")


def retune_argv(record_dir: str, model: str, poison_num: int, seed: int, dataset_path: str) -> List[str]:
    argv = ["retune", "--result_file", record_dir, "--defense", model, "--dataset_path", dataset_path,
            "--device", "cpu", "--poison_num", str(poison_num), "--random_seed", str(seed),
            "--eval_every", str(SETTINGS["epochs"])]
    return argv + (["--eval_before", "false"] if poison_num == 0 else [])


def run_json_path(results: str, record: str, model: str, poison_num: int, seed: int) -> str:
    return os.path.join(results, record, model, settings_tag(poison_num, seed) + ".json")


def pending(found: Dict[str, List[str]], results: str, seeds: Sequence[int]) -> List[Tuple[str, str, int, int]]:
    """(record, model, poison_num, seed) still to run: seed by seed (every model's first seed comes first), blended
    before badnet, models in PRIORITY order, the attack before its control."""
    order = record_order(found)
    todo = []
    for seed in seeds:
        for record in order:
            for model in found[record]:
                for poison_num in (POISON_NUM, 0):
                    if not os.path.isfile(run_json_path(results, record, model, poison_num, seed)):
                        todo.append((record, model, poison_num, seed))
    return todo


def execute(cache: str, results: str, record: str, model: str, poison_num: int, seed: int,
            dataset_path: str) -> None:
    record_dir = os.path.join(cache, "record", record)
    argv = retune_argv(record_dir, model, poison_num, seed, dataset_path)
    log_path = os.path.join(cache, "logs", f"{record}_{model}_{settings_tag(poison_num, seed)}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log("$ ftsam " + " ".join(argv))
    start = time.perf_counter()
    with open(log_path, "a") as handle:
        code = subprocess.call([sys.executable, "-m", "ftsam_plugin", *argv], stdout=handle, stderr=subprocess.STDOUT,
                               cwd=REPO)
    wall = time.perf_counter() - start
    if code != 0:
        sys.exit(f"error: ftsam retune failed with exit code {code}; see {log_path}")
    result = os.path.join(record_dir, "defense", model) if model != NO_DEFENSE else record_dir
    with open(os.path.join(result, "retune", settings_tag(poison_num, seed), "summary.json")) as handle:
        summary = json.load(handle)
    out = {
        "record": record, "attack": attack_of(record), "model": model, "poison_num": poison_num, "seed": seed,
        "settings": summary["settings"], "retune_set": summary["retune_set"],
        "before": summary["before"], "after": summary["after"], "seconds": summary["seconds"], "wall_s": round(wall, 1),
        "command": "ftsam " + " ".join(a.replace(cache, "<cache>") for a in argv),
        "machine": machine_short() + " (shared)", "provenance": machine(), "commit": git_commit(REPO),
        "finished": summary["finished"],
    }
    path = run_json_path(results, record, model, poison_num, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(out, handle, indent=1)
        handle.write("\n")
    os.replace(path + ".tmp", path)
    log(f"{record} {model} poison {poison_num} seed {seed}: ASR {summary['after']['asr']:.4f} in {wall / 60:.1f} min")


# ------------------------------------------------------------------------------------------------ report


def load_runs(results: str) -> List[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(results, "*", "*", "*.json"))):
        with open(path) as handle:
            runs.append(json.load(handle))
    return runs


def mean_std(values: List[float]) -> str:
    if not values:
        return "—"
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f} (1 seed)"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


TAG = re.compile(r"^(?:cheap_)?(?:ft|ftsam_rho(?P<rho>auto|[\d.]+)(?:_every(?P<every>\d+))?(?:_p(?P<prob>[\d.]+))?"
                 r"(?:_sam(?P<sam>\d+-\d+))?)_e(?P<epochs>\d+)_s(?P<seed>\d+)(?P<bb>_bb)?$")


def describe_model(model: str) -> str:
    """'ft_e100_s0' -> 'FT, 100 epochs'; 'ftsam_rho4_e20_s1_bb' -> 'FT-SAM ρ=4, 20 epochs, defense seed 1, ...'."""
    names = {NO_DEFENSE: "no defense", "ft-baseline": "FT", "ftsam": "FT-SAM"}
    if model in names:
        return names[model]
    m = TAG.match(model)
    if m is None:
        return model
    text = (f"FT-SAM ρ={m['rho']}" if m["rho"] else "FT")
    text += (f", SAM every {m['every']} steps" if m["every"] else "") + (f", SAM p={m['prob']}" if m["prob"] else "")
    text += (f", SAM in epochs {m['sam']}" if m["sam"] else "") + f", {m['epochs']} epochs"
    text += f", defense seed {m['seed']}" if m["seed"] != "0" else ""
    return text + (", BackdoorBench protocol" if m["bb"] else "")


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def demo_note(record: str, cache: str) -> str:
    """What an extra record is (its demo_info.txt) and how its defenses ran (from their CSVs and subsets)."""
    folder = os.path.join(cache, "record", record)
    info = ""
    if os.path.isfile(os.path.join(folder, "demo_info.txt")):
        info = open(os.path.join(folder, "demo_info.txt")).read().strip()
    parts = []
    for csv_path in sorted(glob.glob(os.path.join(folder, "defense", "*", "*_df.csv"))):
        with open(csv_path) as handle:
            rows = list(csv.DictReader(handle))
        name = os.path.basename(os.path.dirname(csv_path))
        rho = rows[-1].get("rho") if rows else None
        index = os.path.join(os.path.realpath(csv_path).rsplit(os.sep, 1)[0], "log", "index.txt")
        subset = sum(1 for _ in open(index)) if os.path.isfile(index) else None
        parts.append(f"`{name}` {rows[-1]['epoch'] if rows else '?'} epochs" + (f", ρ={float(rho):g}" if rho else "")
                     + (f", {subset} clean images" if subset else ""))
    return f"Record: {info or record}. Defenses as that run made them: {'; '.join(parts) or 'none'}."


def study_models(source_results: str) -> Dict[str, List[str]]:
    """{record: [tags]} of the CPU study's finished defense runs: those with a committed summary."""
    out: Dict[str, List[str]] = {}
    for path in sorted(glob.glob(os.path.join(source_results, "*", "*.json"))):
        with open(path) as handle:
            item = json.load(handle)
        out.setdefault(item["record"], []).append(item["tag"])
    return out


def report(runs: List[dict], study: Dict[str, List[str]], seeds: Sequence[int], cache: str) -> str:
    """The report from the retuning runs' summaries (`runs`) and the study's finished runs (`study`) alone."""
    lines = ["# P-ASR on the CPU records: the retuning attack on no defense, FT and FT-SAM", "",
             "Generated by `benchmarks/retune_cpu.py` from the per-run summaries in "
             "[`retune_cpu_runs/`](retune_cpu_runs/) (one JSON per record × model × run × seed) and the CPU "
             "study's committed summaries (`defense_cpu_runs/`); `--report_only` rewrites it from those files "
             "alone.", "",
             "The retuning attack of Min et al. (NeurIPS 2024), `ftsam retune` with the reference's defaults: a "
             "uniform 2% of the record's clean training set (1,000 images of CIFAR-10's 50,000), the first 5 "
             "replaced by poisoned training images of the record (target label, no augmentation), 5 epochs of SGD "
             "(lr 0.01, momentum 0.9, no weight decay, batch 128). **Control**: `--poison_num 0`, the same images "
             "without the 5 poisoned ones, same augmentation and batch order. Seeds of the retuning data: "
             f"{', '.join(map(str, seeds))}. ACC and ASR on the record's test sets (CIFAR-10: 10,000 clean, 9,000 "
             "triggered non-target images). O-ACC/O-ASR: the model before retuning; P-: after the attack; "
             "control: after the control. Percent, mean ± sample standard deviation over the retuning seeds "
             "(one model per row: the spread is the retuning's, not the defense's).", "",
             "Models: the CPU study's records (PreAct-ResNet18 width 0.25, 15 epochs, 10% poison, target 0) and its "
             "defense results (`benchmarks/defense_cpu.py`, 5% class-balanced clean data, defense seed 0), "
             "attacked where they had finished; then any extra record (`--records`, e.g. one made by `ftsam demo`, "
             "described in its section).", ""]
    by_cell: Dict[Tuple[str, str], Dict[int, List[dict]]] = {}
    for r in runs:
        by_cell.setdefault((r["record"], r["model"]), {}).setdefault(r["poison_num"], []).append(r)
    attacked: Dict[str, List[str]] = {}
    for record, model in by_cell:
        attacked.setdefault(record, []).append(model)
    for record in record_order(attacked):
        lines += [f"## {attack_of(record)} (`{record}`)", ""]
        if not is_study(record):
            lines += [demo_note(record, cache), ""]
        lines += ["| model | O-ACC | O-ASR | P-ACC | **P-ASR** | control ACC | control ASR | seeds (attack / control) |",
                  "|---|---|---|---|---|---|---|---|"]
        for model in by_priority(attacked[record]):
            cell = by_cell[(record, model)]
            attack, control = cell.get(POISON_NUM, []), cell.get(0, [])
            befores = [r["before"] for r in attack if r["before"]]  # the same model for every seed
            o_acc, o_asr = (pct(befores[0]["acc"]), pct(befores[0]["asr"])) if befores else ("—", "—")
            lines.append(
                f"| {describe_model(model)} (`{model}`) | {o_acc} | {o_asr} | "
                f"{mean_std([r['after']['acc'] for r in attack])} | **{mean_std([r['after']['asr'] for r in attack])}**"
                f" | {mean_std([r['after']['acc'] for r in control])} | "
                f"{mean_std([r['after']['asr'] for r in control])} | {len(attack)} / {len(control)} |")
        rest = [m for m in study.get(record, []) if m not in attacked[record]]
        lines += ["", "Finished defense runs of the study not attacked: "
                  + (", ".join(f"`{m}`" for m in rest) if rest else "none") + ".", ""]
    partial = [f"{attack_of(rec)} `{m}`" for (rec, m), cell in by_cell.items()
               if sum(len(v) for v in cell.values()) < 2 * len(seeds)]
    machines = sorted({r["machine"] for r in runs if r.get("provenance")})
    old = sorted((r["finished"], r["machine"]) for r in runs if not r.get("provenance"))
    if old:
        machines.append(f"{len(old)} runs that record no CPU model, only '{old[0][1]}' (made {old[0][0][:10]} to "
                        f"{old[-1][0][:10]}; the CPU study's runs of 2026-12-03 record this project's machine then, "
                        f"an Intel Xeon)")
    lines += ["## What ran", "",
              f"- {len(runs)} retuning runs finished, on: {'; '.join(machines) or '–'}; wall time per run (one "
              f"thread, nice 10, while the defense study ran): attack "
              f"{mean_std_s([r['wall_s'] for r in runs if r['poison_num']])}, control "
              f"{mean_std_s([r['wall_s'] for r in runs if not r['poison_num']])}.",
              "- Attacked models with fewer than all seeds run: " + (", ".join(partial) if partial else "none") + ".",
              "", "## Commands", "",
              "```bash",
              "nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/retune_cpu.py  # runs what is missing, writes this",
              "python benchmarks/retune_cpu.py --report_only                      # this file from the JSON files",
              "```", ""]
    example = next((r for r in runs if r["poison_num"]), None)
    if example:
        lines += ["Each run, e.g. (`<cache>` = `benchmarks/.cache/retune_cpu`; `--defense` is `none` or the "
                  "defense run's tag; the control adds `--poison_num 0 --eval_before false`):", "", "```bash",
                  example["command"], "```", ""]
    return "\n".join(lines)


def mean_std_s(values: List[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0] / 60:.1f} min"
    return f"{statistics.mean(values) / 60:.1f} ± {statistics.stdev(values) / 60:.1f} min"


# ------------------------------------------------------------------------------------------------ main


def write_report(args: argparse.Namespace) -> None:
    text = report(load_runs(args.results), study_models(args.source_results), args.seeds, args.cache)
    with open(args.out + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(args.out + ".tmp", args.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=os.path.join(MAIN, ".cache"), help="the CPU study's cache (read-only)")
    parser.add_argument("--source_results", default=os.path.join(REPO, "benchmarks", "results", "defense_cpu_runs"),
                        help="the CPU study's per-run summaries (a defense run counts once its JSON exists)")
    parser.add_argument("--dataset_path", default=os.path.join(MAIN, ".cache", "cifar10-jpeg"))
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache", "retune_cpu"))
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "retune_cpu_runs"))
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "retune_cpu.md"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--max_runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--records", nargs="*", default=[],
                        help="extra record folders (BackdoorBench layout, e.g. `ftsam demo`'s) to attack after the "
                             "study's, with no defense and each defense result in them")
    parser.add_argument("--models", nargs="+", metavar="TAG",
                        help="attack only these models (e.g. none ft_e100_s0 ftsam_rho4_e20_s0); default: all")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)

    done = 0
    while not args.report_only and (args.max_runs is None or done < args.max_runs):
        found = {**mirror(args.source, args.source_results, args.cache), **mirror_records(args.records, args.cache)}
        todo = [t for t in pending(found, args.results, args.seeds) if not args.models or t[1] in args.models]
        if not todo:
            break
        execute(args.cache, args.results, *todo[0], dataset_path=args.dataset_path)
        done += 1
        write_report(args)
    write_report(args)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
