"""The CPU study (benchmarks/defense_cpu.py) on `ftsam grid`: its plan is the grid file, each cell's folder is the
run's tag, and a finished cell becomes the committed summary the report reads."""

import json
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import make_attack_record, run_cli

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def study():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import defense_cpu

    yield defense_cpu
    defense_cpu.plan_cells.cache_clear()


def test_the_plan_is_the_grid_file(study):
    plan = study.full_plan()
    assert len(plan) == 80 and len({(r.attack, r.tag) for r in plan}) == 80
    assert plan[0] == study.Run("blended", "ftsam", 20, 0, rho="4", eval_every=5, group="seeds")
    assert plan[53] == study.Run("badnet", "ftsam", 100, 0, rho="2", eval_every=10, group="sweep")
    assert plan[54:56] == [study.Run("blended", "ftsam", 10, s, rho="4", eval_every=1, group="cheap") for s in (1, 2)]
    lf = [r for r in plan if r.attack == "lf"]  # issue 28: 4 settings x seeds 0-2, all in the seed table
    assert len(lf) == 12 and {r.group for r in lf} == {"seeds"} and {r.seed for r in lf} == {0, 1, 2}
    assert {r.tag[:-3] for r in lf} == {"ft_e100", "ft_e20", "ftsam_rho4_e20", "ftsam_rho4_sam1-5_e15"}
    sig = [r for r in plan if r.attack == "sig"]  # the same four settings on SIG, the clean-label control
    assert sorted((r.tag, r.group) for r in sig) == sorted((r.tag, r.group) for r in lf)
    assert [r.tag for r in study.cheap_plan()][:3] == ["cheap_ftsam_rho4_e20_s0", "cheap_ftsam_rho4_sam1-5_e20_s0",
                                                       "cheap_ft_e100_s0"]
    assert len(study.quick_plan()) == 8


def test_the_study_runs_only_the_cells_without_a_committed_summary(study, tmp_path, monkeypatch):
    import ftsam_plugin.cli

    calls = []
    monkeypatch.setattr(ftsam_plugin.cli, "main", lambda argv: calls.append(argv) or 0)
    plan = study.plan_cells("full")
    for run, _ in plan[1:]:  # every run has its summary but the first
        (tmp_path / run.attack).mkdir(exist_ok=True)
        (tmp_path / run.attack / f"{run.tag}.json").write_text(json.dumps({"run": {"attack": run.attack},
                                                                            "tag": run.tag}))
    assert study.run_grid(study.MODES["full"], 2, 1, str(tmp_path)) == 0
    argv = calls[0]
    assert argv[0] == "grid" and argv[argv.index("--workers") + 1] == "2"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--only"] == [plan[0][1].label]
    (tmp_path / plan[0][0].attack / f"{plan[0][0].tag}.json").write_text(json.dumps(
        {"run": {"attack": plan[0][0].attack}, "tag": plan[0][0].tag}))
    assert study.run_grid(study.MODES["full"], 2, 1, str(tmp_path)) == 0 and len(calls) == 1  # nothing left


def test_a_finished_cell_becomes_the_summary_the_report_reads(study, tmp_path, monkeypatch):
    make_attack_record(tmp_path, name="cifar10_preactresnet18_w0.125_badnet_e1", n_per_class=8)
    grid = tmp_path / "plan.yaml"
    grid.write_text(textwrap.dedent("""\
        records: {badnet: record/cifar10_preactresnet18_w0.125_badnet_e1}
        common: {dataset_path: data, device: cpu, yaml_path: cpu, num_workers: 0, ratio: 0.5, batch_size: 8}
        defenses:
          - {group: seeds, name: "ftsam_rho{rho}_e{epochs}", defense: ftsam, rho: 4, epochs: 1, eval_every: 1}
        """))
    monkeypatch.setitem(study.GRIDS, "full", str(grid))
    study.plan_cells.cache_clear()
    code, out, err = run_cli(["grid", str(grid), "--executor", "debug", "--threads", "1"])
    assert code == 0, out + err
    results = tmp_path / "runs"
    assert study.collect(study.MODES["full"], str(results)) == 1
    assert study.collect(study.MODES["full"], str(results)) == 0  # written once
    item = json.loads((results / "badnet" / "ftsam_rho4_e1_s0.json").read_text())
    cell = json.loads((tmp_path / "record" / "cifar10_preactresnet18_w0.125_badnet_e1" / "defense" /
                       "ftsam_rho4_e1_s0" / "grid_cell.json").read_text())
    assert item["run"] == {"attack": "badnet", "defense": "ftsam", "epochs": 1, "seed": 0, "rho": "4",
                           "protocol": "fixed", "eval_every": 1, "group": "seeds", "sam_every": None,
                           "sam_prob": None, "sam_epochs": None, "unlearn": None}
    assert item["rows"][-1]["test_acc"] == pytest.approx(cell["result"]["acc"])
    assert item["threads"] == 1 and item["provenance"] == cell["machine"] and item["machine"].endswith("1 thread")
    assert item["wall_s"] == cell["wall_s"] and item["subset_size"] == 40 and not item["resumed"]
    out = tmp_path / "report.md"
    study.write_report(study.MODES["full"], study.full_plan(), str(results), str(tmp_path), str(out))
    assert "1/1 runs of the plan finished" in out.read_text()
