"""Choose `ftsam demo`'s defense settings on its offline data (scikit-learn digits): seeds 0-4 choose, seeds 5-9 gate.

    nice -n 10 .venv/bin/python benchmarks/demo_sweep.py            # resumable; writes benchmarks/results/demo_sweep.md
    .venv/bin/python benchmarks/demo_sweep.py --report_only         # rewrite the report from the run files

Three stages, each a grid of (setting, rhos) per seed; a setting is (clean ratio, defense epochs, batch size, lr):
  1. EXPLORE, seed 0 only: a wide grid (the learning rate first: the demo's old lr 0.01 destroyed and relearned
     the model, see the report);
  2. CANDIDATES, selection seeds 0-4: the settings the exploration left; the default is chosen from these seeds
     only (the demo's acceptance rule, below) and written into `ftsam_plugin/demo.py` (DEFAULTS);
  3. held-out seeds 5-9: they rank no settings, but gate three picks in turn (the pick without a time limit, then the
     picks within the 3-minute budget, `BUDGET_PICKS`, in the rule's order), each checked knowing the earlier picks'
     results; the default (demo.DEFAULTS) is the first 3-minute pick that passed there. So they took part in the
     choice as a gate; they are not an untouched test set.
For each seed: the demo's attack (its code and defaults: Blended, PreAct-ResNet18 width 0.25, 15 epochs, 10%
poison, target 0), then FT and FT-SAM with the demo's own `run_defense` (the real `ftsam defend` pipeline). Each
finished run's summary (final metrics and per-epoch curve) is a small JSON under benchmarks/results/demo_sweep_runs/
(committed; runs made from now on also record the CPU model, torch version and thread count): a re-run skips what is
there. One torch thread, like the demo. A seed's numbers are the same only on the same CPU type, thread count and code
(the committed runs: an Intel Xeon, before evaluation had its own random generator, 7905b10); the claim is the mean
over seeds.

Acceptance rule (issue 18): on >= 4 of 5 seeds FT-SAM's ASR is below FT's with clean accuracy within 3 points of
FT's, and FT's mean ASR is >= 20% (FT must actually fail).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from datetime import datetime
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from ftsam_plugin.provenance import git_commit, machine  # noqa: E402

SELECTION_SEEDS = (0, 1, 2, 3, 4)
HELD_OUT_SEEDS = (5, 6, 7, 8, 9)
ATTACK = "blended"
EVAL_EVERY = 2
Setting = Tuple[float, int, int, float]  # (clean ratio, defense epochs, batch size, lr)

EXPLORE: Dict[Setting, Tuple[str, ...]] = {
    (0.2, 20, 32, 0.01): ("2",), (0.2, 20, 32, 0.005): ("2", "4"), (0.2, 20, 32, 0.003): ("1", "2", "4", "8"),
    (0.2, 20, 32, 0.002): ("2", "4", "8"), (0.2, 20, 32, 0.001): ("2", "4", "8"), (0.1, 20, 32, 0.003): ("2",),
}
# round 1 (from the exploration), then round 2 (from round 1 on seeds 0-4: no setting passed; FT-SAM lost > 3
# points of ACC on some seeds at lr 0.002, and FT removed the backdoor itself on some seeds at lr 0.003)
CANDIDATES: Dict[Setting, Tuple[str, ...]] = {(0.2, 20, 32, 0.003): ("1", "2"), (0.2, 20, 32, 0.002): ("1", "2"),
                                              (0.2, 40, 32, 0.002): ("1", "2"), (0.3, 20, 32, 0.002): ("2",)}


# Issue 18 also asks for 3 minutes. The rule's pick without a time limit (ratio 0.2, 40 epochs) takes 3:18-3:25 on 2
# cores. The rule again with a time budget: FT-SAM's work (clean images x epochs) that fits 3 minutes with the demo's
# defenses side by side. At that pick (280 images x 40 epochs = 11,200) the whole demo took 198-205 s, ~110 s of it
# the FT-SAM stage: 180 s leaves ~85 s for that stage, about 8,600 image-epochs. BUDGET_PICKS: the passing settings
# within the budget, in the rule's order (lowest mean FT-SAM ASR first). They were run on the held-out seeds one
# after the other, after the first pick's held-out result was known: those seeds have checked more than one choice.
# The demo's default is the first of them that passes there, else the pick without a budget (`default_by_rule`).
WORK_BUDGET = 8600
BUDGET_PICKS: Tuple[Tuple[Setting, str], ...] = (((0.3, 20, 32, 0.002), "2"), ((0.2, 20, 32, 0.002), "1"))


def work(setting: Setting, n_train: int = 1433) -> int:
    """FT-SAM's image-epochs at a setting (the demo's class-balanced clean subset of the 1,433 digits)."""
    from ftsam_plugin.demo import clean_subset_size

    ratio, epochs, _, _ = setting
    return clean_subset_size(n_train, ratio) * epochs


def chosen() -> Tuple[Setting, str]:
    """The demo's default, as `ftsam demo` runs it."""
    from ftsam_plugin.demo import DEFAULTS

    d = DEFAULTS
    return (d["ratio"], d["defense_epochs"], d["batch_size"], d["lr"]), f"{d['rho']:g}"


def grid(seed: int) -> List[Tuple[Setting, Tuple[str, ...]]]:
    """(setting, rhos) pairs the sweep runs for `seed`."""
    if seed in HELD_OUT_SEEDS:
        setting, rho = chosen()
        return list(dict.fromkeys([(setting, (rho,))] + [(st, (r,)) for st, r in BUDGET_PICKS]))
    pairs = dict(CANDIDATES)
    if seed == 0:
        for setting, rhos in EXPLORE.items():
            pairs[setting] = tuple(dict.fromkeys(pairs.get(setting, ()) + rhos))
    return list(pairs.items())


def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def run_key(seed: int, defense: str, setting: Setting, rho: Optional[str]) -> str:
    ratio, epochs, batch, lr = setting
    head = "ft" if defense == "ft-baseline" else f"ftsam_rho{rho}"
    return f"{ATTACK}_s{seed}_{head}_r{ratio:g}_e{epochs}_b{batch}_lr{lr:g}"


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(obj, handle, indent=1)
    os.replace(path + ".tmp", path)


def sweep(results: str, cache: str, seeds: Sequence[int]) -> None:
    import torch

    from ftsam_plugin import demo

    torch.set_num_threads(1)
    data = demo.select_data(None, os.path.join(cache, "data"), offline=True)
    for seed in seeds:
        todo = [(d, st, rho) for st, rhos in grid(seed) for d, rho in [("ft-baseline", None)] + [("ftsam", x) for x in rhos]
                if not os.path.isfile(os.path.join(results, run_key(seed, d, st, rho) + ".json"))]
        if not todo:
            continue
        record = os.path.join(cache, "records", f"s{seed}", f"demo_{ATTACK}")
        if not os.path.isfile(os.path.join(record, "attack_result.pt")):
            shutil.rmtree(record, ignore_errors=True)
            log(f"attack {ATTACK} seed {seed}")
            start = time.perf_counter()
            demo.run_attack(data, os.path.dirname(record), os.path.basename(record), ATTACK, 15, 0.25, "cpu", seed,
                            False)
            write_json(os.path.join(results, f"{ATTACK}_s{seed}_attack.json"),
                       {"attack": ATTACK, "seed": seed, "seconds": time.perf_counter() - start, "threads": 1,
                        "machine": machine(1), "commit": git_commit(REPO),
                        **demo._last_row(os.path.join(record, "attack_df.csv"))})
        for defense, setting, rho in todo:
            key = run_key(seed, defense, setting, rho)
            log(key)
            ratio, epochs, batch, lr = setting
            shutil.rmtree(os.path.join(record, "defense"), ignore_errors=True)
            out = demo.run_defense(defense, record, epochs, ratio, rho, "cpu", seed, eval_every=EVAL_EVERY,
                                   batch_size=batch, lr=lr)
            out.pop("result")
            write_json(os.path.join(results, key + ".json"),
                       {"key": key, "attack": ATTACK, "seed": seed, "defense": defense, "ratio": ratio,
                        "epochs": epochs, "batch_size": batch, "lr": lr, "rho_setting": rho, "threads": 1,
                        "machine": machine(1), "commit": git_commit(REPO), **out})


def machines_line(runs: Dict[str, dict]) -> str:
    """Where the run files were made: the machines they record, and how many record none."""
    named = sorted({f"{r['machine']['cpu']}, torch {r['machine']['torch']}" for r in runs.values() if r.get("machine")})
    unnamed = sum(1 for r in runs.values() if not r.get("machine"))
    return ("Runs made on: " + "; ".join(named) + ". " if named else "") + (
        f"{unnamed} run files record no machine: they were made on 2026-12-03 by the session whose CPU-study runs "
        "record an Intel Xeon (this project's machine then), before evaluation had its own random generator "
        "(7905b10)." if unnamed else "")


def load(results: str) -> Dict[str, dict]:
    out = {}
    for name in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        if name.endswith(".json"):
            with open(os.path.join(results, name)) as handle:
                out[name[:-5]] = json.load(handle)
    return out


def mean_std(values: List[float]) -> str:
    """'mean ± sample std' in percent; one value alone (no spread to give)."""
    if not values:
        return "–"
    m = 100 * statistics.mean(values)
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{m:.1f}"


def compare(runs: Dict[str, dict], setting: Setting, rho: str, seeds: Sequence[int]) -> Optional[dict]:
    """FT vs FT-SAM at one setting over `seeds` (those that finished), with the acceptance rule's verdict."""
    pairs = [(s, runs[run_key(s, "ft-baseline", setting, None)], runs[run_key(s, "ftsam", setting, rho)])
             for s in seeds
             if run_key(s, "ft-baseline", setting, None) in runs and run_key(s, "ftsam", setting, rho) in runs]
    if not pairs:
        return None
    wins = [s for s, ft, sam in pairs if sam["test_asr"] < ft["test_asr"] and sam["test_acc"] >= ft["test_acc"] - 0.03]
    ft_asr = [ft["test_asr"] for _, ft, _ in pairs]
    return {"setting": setting, "rho": rho, "pairs": pairs, "n": len(pairs), "wins": len(wins),
            "passes": len(pairs) == len(seeds) and len(wins) >= len(seeds) - 1 and statistics.mean(ft_asr) >= 0.20,
            "ft_acc": [ft["test_acc"] for _, ft, _ in pairs], "ft_asr": ft_asr,
            "sam_acc": [sam["test_acc"] for _, _, sam in pairs], "sam_asr": [sam["test_asr"] for _, _, sam in pairs],
            "seconds": statistics.mean(ft["seconds"] + sam["seconds"] for _, ft, sam in pairs)}


def table(rows: List[dict], seeds: Sequence[int]) -> List[str]:
    lines = ["| clean ratio | epochs | batch | lr | ρ | seeds | FT-SAM wins | passes | FT ACC | FT ASR | FT-SAM ACC | "
             "FT-SAM ASR | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio, epochs, batch, lr = r["setting"]
        verdict = "**yes**" if r["passes"] else ("no" if r["n"] == len(seeds) else "–")
        lines.append(f"| {ratio:g} | {epochs} | {batch} | {lr:g} | {r['rho']} | {r['n']} | {r['wins']} | {verdict} | "
                     f"{mean_std(r['ft_acc'])} | {mean_std(r['ft_asr'])} | {mean_std(r['sam_acc'])} | "
                     f"{mean_std(r['sam_asr'])} | {r['seconds']:.0f} |")
    lines += ["", "Per seed (ACC / ASR, FT then FT-SAM):", ""]
    for r in rows:
        ratio, epochs, batch, lr = r["setting"]
        for seed, ft, sam in r["pairs"]:
            lines.append(f"- ratio {ratio:g}, {epochs} epochs, batch {batch}, lr {lr:g}, ρ {r['rho']}, seed {seed}: "
                         f"FT {100 * ft['test_acc']:.1f} / "
                         f"{100 * ft['test_asr']:.1f}, FT-SAM {100 * sam['test_acc']:.1f} / {100 * sam['test_asr']:.1f}")
    return lines


def selection_rows(runs: Dict[str, dict]) -> List[dict]:
    """Every (setting, rho) of the grid over the selection seeds, as far as they ran."""
    return [r for st, rhos in grid(0) for x in rhos if (r := compare(runs, st, x, SELECTION_SEEDS)) is not None]


def rule_order(rows: List[dict], budget: Optional[int] = None) -> List[Tuple[Setting, str]]:
    """The rule: the settings that pass on the selection seeds (and fit `budget` image-epochs, when given), lowest
    mean FT-SAM ASR first; the first is the pick."""
    fits = [r for r in rows if r["passes"] and (budget is None or work(r["setting"]) <= budget)]
    return [(r["setting"], r["rho"]) for r in sorted(fits, key=lambda r: statistics.mean(r["sam_asr"]))]


def default_by_rule(runs: Dict[str, dict]) -> Optional[Tuple[Setting, str]]:
    """The first of BUDGET_PICKS that passes on the held-out seeds, else the pick without a budget."""
    for setting, rho in BUDGET_PICKS:
        held = compare(runs, setting, rho, HELD_OUT_SEEDS)
        if held and held["passes"]:
            return setting, rho
    order = rule_order(selection_rows(runs))
    return order[0] if order else None


def describe_setting(setting: Setting, rho: str) -> str:
    ratio, epochs, batch, lr = setting
    return f"clean ratio {ratio:g}, {epochs} epochs, batch {batch}, lr {lr:g}, ρ {rho}"


def held_out_summary(runs: Dict[str, dict]) -> Optional[dict]:
    """The chosen default on the held-out seeds (what the demo quotes), or None before any finished."""
    setting, rho = chosen()
    return compare(runs, setting, rho, HELD_OUT_SEEDS)


def report(results: str, out: str) -> None:
    runs = load(results)
    setting, rho = chosen()
    atk = [runs[k] for k in runs if k.endswith("_attack")]
    lines = ["# `ftsam demo`: its settings chosen on seeds 0–4 of the offline data; seeds 5–9 gated three picks in "
             "turn", "",
             "- Command: `nice -n 10 .venv/bin/python benchmarks/demo_sweep.py` (resumable; per-run JSON in "
             "[`demo_sweep_runs/`](demo_sweep_runs/); `--report_only` rewrites this file)",
             f"- Written {datetime.now():%Y-%m-%d %H:%M}; {len(runs)} run files; one torch thread, as the demo. "
             + machines_line(runs),
             "- Data: scikit-learn's digits (1,797 real 8×8 handwritten digits upscaled to 32×32 RGB; 1,433 train / "
             "364 test), what a machine without network gets.",
             "- Attack: the demo's (Blended, PreAct-ResNet18 width 0.25, 15 epochs, 10% poison, all-to-one target 0), "
             "one record per seed; the defenses with the packaged `cpu` config (cosine lr schedule, SGD momentum 0.9, "
             "wd 5e-4, label smoothing 0.1; FT-SAM: ASAM, eta 0) at the lr, batch and clean ratio of the setting, a "
             "class-balanced clean subset, the same seed for the subset, the attack and both defenses; evaluated every "
             f"{EVAL_EVERY} epochs and at the last.",
             f"- Backdoored models, seeds 0–9 ({len(atk)} finished): ACC {mean_std([a['test_acc'] for a in atk])}, "
             f"ASR {mean_std([a['test_asr'] for a in atk])}.",
             "- A setting **passes** when on ≥ 4 of 5 seeds FT-SAM's ASR is below FT's with clean accuracy within 3 "
             "points of FT's, and FT's mean ASR is ≥ 20% (FT must fail). ACC/ASR in %, mean ± sample standard "
             "deviation over seeds (a single seed: its value); s = mean wall seconds of FT + FT-SAM (one thread, "
             "machine shared with other jobs).", ""]
    lines += ["## 1. Exploration (seed 0) and selection (seeds 0–4)", "",
              "The picks come from this table only: of the passing settings, the lowest mean FT-SAM ASR; then the "
              f"same within the 3-minute budget (FT-SAM work ≤ {WORK_BUDGET:,} image-epochs, see `WORK_BUDGET`).",
              ""]
    rows = selection_rows(runs)
    rows.sort(key=lambda r: (-r["n"], r["setting"][3], r["setting"][0], float(r["rho"])))
    lines += table(rows, SELECTION_SEEDS) + [""]
    first = rule_order(rows)
    budgeted = rule_order(rows, WORK_BUDGET)
    lines += [f"Without a time limit the rule picks {describe_setting(*first[0])}. Within the budget it orders "
              + "; ".join(describe_setting(*x) for x in budgeted)
              + (" (`BUDGET_PICKS`)." if budgeted == list(BUDGET_PICKS) else " — `BUDGET_PICKS` differs: update it."), ""]
    lines += ["## 2. The picks on held-out seeds 5–9, in the order they were checked", "",
              "These seeds ranked no settings; they gated three picks in turn (the first without a time limit, then "
              "the picks within the 3-minute budget in the rule's order), each checked knowing the earlier picks' "
              "results, and the default is the first 3-minute pick that passed here: as a gate, they took part in "
              "the choice.", ""]
    checked = [(x, held) for x in [first[0]] + list(BUDGET_PICKS) if (held := compare(runs, *x, HELD_OUT_SEEDS))]
    for k, ((st, r), held) in enumerate(checked, 1):
        verdict = ("passes" if held["passes"] else "does not pass" if held["n"] == len(HELD_OUT_SEEDS)
                   else "pending (not all seeds ran)")
        lines += [f"### 2.{k}. {describe_setting(st, r)} ({work(st):,} image-epochs"
                  + (", within the budget)" if work(st) <= WORK_BUDGET else ", over the budget)"), ""]
        lines += table([held], HELD_OUT_SEEDS)
        lines += ["", f"Verdict: **{verdict}** the acceptance rule (FT-SAM ASR below FT's with ACC within 3 points "
                      f"on {held['wins']} of {held['n']}; FT's mean ASR {mean_std(held['ft_asr'])}%).", ""]
    rule = default_by_rule(runs)
    lines += [f"`ftsam demo`'s default (`DEFAULTS` in `ftsam_plugin/demo.py`): {describe_setting(setting, rho)}"
              + ("; by the rule (the first budget pick that passes here, else the pick without a time limit)."
                 if rule == (setting, rho) else f" — NOT the rule's ({describe_setting(*rule)}): update it.")
              if rule else "(no pick yet)"]
    lines += ["", "## 3. Why not the packaged `cpu` config's lr 0.01", "",
              "The demo used to run the defenses at lr 0.01 (ratio 0.1, batch 32). There both defenses first destroy "
              "the model and then relearn it from the clean subset (clean ACC 93% → 15–19% after one or two epochs, "
              "back to ~90% by the end); what removed the backdoor was that forgetting, not FT-SAM's mechanism, and "
              "FT removed it as well. [`demo_collapse.md`](demo_collapse.md) measures why: the evaluation is not at "
              "fault (the defense evaluates the backdoored model exactly as the attack reported; a test pins it), "
              "the backdoored model's BatchNorm running statistics were accumulated on batches with 10% blended "
              "images, and ten steps of lr 0.01 with momentum 0.9 move the weights ~2% while the running "
              "statistics lag behind: re-estimating BN on the clean subset brings the collapsed model from ~15% "
              "back to ~81%. At lr 0.002–0.003 the dip is small and FT keeps the backdoor, as in the paper. The "
              "earlier lr-0.01 runs are kept in [`demo_sweep_runs_lr0.01/`](demo_sweep_runs_lr0.01/) (made with "
              "an older attack record; not comparable digit for digit).", ""]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(out + ".tmp", out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "demo_sweep_runs"))
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "demo_sweep.md"))
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache", "demo_sweep"))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SELECTION_SEEDS + HELD_OUT_SEEDS))
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        sweep(args.results, args.cache, args.seeds)
    report(args.results, args.out)
    log(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
