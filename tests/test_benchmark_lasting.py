"""benchmarks/lasting.py's report: its arithmetic on hand-worked fixtures, and lasting.md regenerates from the committed
run files."""

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def lasting():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("lasting")


def test_worst_after_epoch_10_and_p_asr_are_max_and_sample_std():
    study = lasting()
    along = [{"epoch": 0, "asr": 1.0}, {"epoch": 5, "asr": 0.30}, {"epoch": 10, "asr": 0.02},
             {"epoch": 15, "asr": 0.07}, {"epoch": 20, "asr": 0.04}]
    assert study.worst_after(along) == 0.07  # epochs before 10 (the backdoored model, the purifying start) excluded
    assert study.worst_after(along[:3], first_epoch=11) is None
    # hand-worked: 10, 20, 40 % -> 23.33 ± 15.28 (sample std; population 12.47)
    retune = {"runs": [{"poison_num": 5, "seed": s, "after": {"asr": a}} for s, a in ((42, 0.1), (43, 0.2), (44, 0.4))]
              + [{"poison_num": 0, "seed": 42, "after": {"asr": 0.05}}]}
    assert study.p_asr(retune, 5) == "23.33 ± 15.28 (n=3)"
    assert study.p_asr(retune, 0) == "5.00 (n=1)"
    assert study.p_asr(None, 5) == "–"


def test_report_regenerates_from_the_committed_files(tmp_path, monkeypatch):
    study = lasting()
    committed = (BENCH / "results" / "lasting.md").read_text(encoding="utf-8")
    monkeypatch.setattr(study, "REPORT", str(tmp_path / "lasting.md"))
    assert study.cmd_report(None) == 0
    assert (tmp_path / "lasting.md").read_text(encoding="utf-8") == committed
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in
                                                                    (BENCH / "results").glob("lasting_*.png"))


def test_a_run_naming_a_config_uses_it_instead_of_cifar10():
    module = lasting()
    rule = ["--defense", "ftsam", "--yaml_path", "cifar10_lasting", "--epochs", "100"]
    args = module.base_flags("DATA", rule) + rule
    assert args[args.index("--yaml_path") + 1] == "cifar10_lasting" and args.count("--yaml_path") == 1
    plain = module.base_flags("DATA", ["--defense", "ft"])
    assert plain[plain.index("--yaml_path") + 1] == "cifar10"


def test_the_setting_table_pools_seeds_and_reads_a_grid_cells_own_evaluations():
    module = lasting()
    retune = {"runs": [{"poison_num": 5, "after": {"asr": a}} for a in (0.04, 0.08)]
              + [{"poison_num": 0, "after": {"asr": 0.02}}]}
    machine = {"cpu": "AMD EPYC test", "threads": 1, "torch": "x"}
    snap = {"summary": {"rows": [{"epoch": "100", "test_acc": "0.70", "test_asr": "0.02", "train_time_s": "100"}],
                        "machine": machine},
            "analysis": {"along": [{"epoch": 5, "asr": 0.5}, {"epoch": 10, "asr": 0.03}, {"epoch": 100, "asr": 0.02}]},
            "retune": retune}
    cell_rows = [{"epoch": "5", "test_acc": "", "test_asr": "", "subset_test_asr": "0.9"},
                 {"epoch": "50", "test_acc": "", "test_asr": "", "subset_test_asr": "0.07"},
                 {"epoch": "100", "test_acc": "0.74", "test_asr": "0.01", "subset_test_asr": "", "train_time_s": "300"}]
    cell = {"summary": {"rows": cell_rows, "machine": machine}, "analysis": None, "retune": None}
    other = {"summary": {"rows": [{"epoch": "100", "test_acc": "0.1", "test_asr": "0.9"}], "machine": machine},
             "analysis": None, "retune": None}  # seed 3 again, without the snapshots' analysis: not counted
    for first, second in ((snap, other), (other, snap)):  # in either order of their tags
        lines = module.setting_rows("nothing", {"rule_e100_s3": first, "lasting_rule_e100_s4": cell,
                                                "lasting_rule_e100_s3": second})
        assert lines[2] == ("| rule_e100 | 3, 4 | 72.00 ± 2.83 | 1.50 ± 0.71 | 5.00 ± 2.83 (7.00), n=2 | "
                            "6.00 ± 2.83 (n=2) | 2.00 | 200 |")


def test_collect_turns_a_finished_grid_cell_into_a_run_summary(tmp_path, monkeypatch):
    import argparse
    import json
    import textwrap

    from ftsam_plugin.provenance import git_commit
    from helpers import make_attack_record, run_cli

    module = lasting()
    name = "cifar10_preactresnet18_w0.125_badnet_e1"
    make_attack_record(tmp_path, name=name, n_per_class=8)
    grid = tmp_path / "lasting.yaml"
    grid.write_text(textwrap.dedent(f"""\
        records: {{badnet: record/{name}}}
        common: {{dataset_path: data, device: cpu, yaml_path: cpu, num_workers: 0, ratio: 0.5, batch_size: 8,
                 eval_every: 1, eval_subset: 10}}
        defenses:
          - {{group: reference, name: "lasting_ft_e{{epochs}}", defense: ft-baseline, epochs: 2}}
        """))
    monkeypatch.setattr(module, "GRID", str(grid))
    monkeypatch.setattr(module, "RECORDS", {"badnet": name})
    monkeypatch.setattr(module, "RESULTS", str(tmp_path / "runs"))
    monkeypatch.setattr(module, "COMMON_FLAGS", ("dataset_path", "device", "num_workers", "ratio", "batch_size"))
    code, out, err = run_cli(["grid", str(grid), "--executor", "debug", "--threads", "1"])
    assert code == 0, out + err
    args = argparse.Namespace(cache=str(tmp_path))
    assert module.cmd_collect(args) == 0
    path = tmp_path / "runs" / "badnet" / "lasting_ft_e2_s0.json"
    item = json.loads(path.read_text())
    first = path.stat().st_mtime_ns
    assert module.cmd_collect(args) == 0 and path.stat().st_mtime_ns == first  # written once
    assert item["flags"] == ["--defense", "ft-baseline", "--yaml_path", "cpu", "--eval_every", "1", "--eval_subset",
                             "10", "--epochs", "2", "--random_seed", "0"]
    assert [(r["subset_test_asr"] != "", r["test_asr"] != "") for r in item["rows"]] == [(True, False), (False, True)]
    assert item["commit"] == git_commit(str(BENCH.parent))  # the code the cell ran
    assert item["retune_target"] == {"result_file": f"record/{name}", "defense": "lasting_ft_e2_s0"}
    along = module.along_of({"summary": item, "analysis": None})
    assert [a["epoch"] for a in along] == [1, 2] and along[1]["asr"] == float(item["rows"][1]["test_asr"])
    assert along[0]["asr"] == float(item["rows"][0]["subset_test_asr"])
    assert module.main(["--cache", str(tmp_path), "collect"]) == 0  # the command line reaches it
