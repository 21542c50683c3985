"""`ftsam attack` end to end through ftsam_plugin.cli.main on tiny synthetic data."""

import csv

import numpy as np
import torch

from ftsam_plugin.attacks.triggers import blended_pattern
from ftsam_plugin.data import load_attack_result
from ftsam_plugin.data.datasets import build_clean_datasets
from helpers import make_attack_record, make_image_folder, run_cli

COLUMNS = ["", "epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc", "train_acc_clean_only",
           "train_asr_bd_only", "train_ra_bd_only", "clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch",
           "test_acc", "test_asr", "test_ra"]


def test_blended_record_via_cli_and_existing_folder_refused(tmp_path):
    record = make_attack_record(tmp_path, name="blend", attack="blended", n_per_class=10,
                                extra_args=["--pratio", "0.2", "--attack_target", "3", "--blended_alpha", "0.3"])
    with open(record / "attack_df.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == COLUMNS and len(rows) == 2
    with open(record / "attack_df_summary.csv") as f:
        assert [r[0] for r in csv.reader(f)][1:] == ["last", "valid_max", "exist_nan_value"]
    result = load_attack_result(record)
    _, test = build_clean_datasets("cifar10", tmp_path / "data" / "cifar10")
    assert result["bd_train"].poison_indicator.sum() == 20  # round(0.2 * 100)
    img, label, idx, flag, orig = result["bd_test"].wrapped_dataset[0]
    assert label == 3 and flag == 1 and orig != 3
    ref = np.round(0.7 * np.asarray(test[idx][0], np.float64) + 0.3 * blended_pattern(32, 32)).astype(np.uint8)
    assert np.array_equal(np.asarray(img), ref)

    code, out, err = run_cli(["attack", "--dataset_path", str(tmp_path / "data"), "--record_root",
                              str(tmp_path / "record"), "--save_folder_name", "blend", "--device", "cpu"])
    assert code == 2 and "already exists" in err and err.count("\n") == 1


def test_yaml_defaults_and_cli_priority(tmp_path):
    make_image_folder(tmp_path / "data" / "cifar10", n_per_class=6, classes=10, n_test_per_class=2)
    (tmp_path / "cfg.yaml").write_text("attack: badnet\npratio: 0.5\nepochs: 3\nbatch_size: 32\namp: False\n")
    code, out, err = run_cli([
        "attack", "--yaml_path", str(tmp_path / "cfg.yaml"), "--epochs", "1", "--dataset_path", str(tmp_path / "data"),
        "--record_root", str(tmp_path / "record"), "--save_folder_name", "y", "--width", "0.125", "--device", "cpu",
        "--num_workers", "0", "--progress", "False"])
    assert code == 0, err
    raw = torch.load(tmp_path / "record" / "y" / "attack_result.pt", weights_only=False)
    assert raw["bd_train"]["poison_indicator"].sum() == 30  # pratio from the YAML
    with open(tmp_path / "record" / "y" / "attack_df.csv") as f:
        assert len(list(csv.reader(f))) == 2  # epochs from the command line


def test_bad_arguments_exit_2_without_a_folder(tmp_path):
    make_image_folder(tmp_path / "data" / "cifar10", n_per_class=1, classes=10)
    base = ["attack", "--dataset_path", str(tmp_path / "data"), "--record_root", str(tmp_path / "record"),
            "--device", "cpu", "--save_folder_name", "x"]
    assert run_cli(base + ["--pratio", "1.5"])[0] == 2
    assert run_cli(base + ["--model", "nonexistent"])[0] == 2
    assert run_cli(["attack", "--dataset_path", str(tmp_path / "nowhere"), "--device", "cpu"])[0] == 2
    assert run_cli(base + ["--progress", "maybe"])[0] == 2  # not silently False
    (tmp_path / "bad.yaml").write_text("pratio: [0.1\n")
    code, _, err = run_cli(base + ["--yaml_path", str(tmp_path / "bad.yaml")])
    assert code == 2 and "is not valid YAML" in err and err.count("\n") == 1
    if not torch.cuda.is_available():  # like `ftsam defend`: an error naming the fix, not a silent CPU run
        code, _, err = run_cli(base + ["--device", "cuda"])
        assert code == 2 and "pass --device cpu" in err and err.count("\n") == 1
    assert not (tmp_path / "record" / "x").exists()
