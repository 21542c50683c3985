"""FT-SAM and the FT baseline end to end on a tiny CPU record: CLI, entry points, BackdoorBench layout, resume."""

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftsam_plugin.defense.ftsam import FTSAM
from ftsam_plugin.io import safe_load
from ftsam_plugin.models import create_model

from helpers import make_attack_record, run_cli

FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.2", "--batch_size", "8", "--num_workers", "0"]


class Interrupt(KeyboardInterrupt):
    pass


def defense_entry_points():
    """{name: entry point} of the group `backdoorbench.defenses` (Python 3.9's entry_points() has no group=)."""
    try:
        from importlib_metadata import entry_points  # the backport, if installed
    except ImportError:
        from importlib.metadata import entry_points
    try:
        eps = entry_points(group="backdoorbench.defenses")
    except TypeError:  # 3.9: a dict of group -> entry points
        eps = entry_points().get("backdoorbench.defenses", ())
    return {ep.name: ep for ep in eps}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    root = tmp_path_factory.mktemp("defense")
    return make_attack_record(root, name="rec", n_per_class=10, epochs=1)


@pytest.fixture(scope="module")
def full_run(record):
    """An uninterrupted 3-epoch FT-SAM run through `ftsam defend` (evaluation every 2 epochs + the last)."""
    code, out, err = run_cli(["defend", "--result_file", str(record), *FLAGS, "--epochs", "3", "--eval_every", "2"])
    assert code == 0, err
    folder = record / "defense" / "ftsam"
    return folder, safe_load(folder / "defense_result.pt", what="defense result")


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_outputs_in_backdoorbench_layout(record, full_run):
    folder, result = full_run
    for rel in ("defense_result.pt", "ftsam_df.csv", "ftsam_df_summary.csv", "acc_like_metric_plots.png",
                "log/index.txt"):
        assert (folder / rel).is_file(), rel
    # the checkpoint is only for resuming an unfinished run: removed once the result is written (the folder stays)
    assert (folder / "checkpoint").is_dir() and not (folder / "checkpoint" / "last.pt").exists()
    assert len(list((folder / "log").glob("*.log"))) == 1
    # defense_result.pt: exactly BackdoorBench's keys, loadable into the stock architecture
    assert set(result) == {"model_name", "num_classes", "model"}
    model = create_model(result["model_name"], num_classes=result["num_classes"], width=0.125)
    model.load_state_dict(result["model"])
    attack = safe_load(record / "attack_result.pt")
    assert any(not torch.equal(result["model"][k], attack["model"][k]) for k in result["model"])
    # per-epoch CSV with BackdoorBench's columns; epoch 1 not evaluated (eval_every 2), epochs 2 and 3 are
    rows = read_csv(folder / "ftsam_df.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {"train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
            "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra", "lr", "rho"} <= set(rows[0])
    assert rows[0]["test_acc"] == "" and rows[1]["test_acc"] != "" and rows[2]["test_asr"] != ""
    assert rows[0]["clean_test_loss_avg_over_batch"] == "" and float(rows[2]["bd_test_loss_avg_over_batch"]) > 0
    assert float(rows[1]["clean_test_loss_avg_over_batch"]) > 0
    # the lr used in each epoch: one cosine over the whole run (T_max = epochs), stepped after the epoch
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01, 0.01 * (1 + 0.5) / 2, 0.01 * (1 - 0.5) / 2])
    summary = read_csv(folder / "ftsam_df_summary.csv")
    assert [r[""] for r in summary] == ["last", "valid_max", "exist_nan_value"]
    assert summary[0]["test_acc"] == rows[2]["test_acc"]
    # the class-balanced subset: 2 per class of the 100 training samples
    idx = [int(v) for v in (folder / "log" / "index.txt").read_text().split()]
    assert len(idx) == len(set(idx)) == 20


def test_resume_gives_the_uninterrupted_weights(record, full_run, monkeypatch):
    _, expected = full_run

    def stop(self, epoch):
        if epoch == 2:
            raise Interrupt()

    argv = ["defend", "--result_file", str(record), *FLAGS, "--epochs", "3", "--eval_every", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(FTSAM, "_after_epoch", stop)
        code, _, _ = run_cli(argv)
    assert code == 130  # interrupted after epoch 2's checkpoint
    folder = record / "defense" / "ftsam"
    assert safe_load(folder / "checkpoint" / "last.pt", what="checkpoint")["epoch"] == 2
    code, _, err = run_cli([*argv, "--resume"])
    assert code == 0, err
    got = safe_load(folder / "defense_result.pt")
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert [r["epoch"] for r in read_csv(folder / "ftsam_df.csv")] == ["1", "2", "3"]


def test_entry_points_run_both_defenses_backdoorbench_style(record, full_run, monkeypatch):
    found = defense_entry_points()
    assert {"ftsam", "ft-baseline"} <= set(found)
    cls = found["ft-baseline"].load()
    assert cls.name == "ft-baseline" and found["ftsam"].load() is FTSAM
    folder = _run_backdoorbench_style(cls, record, monkeypatch, epochs=2)
    assert (folder / "defense_result.pt").is_file() and (folder / "ft-baseline_df.csv").is_file()
    assert len(read_csv(folder / "ft-baseline_df.csv")) == 2
    assert "rho" not in read_csv(folder / "ft-baseline_df.csv")[0]
    # FT and FT-SAM fine-tune on the same clean subset
    ftsam_idx = (full_run[0] / "log" / "index.txt").read_text()
    assert (folder / "log" / "index.txt").read_text() == ftsam_idx


def test_python_m_entry_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ftsam_plugin.defense.ftsam", "--result_file", str(tmp_path / "x"),
                           "--yaml_path", "cpu", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no attack_result.pt") and proc.stderr.strip().count("\n") == 0


def test_entry_point_runs_ftsam_backdoorbench_style(record, monkeypatch):
    cls = defense_entry_points()["ftsam"].load()
    assert cls is FTSAM
    folder = _run_backdoorbench_style(cls, record, monkeypatch, epochs=1)
    rows = read_csv(folder / "ftsam_df.csv")
    assert len(rows) == 1 and float(rows[0]["rho"]) == 2.0 and rows[0]["test_acc"] != ""
    assert set(safe_load(folder / "defense_result.pt")) == {"model_name", "num_classes", "model"}


def test_cli_runs_the_ft_baseline(record):
    (record / "defense" / "ft-baseline" / "ft-baseline_df.csv").unlink(missing_ok=True)
    existed = (record / "defense" / "ft-baseline" / "checkpoint" / "last.pt").is_file()
    code, _, err = run_cli(["defend", "--defense", "ft-baseline", "--result_file", str(record), *FLAGS,
                            "--epochs", "1"])
    assert code == 0, err
    assert ("will be overwritten (starting from epoch 1" in err) == existed  # a warning names an old checkpoint
    folder = record / "defense" / "ft-baseline"
    rows = read_csv(folder / "ft-baseline_df.csv")
    assert len(rows) == 1 and "rho" not in rows[0] and rows[0]["test_asr"] != ""
    assert (folder / "defense_result.pt").is_file()


def _run_backdoorbench_style(cls, record, monkeypatch, epochs):
    """Run a defense class as BackdoorBench runs its own (add_arguments -> construct -> defense) from the folder
    holding record/; returns its output folder."""
    monkeypatch.chdir(record.parent.parent)  # the folder holding record/, as in a BackdoorBench checkout
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    args = parser.parse_args(["--result_file", "rec", *FLAGS, "--epochs", str(epochs)])
    out = cls(args).defense(args.result_file)
    assert isinstance(out["model"], torch.nn.Module)
    return Path(f"record/rec/defense/{cls.name}")
