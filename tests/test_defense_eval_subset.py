"""`--eval_subset N` (defense/subsets.py, FineTune.evaluate): the evaluations before the last epoch measure fixed
class-balanced test subsets, under their own columns; the last one the whole test sets; the weights do not change."""

import argparse

import pytest
import torch

from ftsam_plugin.defense.ftsam import FineTune
from ftsam_plugin.defense.subsets import fixed_eval_subsets
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import safe_load
from ftsam_plugin.metrics import evaluate_backdoor

from helpers import check_error, clone_record, make_attack_record, run_cli
from test_defense_schedule import read_csv

FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.2", "--batch_size", "8", "--num_workers", "0"]


class Labelled(torch.utils.data.TensorDataset):
    """A clean test set with a `targets` list (read without opening images), or a poisoned one with the clean
    test indices its images come from."""

    def __init__(self, *tensors, targets=None, original=None):
        super().__init__(*tensors)
        if targets is not None:
            self.targets = list(targets)
        if original is not None:
            self.original_index_array = list(original)


def sets(n=40, classes=4, target=0):
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    clean = Labelled(x, labels, targets=labels.tolist())
    original = [i for i in range(n) if int(labels[i]) != target]  # BackdoorBench drops the target class
    idx = torch.tensor(original)
    bd = Labelled(x[idx] + 1.0, torch.full((len(idx),), target), idx, torch.ones(len(idx)), labels[idx],
                  original=original)
    return clean, bd, labels


def first_of_each(labels, per):
    """The first `per` positions of each label, in index order (written out by hand)."""
    seen, chosen = {}, []
    for i, label in enumerate(labels):
        if seen.get(label, 0) < per:
            seen[label] = seen.get(label, 0) + 1
            chosen.append(i)
    return chosen


def test_the_subsets_are_the_first_images_of_each_class():
    clean, bd, labels = sets()
    clean_idx, bd_idx = fixed_eval_subsets(clean, bd, 8)
    assert clean_idx == first_of_each(labels.tolist(), 8 // 4)
    bd_sources = [int(labels[i]) for i in bd.original_index_array]
    assert bd_idx == first_of_each(bd_sources, 8 // 3)  # 3 source classes: 2 poisoned images of each
    assert fixed_eval_subsets(clean, bd, 8) == (clean_idx, bd_idx)  # no draw
    with pytest.raises(FtsamError, match="eval_subset 3"):
        fixed_eval_subsets(clean, bd, 3)


def test_evaluate_uses_the_subsets_except_for_the_whole_evaluation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    clean, bd, labels = sets()
    args = FineTune.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--yaml_path", "cpu", "--device", "cpu", "--eval_subset", "8"])
    defense = FineTune(args)
    defense.set_devices()
    defense.result = {"clean_test": clean, "bd_test": bd}
    bd_sources = [int(labels[i]) for i in bd.original_index_array]
    Subset = torch.utils.data.Subset
    by_hand = evaluate_backdoor(net, Subset(clean, first_of_each(labels.tolist(), 2)),
                                Subset(bd, first_of_each(bd_sources, 2)), batch_size=256)
    whole = evaluate_backdoor(net, clean, bd, batch_size=256)
    part = defense.evaluate(net, whole=False)  # under their own columns: test_* stay whole-set values
    assert part == {"subset_test_acc": by_hand["acc"], "subset_test_asr": by_hand["asr"],
                    "subset_test_ra": by_hand["ra"]}
    full = defense.evaluate(net, whole=True)
    assert (full["test_acc"], full["test_asr"], full["test_ra"]) == (whole["acc"], whole["asr"], whole["ra"])
    assert not any(k.startswith("subset_") for k in full)
    assert (by_hand["acc"], by_hand["ra"]) != (whole["acc"], whole["ra"])  # the subsets really differ


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("evalsub"), name="rec", n_per_class=10, epochs=1)


def test_a_run_with_eval_subset_trains_the_same_weights_and_ends_on_the_whole_test_sets(record):
    runs = []
    for extra in ([], ["--eval_subset", "20"]):
        rec = clone_record(record, f"rec_{len(extra)}")
        code, _, err = run_cli(["defend", "--result_file", str(rec), "--defense", "ftsam", *FLAGS, "--epochs", "2",
                                "--eval_every", "1", *extra])
        assert code == 0, err
        runs.append((safe_load(rec / "defense" / "ftsam" / "defense_result.pt")["model"],
                     read_csv(rec / "defense" / "ftsam" / "ftsam_df.csv")))
    (plain_w, plain_rows), (sub_w, sub_rows) = runs
    for key in plain_w:
        assert torch.equal(plain_w[key], sub_w[key]), key
    assert [r["test_acc"] != "" for r in sub_rows] == [False, True]  # test_*: the whole test sets only
    assert [r["subset_test_acc"] != "" for r in sub_rows] == [True, False] and "subset_test_acc" not in plain_rows[0]
    for key in ("test_acc", "test_asr", "test_ra"):
        assert sub_rows[-1][key] == plain_rows[-1][key]
    assert set(sub_rows[0]) - set(plain_rows[0]) == {"subset_test_acc", "subset_test_asr", "subset_test_ra"}
    assert set(plain_rows[0]) <= set(sub_rows[0])


def test_a_bad_eval_subset_gets_one_line(record):
    check_error(run_cli(["defend", "--result_file", str(record), *FLAGS, "--epochs", "1", "--eval_subset", "0"]),
                "eval_subset", whole=False)
