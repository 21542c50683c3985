"""Sweep of `ftsam demo`'s settings on its offline data (scikit-learn digits), over 5 seeds, to choose its default.

    nice -n 10 .venv/bin/python benchmarks/demo_sweep.py            # resumable; writes benchmarks/results/demo_sweep.md

For each seed: the demo's attack (its code and its defaults: PreAct-ResNet18 width 0.25, 15 epochs, 10% poison,
target 0), then FT and FT-SAM at every setting of the grid below, with the demo's own `run_defense` (the real
`ftsam defend` pipeline, evaluated every epoch). Each finished run's summary (final metrics and the per-epoch
curve) is a small JSON under benchmarks/results/demo_sweep_runs/ (committed): a re-run skips what is there, so the
sweep continues where it stopped, also on another machine. The report is regenerated from those files.

A setting passes when FT-SAM's ASR is below FT's on at least 4 of the 5 seeds with FT-SAM's clean accuracy within
3 points of FT's on each of those seeds (the demo's acceptance rule); among passing settings the report ranks by
mean FT-SAM ASR, then by time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2, 3, 4)
ATTACKS = ("blended", "badnet")
RHOS = ("2", "4", "8")
EVAL_EVERY = 2
# (clean ratio, defense epochs, batch size). The packaged cpu config's batch 128 on 140 images (ratio 0.1) left
# BatchNorm's running statistics unusable (seed 0: FT 26% clean ACC after 10 epochs, 88% after recalibrating BN
# on the test images; FT-SAM rho 2: 44%), so the sweep uses smaller batches.
SETTINGS = ((0.2, 20, 32), (0.1, 20, 32))
# Seed 0 explores every setting and rho; the other seeds run only the candidates it left (CPU time: each seed's
# attack and runs take ~30 min on a shared 2-core machine). Edit this to widen the sweep; finished runs are kept.
CANDIDATES = {(0.1, 20, 32): ("2",)}


def grid(seed: int):
    """(setting, rhos) pairs the sweep runs for `seed`."""
    if seed == 0:
        return [(st, RHOS) for st in SETTINGS]
    return list(CANDIDATES.items())


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def run_key(attack: str, seed: int, defense: str, setting: tuple, rho: Optional[str]) -> str:
    ratio, epochs, batch = setting
    head = "ft" if defense == "ft-baseline" else f"ftsam_rho{rho}"
    return f"{attack}_s{seed}_{head}_r{ratio:g}_e{epochs}_b{batch}"


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(obj, handle, indent=1)
    os.replace(path + ".tmp", path)


def sweep(results: str, cache: str, attacks: Sequence[str], seeds: Sequence[int], threads: int) -> None:
    import torch

    from ftsam_plugin import demo

    torch.set_num_threads(threads)
    data = demo.select_data(None, os.path.join(cache, "data"), offline=True)
    for seed in seeds:
        for attack in attacks:
            record = os.path.join(cache, "records", f"s{seed}", f"demo_{attack}")
            todo = [(d, st, rho) for st, rhos in grid(seed) for d, rho in [("ft-baseline", None)] + [("ftsam", x) for x in rhos]
                    if not os.path.isfile(os.path.join(results, run_key(attack, seed, d, st, rho) + ".json"))]
            if not todo:
                continue
            attack_json = os.path.join(results, f"{attack}_s{seed}_attack.json")
            if not os.path.isfile(os.path.join(record, "attack_result.pt")):
                import shutil

                shutil.rmtree(record, ignore_errors=True)
                log(f"attack {attack} seed {seed}")
                start = time.perf_counter()
                demo.run_attack(data, os.path.dirname(record), os.path.basename(record), attack, 15, 0.25, "cpu",
                                seed, False)
                write_json(attack_json, {"attack": attack, "seed": seed, "seconds": time.perf_counter() - start,
                                         **demo._last_row(os.path.join(record, "attack_df.csv"))})
            for defense, setting, rho in todo:
                key = run_key(attack, seed, defense, setting, rho)
                log(f"{key}")
                ratio, epochs, batch = setting
                out = demo.run_defense(defense, record, epochs, ratio, rho, "cpu", seed, eval_every=EVAL_EVERY,
                                       batch_size=batch)
                out.pop("result")
                write_json(os.path.join(results, key + ".json"),
                           {"key": key, "attack": attack, "seed": seed, "defense": defense, "ratio": ratio,
                            "epochs": epochs, "batch_size": batch, "rho_setting": rho, "threads": threads, **out})


def load(results: str) -> Dict[str, dict]:
    out = {}
    for name in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        if name.endswith(".json"):
            with open(os.path.join(results, name)) as handle:
                out[name[:-5]] = json.load(handle)
    return out


def mean_std(values: List[float]) -> str:
    if not values:
        return "–"
    m = 100 * statistics.mean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def evaluate_settings(runs: Dict[str, dict], attack: str, seeds: Sequence[int]) -> List[dict]:
    """One row per FT-SAM setting: per-seed comparison with FT at the same ratio/epochs/seed."""
    rows = []
    for setting in SETTINGS:
        ratio, epochs, batch = setting
        for rho in RHOS:
            pairs = []
            for seed in seeds:
                ft = runs.get(run_key(attack, seed, "ft-baseline", setting, None))
                sam = runs.get(run_key(attack, seed, "ftsam", setting, rho))
                if ft and sam:
                    pairs.append((seed, ft, sam))
            if not pairs:
                continue
            wins = [s for s, ft, sam in pairs
                    if sam["test_asr"] < ft["test_asr"] and sam["test_acc"] >= ft["test_acc"] - 0.03]
            rows.append({
                "ratio": ratio, "epochs": epochs, "batch": batch, "rho": rho, "n": len(pairs), "wins": len(wins),
                "passes": len(pairs) == len(seeds) and len(wins) >= len(seeds) - 1,
                "ft_acc": [ft["test_acc"] for _, ft, _ in pairs], "ft_asr": [ft["test_asr"] for _, ft, _ in pairs],
                "sam_acc": [sam["test_acc"] for _, _, sam in pairs],
                "sam_asr": [sam["test_asr"] for _, _, sam in pairs],
                "seconds": statistics.mean(ft["seconds"] + sam["seconds"] for _, ft, sam in pairs),
            })
    return rows


def report(results: str, out: str, seeds: Sequence[int]) -> None:
    runs = load(results)
    lines = ["# `ftsam demo`: a sweep of its settings on the offline data", "",
             "- Command: `python benchmarks/demo_sweep.py` (resumable; per-run JSON in "
             "`benchmarks/results/demo_sweep_runs/`)",
             f"- Written {datetime.now():%Y-%m-%d %H:%M}; {len(runs)} run files",
             "- Data: scikit-learn's digits (1,797 real 8×8 handwritten digits upscaled to 32×32 RGB; 1,433 train / "
             "364 test), what a machine without network gets.",
             "- Attack: the demo's (PreAct-ResNet18 width 0.25, 15 epochs, 10% poison, all-to-one target 0), one "
             "record per seed and attack; defenses with the packaged `cpu` config (lr 0.01 cosine, the batch size of the setting, "
             "label smoothing 0.1; FT-SAM: ASAM eta 0), class-balanced clean subset, the same seed for the "
             "subset, the attack and both defenses; evaluated every 2 epochs.",
             "- A setting **passes** when, on ≥ 4 of the 5 seeds, FT-SAM's ASR is below FT's with clean accuracy "
             "within 3 points of FT's. ACC/ASR in %, mean ± std over the seeds; time = mean wall seconds of FT + "
             "FT-SAM (machine shared with other jobs: relative only).", ""]
    for attack in ATTACKS:
        atk = [runs[k] for k in runs if k.startswith(f"{attack}_s") and k.endswith("_attack")]
        rows = evaluate_settings(runs, attack, seeds)
        if not rows:
            continue
        lines += [f"## {attack}", "",
                  f"Backdoored model over {len(atk)} seeds: ACC {mean_std([a['test_acc'] for a in atk])}, "
                  f"ASR {mean_std([a['test_asr'] for a in atk])}.", "",
                  "| clean ratio | epochs | batch | ρ | seeds | FT-SAM wins | passes | FT ACC | FT ASR | "
                  "FT-SAM ACC | FT-SAM ASR | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['ratio']:g} | {r['epochs']} | {r['batch']} | {r['rho']} | {r['n']} | {r['wins']} | "
                         f"{'**yes**' if r['passes'] else 'no'} | {mean_std(r['ft_acc'])} | {mean_std(r['ft_asr'])} | "
                         f"{mean_std(r['sam_acc'])} | {mean_std(r['sam_asr'])} | {r['seconds']:.0f} |")
        lines.append("")
        lines += ["Per seed (ACC / ASR, FT then FT-SAM):", ""]
        for r in rows:
            for seed in seeds:
                ft = runs.get(run_key(attack, seed, "ft-baseline", (r["ratio"], r["epochs"], r["batch"]), None))
                sam = runs.get(run_key(attack, seed, "ftsam", (r["ratio"], r["epochs"], r["batch"]), r["rho"]))
                if ft and sam:
                    lines.append(f"- ratio {r['ratio']:g}, ρ {r['rho']}, seed {seed}: FT {100 * ft['test_acc']:.1f} / "
                                 f"{100 * ft['test_asr']:.1f}, FT-SAM {100 * sam['test_acc']:.1f} / "
                                 f"{100 * sam['test_asr']:.1f}")
        lines += ["", "The demo quotes these rows (`ftsam_plugin/demo.py`, `SWEEP`):", "", "```python"]
        for r in rows:
            key = ("digits", attack, (r["ratio"], r["epochs"], r["batch"], r["rho"]))
            lines.append(f"{key!r}: dict(wins={r['wins']}, n={r['n']}, ft_asr={mean_std(r['ft_asr'])!r}, "
                         f"sam_asr={mean_std(r['sam_asr'])!r}, ft_acc={mean_std(r['ft_acc'])!r}, "
                         f"sam_acc={mean_std(r['sam_acc'])!r}),")
        lines += ["```", ""]
    old = load(os.path.join(os.path.dirname(results), "demo_sweep_runs_bs128"))
    if old:
        lines += ["## Why not the packaged `cpu` config's batch 128", "",
                  "With batch 128 on the 140-image subset (ratio 0.1, 10 epochs, seed 0) BatchNorm's running "
                  "statistics stop matching the test data: "
                  + "; ".join(f"{k.split('_', 2)[2]}: ACC {100 * v['test_acc']:.1f}, ASR {100 * v['test_asr']:.1f}"
                              for k, v in sorted(old.items()))
                  + " (`benchmarks/results/demo_sweep_runs_bs128/`). Re-estimating the FT model's BN statistics on the "
                  "test images brought its ACC from 26.1% back to 88.2%, so the weights were fine and the running "
                  "statistics were not. The sweep therefore uses batch 32.", ""]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(out + ".tmp", out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "demo_sweep_runs"))
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "demo_sweep.md"))
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache", "demo_sweep"))
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=["blended"])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        sweep(args.results, args.cache, args.attacks, args.seeds, args.threads)
    report(args.results, args.out, args.seeds)
    log(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
