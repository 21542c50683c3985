"""Where a defense run starts: the record decides the dataset (and so the protocol's per-dataset epochs and
scheduler, whatever the YAML names), and `--checkpoint_path` starts from an earlier defense result instead of the
attack's model, as BackdoorBench's defense/ft-sam.py does."""

import argparse
import logging
import os

import pytest
import torch

from ftsam_plugin.defense.ftsam import FTSAM, FineTune
from ftsam_plugin.io import safe_load
from helpers import check_error, make_attack_record, one_torch_thread, run_cli  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("start")


@pytest.fixture(scope="module")
def gtsrb(root):
    return make_attack_record(root, name="gtsrb_rec", dataset="gtsrb", n_per_class=4, epochs=1)


@pytest.fixture(scope="module")
def cifar(root):
    return make_attack_record(root, name="cifar_rec", n_per_class=6, epochs=1)


def build(cls, record, root, *argv):
    parser = cls.add_arguments(argparse.ArgumentParser())
    return cls(parser.parse_args(["--result_file", str(record), "--dataset_path", str(root / "data"),
                                  "--device", "cpu", "--ratio", "1", *argv]))


@pytest.mark.parametrize("yaml_path", ["cpu", "cifar10"])  # no dataset in the YAML; another dataset's YAML
def test_the_records_dataset_picks_the_protocols_epochs_and_scheduler(gtsrb, root, yaml_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ftsam_plugin.defense"):
        ftsam = build(FTSAM, gtsrb, root, "--yaml_path", yaml_path, "--protocol", "backdoorbench")
        ft = build(FineTune, gtsrb, root, "--yaml_path", yaml_path, "--protocol", "backdoorbench")
    assert ftsam.args.dataset == ft.args.dataset == "gtsrb"
    assert ftsam.args.epochs == 50  # defense/ft-sam.py's config/defense/ft-sam/gtsrb.yaml
    assert (ft.args.epochs, ft.args.lr_scheduler) == (100, "CosineAnnealingLR")  # config/defense/ft/gtsrb.yaml
    assert ("config says dataset='cifar10' but the record was made with gtsrb" in caplog.text) == (yaml_path == "cifar10")
    fixed = build(FTSAM, gtsrb, root, "--yaml_path", "cpu")
    assert fixed.args.epochs == 2  # the fixed protocol imposes nothing: the YAML's


def test_checkpoint_path_starts_from_that_defense_result(cifar, root, monkeypatch):
    common = ["--result_file", str(cifar), "--dataset_path", str(root / "data"), "--yaml_path", "cpu",
              "--device", "cpu", "--epochs", "1", "--batch_size", "16", "--ratio", "0.5"]
    code, _, err = run_cli(["defend", "--defense", "ft-baseline", *common, "--lr", "0.5"])
    assert code == 0, err
    ft = safe_load(cifar / "defense" / "ft-baseline" / "defense_result.pt")["model"]
    attack = safe_load(cifar / "attack_result.pt")["model"]
    monkeypatch.chdir(root)  # BackdoorBench's form: a folder under ./record/
    code, _, err = run_cli(["defend", "--defense", "ftsam", *common, "--lr", "1e-12", "--keep_checkpoint",
                            "--checkpoint_path", "cifar_rec/defense/ft-baseline"])
    assert code == 0, err
    assert "starting from the defense result" in err and os.path.join("ft-baseline", "defense_result.pt") in err
    out = safe_load(cifar / "defense" / "ftsam" / "defense_result.pt")["model"]
    weights = [k for k in out if k.endswith("weight") and out[k].dim() == 4]
    assert weights
    for key in weights:  # lr 1e-12: the run ends where it started, FT's weights, far from the attack's
        assert torch.allclose(out[key], ft[key], rtol=1e-6, atol=1e-8), key
    assert max(float((ft[k] - attack[k]).abs().max()) for k in weights) > 1e-3
    # the run's checkpoint knows where it started: resuming from another start is refused
    code, _, err = run_cli(["defend", "--defense", "ftsam", *common, "--lr", "1e-12", "--resume"])
    check_error((code, "", err), "checkpoint_path", whole=False)


def test_bad_checkpoint_path_is_one_line(cifar, root, tmp_path):
    common = ["defend", "--defense", "ftsam", "--result_file", str(cifar), "--dataset_path", str(root / "data"),
              "--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.5"]
    line = check_error(run_cli([*common, "--checkpoint_path", str(tmp_path / "nowhere")]), "--checkpoint_path")
    assert "no defense_result.pt" in line
    junk = tmp_path / "junk" / "defense_result.pt"
    junk.parent.mkdir()
    torch.save({"model_name": "preactresnet18", "num_classes": 7, "model": {"linear.weight": torch.zeros(7, 2)}}, junk)
    line = check_error(run_cli([*common, "--checkpoint_path", str(junk.parent)]), "--checkpoint_path")
    assert "holds a preactresnet18 with 7 classes, the record a preactresnet18 with 10" in line
    torch.save({"model": {"linear.weight": torch.zeros(10, 2)}}, junk)  # BackdoorBench's keys may be missing
    assert "do not fit" in check_error(run_cli([*common, "--checkpoint_path", str(junk)]), "--checkpoint_path")
    torch.save([1, 2], junk)
    check_error(run_cli([*common, "--checkpoint_path", str(junk)]), "defense_result.pt")
