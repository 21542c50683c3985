"""The CPU study as a leaderboard, built from its committed run summaries (issue 27).

    .venv/bin/python benchmarks/leaderboard_cpu.py       # -> benchmarks/results/leaderboard_cpu/

`ftsam leaderboard` reads defended models from record folders; the study's models are not kept in the repository
(nor on every machine), but each finished run's summary is: `benchmarks/results/defense_cpu_runs/<attack>/<tag>.json`
(every evaluated epoch's ACC/ASR/RA, the backdoored model's last row) and, for the seed-0 models that were attacked,
`benchmarks/results/retune_cpu_runs/` (P-ASR and its control per retuning seed). This script fills
`ftsam_plugin.leaderboard`'s tables from those files and writes its outputs with its code (leaderboard.md/.csv/.html
and the heatmaps), then adds, per setting, the spread over seeds and the time to purify of each seed.

Cells: mean over defense seeds 0-2 of each run's last evaluation; DER per seed against the record's backdoored model,
then averaged; P-ASR / control ASR: the seed-0 model, mean over retuning seeds 42-44 (missing where that model was
not attacked). Only settings run on all three seeds of both attacks are columns; the single-seed runs (the 100-epoch
rho sweep, the other cheaper schedules) are in defense_cpu.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from ftsam_plugin import leaderboard as lb  # noqa: E402
from ftsam_plugin.metrics import der  # noqa: E402
from ftsam_plugin.purify import time_to_purify  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
SEEDS = (0, 1, 2)
RETUNE_POISON = 5
# column -> the run tags without their seed suffix (`<tag>_s<seed>`), in the table's order; a column reads the
# first tag an attack has runs of (the CPU recommendation ran in the `cheap` group on BadNets/Blended, in the seed
# table on LF)
SETTINGS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("FT 100 ep", ("ft_e100",)),
    ("FT 20 ep", ("ft_e20",)),
    ("FT-SAM ρ4 20 ep", ("ftsam_rho4_e20",)),
    ("FT-SAM ρ auto 20 ep", ("ftsam_rhoauto_e20",)),
    ("FT-SAM ρ4 SAM 1-5 of 15 ep", ("cheap_ftsam_rho4_sam1-5_e15", "ftsam_rho4_sam1-5_e15")),
    ("FT-SAM ρ4 SAM 1-5 of 20 ep", ("cheap_ftsam_rho4_sam1-5_e20",)),
)


def stem_of(runs: Dict[Tuple[str, str], dict], attack: str, column: str) -> str:
    """The tag stem behind `column` for `attack`: the first of the column's stems with a run on it."""
    stems = dict(SETTINGS)[column]
    return next((st for st in stems if any((attack, f"{st}_s{s}") in runs for s in SEEDS)), stems[0])


def load_runs(folder: str) -> Dict[Tuple[str, str], dict]:
    """{(attack, tag): summary} of the study's finished runs."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "*.json"))):
        with open(path) as handle:
            item = json.load(handle)
        out[(item["run"]["attack"], item["tag"])] = item
    return out


def load_retune(folder: str) -> Dict[Tuple[str, str], Dict[int, List[float]]]:
    """{(record, model): {poison_num: [ASR after retuning, one per retuning seed]}}."""
    out: Dict[Tuple[str, str], Dict[int, List[float]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "*", "*.json"))):
        with open(path) as handle:
            r = json.load(handle)
        out.setdefault((r["record"], r["model"]), {}).setdefault(r["poison_num"], []).append(r["after"]["asr"])
    return out


def last_eval(item: dict) -> dict:
    return [r for r in item["rows"] if r.get("test_acc") is not None][-1]


def mean(values: Sequence[float]) -> Optional[float]:
    return statistics.mean(values) if values else None


def build(runs: Dict[Tuple[str, str], dict], retune: Dict[Tuple[str, str], Dict[int, List[float]]], opts
          ) -> Tuple[lb.Table, Dict[Tuple[str, str], List[dict]]]:
    """The leaderboard table (one row per attack record) and, per (record, column), the seed runs behind each cell."""
    attacks = sorted({attack for attack, _ in runs})
    rows, cells, behind = [], {}, {}
    for attack in attacks:
        some = next(i for (a, _), i in runs.items() if a == attack)
        record = some["record"]
        info = lb.RecordInfo(path=record, name=record, dataset="cifar10", model="preactresnet18", attack=attack,
                             defenses={}, label=record)
        rows.append(info)
        bd = some["backdoored"]
        none = lb.Entry(info, lb.NO_DEFENSE, record, acc=bd["test_acc"], asr=bd["test_asr"], ra=bd["test_ra"],
                        source=f"defense_cpu_runs/{attack}/*.json: the record's attack_df.csv, last row")
        fill_retune(none, retune.get((record, "none"), {}))
        cells[(record, lb.NO_DEFENSE)] = none
        for column, _ in SETTINGS:
            stem = stem_of(runs, attack, column)
            got = [runs[(attack, f"{stem}_s{s}")] for s in SEEDS if (attack, f"{stem}_s{s}") in runs]
            if not got:
                continue
            lasts = [last_eval(i) for i in got]
            entry = lb.Entry(info, column, record, acc=mean([m["test_acc"] for m in lasts]),
                             asr=mean([m["test_asr"] for m in lasts]), ra=mean([m["test_ra"] for m in lasts]),
                             der=mean([der(bd["test_acc"], m["test_acc"], bd["test_asr"], m["test_asr"])
                                       for m in lasts]),
                             source=f"defense_cpu_runs/{attack}/{stem}_s{{{','.join(str(i['run']['seed']) for i in got)}}}"
                                    ".json: mean of the last evaluations",
                             purify=time_to_purify(got[0]["rows"]) if got[0]["run"]["seed"] == 0 else None)
            entry.purify_checked = True  # the rows are the run's own, from its summary (not a CSV found beside it)
            entry.protocol = "ours, " + ", ".join(sorted({i["run"].get("protocol", "fixed") for i in got}))
            fill_retune(entry, retune.get((record, f"{stem}_s0"), {}))
            cells[(record, column)] = entry
            behind[(record, column)] = got
    columns = [c for c, _ in SETTINGS if any((r.label, c) in cells for r in rows)]
    table = lb.Table("cifar10", "preactresnet18", rows, [lb.NO_DEFENSE, *columns], cells,
                     metrics=lb.table_metrics(opts))
    # the average row only where every record has the column: an average over different sets of attacks would
    # not compare
    table.average = {d: {m: (lb._mean(table.value(r.label, d, m) for r in rows)
                             if all((r.label, d) in cells for r in rows) else None) for m in table.metrics}
                     for d in table.defenses}
    lb._mark_best(table, opts.best_axis)
    return table, behind


def fill_retune(entry: lb.Entry, asr: Dict[int, List[float]]) -> None:
    """P-ASR and control ASR of a seed-0 model: the mean over its retuning seeds."""
    entry.pasr, entry.casr = mean(asr.get(RETUNE_POISON, [])), mean(asr.get(0, []))
    if asr:
        entry.retune_source = (f"retune_cpu_runs: {len(asr.get(RETUNE_POISON, []))} attack / {len(asr.get(0, []))} "
                               "control runs of the seed-0 model")


def spread(values: Sequence[float]) -> str:
    """'mean ± sample std (n)' in percent."""
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f} (1)"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f} ({len(pct)})"


def seeds_section(table: lb.Table, behind: Dict[Tuple[str, str], List[dict]],
                  retune: Dict[Tuple[str, str], Dict[int, List[float]]]) -> List[str]:
    """Per (attack, setting): ACC / ASR over the defense seeds, P-ASR of the seed-0 model over the retuning seeds, and
    each seed's time to purify."""
    lines = ["## Over seeds, with P-ASR and time to purify", "",
             "ACC, ASR: mean ± sample standard deviation over the defense seeds (n). P-ASR: the seed-0 model, mean ± "
             "sample standard deviation over the retuning seeds (n): one model per cell, so its spread is the "
             "retuning's, not the defense's. Time to purify (`ftsam_plugin.purify`, from each run's per-epoch "
             "rows): the first evaluated epoch from which ASR stays ≤ 5% to the end, with the training seconds up "
             "to it as logged (a shared 2-core machine: seconds are indicative; `schedule_cost.md` times the "
             "schedules side by side); exact to within the run's evaluation interval.", "",
             "| attack | defense | seeds | ACC | ASR | P-ASR (seed-0 model) | time to purify, per seed | ASR evaluated "
             "every |", "|---|---|---|---|---|---|---|---|"]
    for r in table.rows:
        for column in table.defenses[1:]:
            got = behind.get((r.label, column))
            if not got:
                continue
            lasts = [last_eval(i) for i in got]
            stem = got[0]["tag"].rsplit("_s", 1)[0]  # the tag without its seed: the column's stem for this attack
            pasr = retune.get((r.label, f"{stem}_s0"), {}).get(RETUNE_POISON, [])
            purify = [time_to_purify(i["rows"]) for i in got]
            lines.append(f"| {r.attack} | {column} | {', '.join(str(i['run']['seed']) for i in got)} | "
                         f"{spread([m['test_acc'] for m in lasts])} | {spread([m['test_asr'] for m in lasts])} | "
                         f"{spread(pasr) if pasr else '–'} | {'; '.join(p.when() for p in purify)} | "
                         f"{', '.join(sorted({str(p.eval_every) for p in purify}))} |")
    return lines + [""]


def header(runs: Dict[Tuple[str, str], dict]) -> List[str]:
    machines = sorted({i.get("machine", "?") for i in runs.values()})
    return ["# CPU study as a leaderboard (CIFAR-10, PreAct-ResNet18 width 0.25)", "",
            "**How it was made**: `python benchmarks/leaderboard_cpu.py`, from the committed run summaries alone "
            "(`defense_cpu_runs/`, `retune_cpu_runs/`; the defended models are not kept), with "
            "`ftsam_plugin.leaderboard`'s tables, formatting and outputs. `ftsam leaderboard` would evaluate the "
            "models themselves; here each cell is what the runs logged: the mean over defense seeds 0–2 of each "
            "run's last evaluation (DER per seed, then averaged), P-ASR / control ASR of the seed-0 model (mean over "
            "retuning seeds 42–44; `—` where that model was not attacked). The average row has a value only in the "
            "columns every record has, so it compares like with like. Time to purify in the leaderboard's own table "
            "below: the seed-0 run; every seed's is in the last section. Setups: `defense_cpu.md` (attacks 15 epochs, "
            "10% poison; defenses on 5% clean data, CIFAR-10 config); runs made on: " + "; ".join(machines) + ".", ""]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=os.path.join(RESULTS, "defense_cpu_runs"))
    parser.add_argument("--retune", default=os.path.join(RESULTS, "retune_cpu_runs"))
    parser.add_argument("--out", default=os.path.join(RESULTS, "leaderboard_cpu"))
    args = parser.parse_args(argv)
    opts = argparse.Namespace(out=args.out, retune=True, metric="all", best_axis="row", summary_row="last")
    runs, retune = load_runs(args.runs), load_retune(args.retune)
    if not runs:
        print(f"error: no run summaries under {args.runs}; pass --runs <defense_cpu_runs folder>", file=sys.stderr)
        return 2
    table, behind = build(runs, retune, opts)
    os.makedirs(args.out, exist_ok=True)
    paths = lb.write_outputs([table], opts)
    text = "\n".join(header(runs)) + lb.render_markdown([table], opts).split("\n", 1)[1] + "\n" + "\n".join(
        seeds_section(table, behind, retune))
    lb.atomic_write_text(paths["markdown"], lb.printable(text))
    for kind, path in paths.items():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
