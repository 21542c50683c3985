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
