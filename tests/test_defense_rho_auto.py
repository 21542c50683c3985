"""`--rho auto`: the hold-out split, the choice rule, and that the probes leave no trace on the run."""

import csv
import shutil

import pytest
import torch

from ftsam_plugin.defense import rho_auto
from ftsam_plugin.defense.rho_auto import AutoRhoSettings, split_holdout
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import safe_load

from helpers import make_attack_record, run_cli

FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.4", "--batch_size", "8", "--num_workers", "0",
         "--epochs", "2"]


def test_split_holdout_is_class_balanced_disjoint_and_seeded():
    indices = list(range(100, 160))
    labels = [i % 3 for i in range(60)]  # 20 per class
    train, hold = split_holdout(indices, labels, 0.25, seed=7)
    assert sorted(train + hold) == indices and not set(train) & set(hold)
    held_labels = [labels[indices.index(i)] for i in hold]
    assert [held_labels.count(c) for c in range(3)] == [5, 5, 5]
    assert train == sorted(train) and hold == sorted(hold)  # the subset's order is kept
    assert split_holdout(indices, labels, 0.25, seed=7) == (train, hold)
    assert split_holdout(indices, labels, 0.25, seed=8) != (train, hold)


def test_split_holdout_refuses_a_subset_too_small():
    with pytest.raises(FtsamError, match="too small"):
        split_holdout([4, 9], [0, 1], 0.2, seed=0)  # one sample per class: nothing can be held out


def test_settings_are_checked():
    with pytest.raises(FtsamError, match="rho_auto_budget"):
        AutoRhoSettings(budget=-1).check()
    with pytest.raises(FtsamError, match="rho_auto_grid"):
        AutoRhoSettings(grid=(1.0, float("nan"))).check()
    with pytest.raises(FtsamError, match="two or more"):
        AutoRhoSettings(grid=(2.0,)).check()
    with pytest.raises(FtsamError, match="rho_auto_holdout"):
        AutoRhoSettings(holdout=1.0).check()
    assert AutoRhoSettings(grid=(4.0, 1.0, 4.0)).check().grid == (1.0, 4.0)


class _FakeDefense:
    """Just enough of a defense for choose_rho, with held-out accuracies scripted per probe."""

    def __init__(self, model, accuracies):
        import argparse

        self.args = argparse.Namespace(rho="auto", epochs=20, cos_t_max=None, random_seed=0, batch_size=4,
                                       num_workers=0)
        self.device = torch.device("cpu")
        self.model, self.accuracies, self.trained_with = model, list(accuracies), []
        self.scheduler, self.step_per_batch, self.plateau = None, False, False

    def end_epoch_schedule(self, train_loss):
        pass

    def build_train_set(self, indices):
        return list(indices)

    def setup_training(self, model):
        self.trained_with.append(self.args.rho)

    def train_epoch(self, model, train_set, epoch):
        with torch.no_grad():
            model.weight.add_(1.0)  # the probe changes the model; choose_rho must undo it
        return 0.0, 0.0


GRID = (1.0, 2.0, 4.0, 8.0)


@pytest.mark.parametrize("accuracies, budget, chosen, probed", [
    # [undefended model, then one held-out accuracy per probe]; the budget counts from the first probe's
    ([90.0, 85.0, 84.5, 83.5, 80.0], 2.0, 4.0, [1.0, 2.0, 4.0, 8.0]),  # 8 is 5 points under 85: stop there
    ([90.0, 85.0, 82.9], 2.0, 1.0, [1.0, 2.0]),  # 2 is already over: the smallest
    ([90.0, 85.0, 86.0, 85.0, 83.1], 2.0, 8.0, [1.0, 2.0, 4.0, 8.0]),  # all within: the largest
])
def test_rule_takes_the_largest_rho_within_budget(monkeypatch, accuracies, budget, chosen, probed):
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake = _FakeDefense(model, accuracies)
    monkeypatch.setattr(rho_auto, "eval_set", lambda defense, idx: list(idx))
    monkeypatch.setattr("ftsam_plugin.metrics.evaluate", lambda *a, **k: fake.accuracies.pop(0) / 100.0)
    indices, labels = list(range(20)), [i % 2 for i in range(20)]
    rng_before = torch.get_rng_state()
    rho, probes, base = rho_auto.choose_rho(fake, model, indices, labels, AutoRhoSettings(budget=budget, grid=GRID))
    assert rho == chosen and [p.rho for p in probes] == probed and fake.trained_with == probed
    assert base == pytest.approx(accuracies[0])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is restored
    assert fake.args.rho == "auto" and fake.args.epochs == 20  # and the run's settings
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("rho_auto"), name="rec", n_per_class=10, epochs=1)


def test_auto_run_logs_its_probes_and_equals_a_run_given_that_rho(record, tmp_path):
    code, _, err = run_cli(["defend", "--result_file", str(record), *FLAGS, "--rho", "auto",
                            "--rho_auto_grid", "0.5,1", "--rho_auto_epochs", "1", "--rho_auto_budget", "100"])
    assert code == 0, err
    folder = record / "defense" / "ftsam"
    log = "".join(p.read_text() for p in (folder / "log").glob("*.log"))
    assert "rho auto: rho 0.5 -> held-out accuracy" in log and "rho auto: rho 1 -> held-out accuracy" in log
    assert "rho auto: chose rho 1 " in log  # budget 100: every probe fits, the largest wins
    with open(folder / "ftsam_df.csv", newline="") as handle:
        assert {float(r["rho"]) for r in csv.DictReader(handle)} == {1.0}
    auto = safe_load(folder / "defense_result.pt", what="defense result")["model"]
    shutil.rmtree(folder)
    code, _, err = run_cli(["defend", "--result_file", str(record), *FLAGS, "--rho", "1"])
    assert code == 0, err
    fixed = safe_load(folder / "defense_result.pt", what="defense result")["model"]
    assert all(torch.equal(auto[k], fixed[k]) for k in fixed)  # the probes left no trace on the run


def test_bad_rho_and_settings_are_one_line_errors(record):
    code, _, err = run_cli(["defend", "--result_file", str(record), *FLAGS, "--rho", "big"])
    assert code == 2 and "'auto'" in err and "Traceback" not in err
    code, _, err = run_cli(["defend", "--result_file", str(record), *FLAGS, "--rho", "auto",
                            "--rho_auto_holdout", "1.5"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: rho_auto_holdout") and "Traceback" not in err
