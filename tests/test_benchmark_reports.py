"""The arithmetic of the benchmark reports, on small fixtures with numbers worked out by hand: mean ± sample standard
deviation (n - 1) over seeds (defense_cpu.py, retune_cpu.py, leaderboard_cpu.py), medians and ratios
(schedule_cost.py, vs_reference.py), and what demo_time.py reads off the demo's output."""

import argparse
import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(name):
    """A benchmarks/ script as a module (they import each other by name from that folder)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


# hand-worked: ASR 10, 20, 40 % -> mean 23.33, sample std 15.28 (population std 12.47);
# ACC 70, 75, 77 % -> 74.00 ± 3.61 (population 2.94); 1, 2, 3 % -> 2.00 ± 1.00 (population 0.82)
FT_ASR, FT_ACC = (0.10, 0.20, 0.40), (0.70, 0.75, 0.77)
SAM_ASR, SAM_ACC = (0.01, 0.02, 0.03), (0.78, 0.79, 0.80)
BACKDOORED = {"test_acc": 0.80, "test_asr": 0.95, "test_ra": 0.04}


def _summary(study, run, acc, asr):
    return {"tag": run.tag, "run": asdict(run), "record": "rec", "backdoored": BACKDOORED,
            "rows": [{"epoch": float(run.epochs), "test_acc": acc, "test_asr": asr, "test_ra": 0.5}],
            "wall_s": 600.0, "times": {"train": 10.0, "eval": 1.0, "n": 5}, "machine": "Test CPU, 2 logical CPUs",
            "threads": 1, "commit": "abc1234", "finished": "2026-01-01T00:00:00"}


def test_defense_cpu_seed_table_is_mean_and_sample_std(tmp_path):
    study = bench("defense_cpu")
    results = tmp_path / "runs"
    for seed in (0, 1, 2):
        for run, acc, asr in ((study.Run("badnet", "ft-baseline", 100, seed), FT_ACC[seed], FT_ASR[seed]),
                              (study.Run("badnet", "ftsam", 20, seed, rho="4"), SAM_ACC[seed], SAM_ASR[seed])):
            path = results / "badnet" / f"{run.tag}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_summary(study, run, acc, asr)))
    out = tmp_path / "defense_cpu.md"
    study.write_report(study.MODES["full"], study.full_plan(), str(results), str(tmp_path / "cache"), str(out))
    text = out.read_text()
    # DER per seed: [max(0, 95 - ASR) - max(0, 80 - ACC) + 1] / 2 = 87.5, 85.0, 76.0 -> 82.83 ± 6.05 (population 4.94)
    assert "| FT, 100 epochs | 3 (0, 1, 2) | 74.00 ± 3.61 | 23.33 ± 15.28 | 50.00 ± 0.00 | 82.83 ± 6.05 |" in text
    assert "| FT-SAM ρ=4, 20 epochs | 3 (0, 1, 2) | 79.00 ± 1.00 | 2.00 ± 1.00 |" in text
    assert "- seed 2: FT 100 77.00 / 40.00; FT-SAM ρ=4 80.00 / 3.00" in text
    assert "badnet: FT-SAM ASR ≤ 5%: **met** (2.00%)" in text
    assert "badnet: FT-SAM ACC ≥ FT's (100 epochs): **met** (79.00 vs 74.00)" in text
    assert "mean ± sample standard deviation over seeds" in text
    # only committed summaries: the runs of the plan that are missing are named, not read from a cache
    assert "not finished (not shown): " in text and "badnet `ft_e20_s0`" in text


def test_defense_cpu_lf_table_has_the_cpu_recommendation_row_and_the_ft_failure_check(tmp_path):
    """LF's plan runs the CPU recommendation in the seed table (not the cheap group) and no `--rho auto`: the table
    has a row per setting the attack's plan has, and the paper's premise (FT leaves >= 20%) is checked on LF."""
    study = bench("defense_cpu")
    results = tmp_path / "runs"
    for seed in (0, 1, 2):
        for run, acc, asr in ((study.Run("lf", "ft-baseline", 100, seed), FT_ACC[seed], FT_ASR[seed]),
                              (study.Run("lf", "ftsam", 15, seed, rho="4", sam_epochs="1-5", eval_every=5,
                                         group="seeds"), SAM_ACC[seed], SAM_ASR[seed])):
            path = results / "lf" / f"{run.tag}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_summary(study, run, acc, asr)))
    out = tmp_path / "defense_cpu.md"
    study.write_report(study.MODES["full"], study.full_plan(), str(results), str(tmp_path / "cache"), str(out))
    lf = out.read_text().split("## lf", 1)[1]
    assert ("| FT-SAM ρ=4, 15 epochs, SAM in epochs 1-5 (the CPU recommendation) | 3 (0, 1, 2) | 79.00 ± 1.00 | "
            "2.00 ± 1.00 |") in lf
    assert "| FT-SAM ρ=4, 20 epochs | 0 (–) |" in lf  # planned for LF, not finished here
    assert "--rho auto" not in lf.split("## ")[0]  # not in LF's plan: no empty row for it
    assert "- seed 1: FT 100 75.00 / 20.00; CPU rec. 79.00 / 2.00" in lf
    assert "lf: FT leaves ≥ 20% ASR: yes (23.33%)" in lf
    assert ("lf: the CPU recommendation's ASR ≤ 5%: **met** (2.00%), ACC ≥ FT's (100 epochs): **met** (79.00 vs "
            "74.00) (3 of 3 seeds)") in lf


def _retune_run(model, poison_num, seed, asr, acc=0.70):
    return {"record": "cifar10_preactresnet18_w0.25_badnet_e15", "attack": "badnet", "model": model,
            "poison_num": poison_num, "seed": seed, "before": {"acc": 0.77, "asr": 0.5} if poison_num else None,
            "after": {"acc": acc, "asr": asr}, "wall_s": 60.0 * (seed - 41), "command": "ftsam retune ...",
            "machine": "Test CPU, 2 logical CPUs, torch 2.x, 1 thread (shared)", "provenance": {"cpu": "Test CPU"},
            "finished": "2026-01-01T00:00:00"}


def test_retune_cpu_report_is_mean_and_sample_std_over_retuning_seeds():
    retune = bench("retune_cpu")
    runs = [_retune_run("ft_e100_s0", 5, 42 + k, FT_ASR[k]) for k in range(3)]
    runs += [_retune_run("ft_e100_s0", 0, 42 + k, SAM_ASR[k]) for k in range(3)]
    study = {"cifar10_preactresnet18_w0.25_badnet_e15": ["ft_e100_s0", "ftsam_rho8_e100_s0"]}
    text = retune.report(runs, study, [42, 43, 44], "/nonexistent")
    assert ("| FT, 100 epochs (`ft_e100_s0`) | 77.00 | 50.00 | 70.00 ± 0.00 | **23.33 ± 15.28** | 70.00 ± 0.00 | "
            "2.00 ± 1.00 | 3 / 3 |") in text
    # wall minutes 1, 2, 3 for each kind -> 2.0 ± 1.0 min
    assert "attack 2.0 ± 1.0 min, control 2.0 ± 1.0 min" in text
    # a finished study run that was not attacked is named as finished (never as unfinished)
    assert "Finished defense runs of the study not attacked: `ftsam_rho8_e100_s0`." in text


def test_schedule_cost_uses_medians_and_ratios_to_ft_100(tmp_path):
    cost = bench("schedule_cost")
    epochs = {"FT": ([10.0, 12.0], [11.0, 30.0]), "SAM": ([20.0, 22.0], [21.0, 25.0]),
              "SAM every 2nd step": ([15.0, 16.0], [15.0, 17.0]), "SAM with p=0.5": ([14.0, 15.0], [16.0, 14.0])}
    epochs.update({"FT + unlearn uap-l2": ([16.0], [18.0]), "SAM + unlearn uap-l2": ([30.0], [32.0])})  # epoch 2
    evals = {"FT": (5.0, 6.0), "SAM": (7.0, 5.0), "SAM every 2nd step": (5.0, 6.0), "SAM with p=0.5": (5.0, 9.0),
             "FT + unlearn uap-l2": (5.5, 5.5), "SAM + unlearn uap-l2": (5.5, 5.5)}
    scans = {"FT + unlearn uap-l2": (100.0, 130.0), "SAM + unlearn uap-l2": (90.0, 120.0)}  # median 110
    items = [{"kind": k, "round": r, "epochs_s": epochs[k][r], "eval_s": evals[k][r], "sam_steps": None,
              **({"scan_s": scans[k][r]} if k in scans else {})} for r in (0, 1) for k in cost.KINDS]
    args = argparse.Namespace(rounds=2, epochs=2, threads=1, load_note="")
    out = tmp_path / "schedule_cost.md"
    cost.report(items, args, str(out), {"commit": "abc1234", "machine": "Test CPU", "finished": "2026-01-01"})
    text = out.read_text()
    # medians: FT 11.5, SAM 21.5, every 2nd 15.5, p 0.5 14.5; one evaluation 5.5 (median of the 12);
    # FT-100 = 100 x 11.5 + 5.5 = 1155.5 s
    assert "| FT | 4 | 11.50 | 1.00× |" in text and "| SAM | 4 | 21.50 | 1.87× |" in text
    assert "One evaluation: 5.5 s (median of 12)." in text
    assert "| FT + unlearn uap-l2 | 2 | 17.00 | 1.48× |" in text and "scan, once before epoch 1" in text
    # the frozen rule: 5 x 31 + 95 x 17 + the scan's 110 + 5.5 = 1885.5 s, 1.632x FT-100
    assert "| 1886 | 1.632× |" in text
    assert "| FT-SAM ρ=4, 20 epochs | 20 × SAM | 436 | 0.377× |" in text  # 20 x 21.5 + 5.5 = 435.5
    assert "| FT-SAM ρ=4, SAM in epochs 1-5 only, 15 epochs | 5 × SAM + 10 × FT | 228 | 0.197× |" in text
    saved = json.loads((tmp_path / "schedule_cost.json").read_text())
    assert saved["schedules"]["FT, 100 epochs"] == pytest.approx(1.0)
    assert saved["schedules"]["FT-SAM ρ=4, SAM every 2 steps, 20 epochs"] == pytest.approx(315.5 / 1155.5)
    assert saved["machine"] == "Test CPU"  # a rewritten report keeps the machine its runs were made on


def test_vs_reference_ratios_from_raw_times():
    vs = bench("vs_reference")
    runs = [{"tag": t, "arm": arm, "profile": False, "epochs": 3, "train_rest": tr, "eval_rest": ev,
             "final": {"test_acc": 0.2, "test_asr": 0.0, "test_ra": 0.2}}
            for t, arm, tr, ev in (("r1", "reference", 21.0, 6.0), ("r1", "ours-backdoorbench", 20.0, 3.0),
                                   ("r2", "reference", 23.0, 4.0), ("r2", "ours-backdoorbench", 22.0, 5.0))]
    arms = vs.derive(runs)
    assert (arms["reference"]["train"], arms["reference"]["eval"]) == (22.0, 5.0)
    rat = vs.ratios(arms, vs.eval_images(20))  # 560 vs 380 images per evaluation
    assert rat["train"] == pytest.approx(22.0 / 21.0) and rat["eval"] == pytest.approx(5.0 / 4.0)
    assert rat["epoch"] == pytest.approx(27.0 / 25.0)
    assert rat["eval_per_image"] == pytest.approx((5.0 / 560) / (4.0 / 380))
    assert rat["epoch_equal_work"] == pytest.approx((22.0 + 5.0 * 380 / 560) / 25.0)


def test_leaderboard_cpu_spread_is_sample_std():
    board = bench("leaderboard_cpu")
    assert board.spread(FT_ASR) == "23.33 ± 15.28 (3)" and board.spread([0.5]) == "50.00 (1)"


def test_leaderboard_cpu_reads_lf_cpu_recommendation_and_averages_only_shared_columns():
    """LF's CPU recommendation ran in the seed table (`ftsam_rho4_sam1-5_e15`), BadNets' in the cheap group: both fill
    one column; a column only BadNets has gets no average (an average over different attacks would not compare)."""
    study, board = bench("defense_cpu"), bench("leaderboard_cpu")
    runs = {}
    for seed in (0, 1, 2):
        for run, asr in ((study.Run("badnet", "ft-baseline", 100, seed), FT_ASR[seed]),
                         (study.Run("lf", "ft-baseline", 100, seed), SAM_ASR[seed]),
                         (study.Run("badnet", "ftsam", 15, seed, rho="4", sam_epochs="1-5", eval_every=1,
                                    group="cheap"), FT_ASR[seed]),
                         (study.Run("lf", "ftsam", 15, seed, rho="4", sam_epochs="1-5", eval_every=5,
                                    group="seeds"), SAM_ASR[seed]),
                         (study.Run("badnet", "ftsam", 20, seed, rho="auto"), FT_ASR[seed])):
            item = dict(_summary(study, run, 0.75, asr), record=f"rec_{run.attack}")
            runs[(run.attack, run.tag)] = item
    opts = argparse.Namespace(out="unused", retune=True, metric="all", best_axis="row", summary_row="last")
    table, behind = board.build(runs, {}, opts)
    rec = "FT-SAM ρ4 SAM 1-5 of 15 ep"
    assert [i["tag"] for i in behind[("rec_lf", rec)]] == [f"ftsam_rho4_sam1-5_e15_s{s}" for s in (0, 1, 2)]
    assert table.value("rec_lf", rec, "asr") == pytest.approx(0.02)
    assert table.average[rec]["asr"] == pytest.approx((0.02 + 0.70 / 3) / 2)  # both attacks have it
    assert table.average["FT-SAM ρ auto 20 ep"]["asr"] is None  # BadNets only


DEMO_OUTPUT = """data: scikit-learn digits
seed 0 (data subset, attack, both defenses, loaders), 1 torch threads, device cpu (Test CPU: numbers differ)
[1/2] attack: blended, 10% poison ...
      done in 66 s: ACC 93.1, ASR 100.0
[2/2] FT (plain fine-tuning) and FT-SAM (ASAM, rho 1.0) side by side ...
      FT done in 28 s: ACC 93.7, ASR 93.9
      FT-SAM done in 50 s: ACC 93.7, ASR 42.1
[+] retuning attack on each model ...
      done in 4 s

blended on digits data, seed 0, FT-SAM rho 1 (percent; ...)
defense          ACC     ASR      RA     DER   P-ASR     time
no defense      93.1   100.0     0.0       -   100.0      66s
FT              93.7    93.9     4.0    53.0   100.0      28s
FT-SAM          93.7    42.1    38.1    79.0   100.0      50s
"""


def test_demo_time_reads_the_stages_and_the_table():
    parsed = bench("demo_time").parse_output(DEMO_OUTPUT)
    assert parsed["stages"] == {"attack": 66, "FT": 28, "FT-SAM": 50, "retuning (P-ASR)": 4}
    assert parsed["table"]["FT-SAM"] == ["93.7", "42.1", "38.1", "79.0", "100.0", "50s"]
    assert list(parsed["table"]) == ["no defense", "FT", "FT-SAM"]


RESULTS = BENCH / "results"


def _committed(name):
    return (RESULTS / name).read_text(encoding="utf-8")


def test_reports_regenerate_from_their_committed_data_files(tmp_path):
    """Each of these reports is exactly what its script writes from the committed data (no hand edits, nothing read
    from a local cache): demo_time, vs_reference and demo_collapse from their JSON files, retune_cpu from the
    retuning and study summaries, leaderboard_cpu from the study's summaries."""
    demo_time = bench("demo_time")
    demo_time.write_report(json.loads(_committed("demo_time.json")), str(tmp_path / "demo_time.md"))
    assert (tmp_path / "demo_time.md").read_text(encoding="utf-8") == _committed("demo_time.md")
    assert bench("vs_reference").render(json.loads(_committed("vs_reference.json"))) == _committed("vs_reference.md")
    assert bench("demo_collapse").render(json.loads(_committed("demo_collapse.json"))) == _committed("demo_collapse.md")
    retune = bench("retune_cpu")
    text = retune.report(retune.load_runs(str(RESULTS / "retune_cpu_runs")),
                         retune.study_models(str(RESULTS / "defense_cpu_runs")), [42, 43, 44], str(tmp_path))
    assert text == _committed("retune_cpu.md")
    assert bench("leaderboard_cpu").main(["--out", str(tmp_path / "board")]) == 0
    assert (tmp_path / "board" / "leaderboard.md").read_text(encoding="utf-8") == _committed(
        "leaderboard_cpu/leaderboard.md")


def test_schedule_cost_names_the_kinds_it_ran_in_its_command(tmp_path):
    cost = bench("schedule_cost")
    default = tmp_path / "x" / ".." / ".." / "schedule_cost.md"
    ns = argparse.Namespace
    assert cost.kinds_flags(ns(kinds=None), str(cost.study.REPO) + "/benchmarks/results/schedule_cost.md") == ""
    assert cost.kinds_flags(ns(kinds=list(cost.DEFAULT_KINDS)),
                            str(cost.study.REPO) + "/benchmarks/results/schedule_cost.md") == ""
    assert cost.kinds_flags(ns(kinds=["FT"]), str(default)).startswith(" --kinds FT --out ")
    flags = cost.kinds_flags(ns(kinds=["SAM", "FT + unlearn uap-l2"]),
                             str(cost.study.REPO) + "/benchmarks/results/unlearn_cost.md")
    assert flags == ' --kinds SAM "FT + unlearn uap-l2" --out benchmarks/results/unlearn_cost.md'
