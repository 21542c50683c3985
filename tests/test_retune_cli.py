"""`ftsam retune` on a tiny synthetic record: outputs beside the attacked result, P-ASR vs a direct evaluation of the
retuned weights, the cache key, BackdoorBench-layout defense results, and bad input (one line, exit 2, nothing
written)."""

import csv
import json
import pathlib

import pytest
import torch

from ftsam_plugin import metrics
from ftsam_plugin.data.records import load_attack_result
from ftsam_plugin.io import safe_load
from ftsam_plugin.models import create_model
from ftsam_plugin.retune import RetuneSettings, measure_pasr

from helpers import Evil, make_attack_record, one_torch_thread, run_cli  # noqa: F401 (autouse fixture)

FLAGS = ["--split_ratio", "0.5", "--epochs", "2", "--device", "cpu", "--eval_batch_size", "64"]
TAG = "p5_r0.5_e2_lr0.01_m0.9_wd0_b128_s42"


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    root = tmp_path_factory.mktemp("retune_cli")
    folder = make_attack_record(root, name="rec", attack="badnet", n_per_class=10, epochs=2)
    # a defense result as BackdoorBench writes it (defense/ft-sam/, plain torch.save of the three keys)
    state = safe_load(folder / "attack_result.pt")["model"]
    gen = torch.Generator().manual_seed(1)
    noisy = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in state.items()}
    (folder / "defense" / "ft-sam").mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": noisy},
               folder / "defense" / "ft-sam" / "defense_result.pt")
    return folder


def retune(folder, *extra):
    return run_cli(["retune", "--result_file", str(folder), *FLAGS, *extra])


def model_from(path):
    model = create_model("preactresnet18", 10, width=0.125)
    model.load_state_dict(safe_load(path)["model"])
    return model


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*") if p.is_file())


def test_outputs_and_pasr_equal_direct_evaluation(record):
    code, out, err = retune(record, "--defense", "none", "--save_model")
    assert code == 0, err
    folder = record / "retune" / TAG
    assert {"retune_df.csv", "retune_df_summary.csv", "retune.log", "retune_result.pt", "summary.json"} <= set(
        files_under(folder))
    summary = json.loads((folder / "summary.json").read_text())
    loaded = load_attack_result(record)
    after = metrics.evaluate_backdoor(model_from(folder / "retune_result.pt"), loaded["clean_test"],
                                      loaded["bd_test"])
    before = metrics.evaluate_backdoor(loaded["model"], loaded["clean_test"], loaded["bd_test"])
    for m in ("acc", "asr", "ra"):
        assert summary["after"][m] == pytest.approx(after[m], abs=1e-12)
        assert summary["before"][m] == pytest.approx(before[m], abs=1e-12)
    assert summary["retune_set"] == {"size": 50, "poisoned": 5, "poisoned_positions": summary["retune_set"][
        "poisoned_positions"]} and len(summary["retune_set"]["poisoned_positions"]) == 5
    assert f"P-ASR {100 * after['asr']:.2f}" in out

    with open(folder / "retune_df.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for column in ("train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
                   "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra", "lr"):
        assert column in rows[0]
    assert rows[0]["train_acc"] == "" and float(rows[1]["lr"]) == 0.01
    assert float(rows[-1]["test_asr"]) == summary["after"]["asr"]
    log = (folder / "retune.log").read_text()
    assert "split_ratio = 0.5 (given)" in log and "poison_num = 5 (ft_poison.py --poison_num default)" in log


def test_cached_forced_and_deterministic(record):
    code, _, err = retune(record, "--defense", "none", "--save_model")
    assert code == 0, err
    summary_path = record / "retune" / TAG / "summary.json"
    first = json.loads(summary_path.read_text())
    mtime = summary_path.stat().st_mtime_ns
    code, out, err = retune(record, "--defense", "none")
    assert code == 0 and "finished earlier, same key" in out and summary_path.stat().st_mtime_ns == mtime
    code, out, err = retune(record, "--defense", "none", "--force")
    assert code == 0, err
    again = json.loads(summary_path.read_text())
    assert summary_path.stat().st_mtime_ns != mtime
    assert again["after"] == first["after"] and again["key"] == first["key"]  # same seed on CPU: same result


def test_control_and_backdoorbench_defense_result(record):
    code, _, err = retune(record, "--defense", "ft-sam", "--poison_num", "0", "--eval_every", "2")
    assert code == 0, err
    folder = record / "defense" / "ft-sam" / "retune" / "p0_r0.5_e2_lr0.01_m0.9_wd0_b128_s42"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["retune_set"]["poisoned"] == 0 and summary["defense"] == "ft-sam"
    with open(folder / "retune_df.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["test_acc"] != "" for r in rows] == [True, False, True]  # before, epoch 1 skipped, last
    code, out, err = retune(record, "--defense", "ft-sam", "--poison_num", "0", "--eval_before", "false", "--force")
    assert code == 0 and "before" not in out.split("\n", 1)[1], err
    again = json.loads((folder / "summary.json").read_text())
    assert again["before"] is None and again["after"] == summary["after"]  # evaluations do not change the run
    assert "retune_result.pt" not in files_under(folder)

    # in-process (what the demo calls): the same numbers as the files, the caller's model untouched
    loaded = load_attack_result(record)
    model = model_from(record / "defense" / "ft-sam" / "defense_result.pt")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    got = measure_pasr(model, loaded, RetuneSettings(split_ratio=0.5, epochs=2), device="cpu", eval_batch_size=64)
    assert got["c_asr"] == summary["after"]["asr"] and got["c_acc"] == summary["after"]["acc"]
    assert got["o_asr"] == summary["before"]["asr"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    code, _, err = retune(record, "--defense", "ft-sam")
    assert code == 0, err
    attacked = json.loads((record / "defense" / "ft-sam" / "retune" / TAG / "summary.json").read_text())
    assert got["p_asr"] == attacked["after"]["asr"] and got["p_ra"] == attacked["after"]["ra"]
    quick = measure_pasr(model, loaded, RetuneSettings(split_ratio=0.5, epochs=2), control=False,
                         evaluate_before=False, eval_batch_size=64)
    assert set(quick) == {"p_acc", "p_asr", "p_ra", "seconds"} and quick["p_asr"] == got["p_asr"]


def check_error(result, needle):
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("extra, needle", [
    (["--defense", "nosuch"], "no defense result"),
    (["--defense", "none", "--poison_num", "11", "--split_ratio", "1.0"],
     "more than the record's 10 poisoned training images"),
    (["--defense", "none", "--poison_num", "5", "--split_ratio", "0.04"], "more than the 4 retuning samples"),
    (["--defense", "none", "--split_ratio", "0"], "--split_ratio 0.0 is outside (0, 1]"),
    (["--defense", "none", "--split_ratio", "1.5"], "--split_ratio 1.5 is outside (0, 1]"),
    (["--defense", "none", "--epochs", "0"], "--epochs 0 must be >= 1"),
    (["--defense", "none", "--eval_every", "0"], "eval_every must be an integer >= 1, got 0; fix --eval_every"),
    (["--defense", "none", "--device", "tpu9"], "unknown device"),
])
def test_bad_input_one_line_nothing_written(record, extra, needle):
    before = files_under(record)
    check_error(retune(record, *extra), needle)
    assert files_under(record) == before


def test_missing_record_and_unsafe_result(record, tmp_path):
    check_error(run_cli(["retune", "--result_file", str(tmp_path / "nothing"), "--defense", "none"]),
                "does not exist")
    marker = tmp_path / "pwned"
    evil = record / "defense" / "evil"
    evil.mkdir()
    try:
        torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": Evil(str(marker))},
                   evil / "defense_result.pt")
        before = files_under(record)
        check_error(retune(record, "--defense", "evil"), "not on the safe list")
        assert not marker.exists() and files_under(record) == before
    finally:
        for path in evil.iterdir():
            path.unlink()
        evil.rmdir()


def test_interrupted_run_is_unfinished_and_runs_again(record, monkeypatch):
    from ftsam_plugin.retune import runs

    folder = record / "retune" / "p5_r0.5_e1_lr0.01_m0.9_wd0_b128_s42"
    real = runs.retune_model

    def interrupted(*args, on_epoch=None, **kwargs):
        on_epoch([{"epoch": 0, "test_acc": 0.5}])  # one CSV row written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "retune_model", interrupted)
    code, _, err = run_cli(["retune", "--result_file", str(record), "--defense", "none", *FLAGS[:2], "--epochs", "1",
                            "--device", "cpu"])
    assert code == 130 and "has no summary.json (unfinished)" in err and "Traceback" not in err, err
    assert (folder / "retune_df.csv").exists() and not (folder / "summary.json").exists()
    monkeypatch.setattr(runs, "retune_model", real)
    code, out, err = run_cli(["retune", "--result_file", str(record), "--defense", "none", *FLAGS[:2], "--epochs",
                              "1", "--device", "cpu"])
    assert code == 0 and "finished earlier" not in out, err
    assert json.loads((folder / "summary.json").read_text())["settings"]["epochs"] == 1
