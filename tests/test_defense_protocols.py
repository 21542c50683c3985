"""Protocols (`--protocol fixed|backdoorbench`) as registered recipes: what each imposes and how the pipeline obeys.

The BackdoorBench side is written out here from its code (defense/ft.py, defense/ft-sam.py, utils/choose_index.py,
config/defense/ft*/); tests/test_parity_backdoorbench.py runs the real code when BACKDOORBENCH_ROOT is set.
"""

import argparse
import random

import pytest
import torch

from ftsam_plugin.defense import config
from ftsam_plugin.defense.ftsam import FTSAM, FineTune
from ftsam_plugin.defense.protocols import PROTOCOLS, get_recipe
from ftsam_plugin.defense.subsets import SUBSET_DRAWS, choose_index, dataset_labels
from ftsam_plugin.errors import FtsamError
from helpers import run_cli


def parse(argv):
    return FTSAM.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def built(cls, argv, net=None):
    defense = cls(parse(["--yaml_path", "cpu", "--device", "cpu", *argv]))
    defense.set_devices()
    if net is not None:
        defense.setup_training(net)
    return defense


def test_every_protocol_is_a_choice_and_has_both_recipes():
    assert sorted(PROTOCOLS) == ["backdoorbench", "fixed"]
    for protocol in PROTOCOLS.values():
        for uses_sam in (True, False):
            recipe = protocol.recipe(uses_sam)
            assert recipe.subset in SUBSET_DRAWS
            assert recipe.restore in ("copy", "subtract")


def test_uniform_draw_is_backdoorbench_choose_index():
    n, ratio, seed = 1000, 0.05, 3
    # ---- Reference: utils/choose_index.choose_index after fix_random(seed) (python's global RNG) ----
    random.seed(seed)
    expected = random.sample(range(n), int(n * ratio))
    assert choose_index(n, ratio, seed) == expected
    with pytest.raises(FtsamError, match="raise --ratio"):
        choose_index(10, 0.05, seed)


def test_labels_are_read_without_opening_images():
    class NoImages(torch.utils.data.Dataset):  # BackdoorBench's GTSRB: a `labels` list, images opened per item
        labels = [0, 2, 1, 2]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise AssertionError("an image was opened")

    assert dataset_labels(NoImages()) == [0, 2, 1, 2]


def test_backdoorbench_ft_baseline_is_defense_ft():
    recipe = get_recipe("backdoorbench", uses_sam=False)
    assert recipe.subset == "uniform" and not recipe.step_per_batch and not recipe.train_loss_per_sample
    # config/defense/ft/<dataset>.yaml: gtsrb 100 epochs, tiny 200 epochs with ReduceLROnPlateau; fp16 AMP on CUDA
    for dataset, epochs, scheduler in (("cifar10", 100, "CosineAnnealingLR"), ("gtsrb", 100, "CosineAnnealingLR"),
                                       ("tiny", 200, "ReduceLROnPlateau")):
        cfg = config.validate({"dataset": dataset, "device": "cuda", "protocol": "backdoorbench", "epochs": 50,
                               "lr_scheduler": "CosineAnnealingLR", "label_smoothing": 0.1}, uses_sam=False)
        assert (cfg["epochs"], cfg["lr_scheduler"], cfg["label_smoothing"]) == (epochs, scheduler, 0.0), dataset
        assert (cfg["amp"], cfg["amp_dtype"]) == (True, "fp16")
    cpu = config.validate({"dataset": "gtsrb", "device": "cpu", "protocol": "backdoorbench", "amp": True},
                          uses_sam=False)
    assert cpu["amp"] is False  # its torch.cuda.amp autocast and GradScaler do nothing on a CPU run
    given = config.validate({"dataset": "tiny", "device": "cuda", "protocol": "backdoorbench", "epochs": 3,
                             "amp": False}, uses_sam=False, given={"epochs", "amp"})
    assert (given["epochs"], given["amp"], given["lr_scheduler"]) == (3, False, "ReduceLROnPlateau")


def test_backdoorbench_ftsam_turns_amp_off_unless_given():
    # BackdoorBench's ft-sam YAMLs say amp: True, which its code never reads
    cfg = config.validate({"dataset": "gtsrb", "device": "cuda", "protocol": "backdoorbench", "amp": True,
                           "epochs": 7}, uses_sam=True)
    assert cfg["amp"] is False and cfg["epochs"] == 50 and cfg["protocol_overrides"]["amp"] == (True, False)
    given = config.validate({"dataset": "gtsrb", "device": "cuda", "protocol": "backdoorbench", "amp": True},
                            uses_sam=True, given={"amp"})
    assert given["amp"] is True
    fixed = config.validate({"dataset": "gtsrb", "device": "cuda", "protocol": "fixed", "amp": True, "epochs": 7},
                            uses_sam=True)
    assert fixed["amp"] is True and fixed["epochs"] == 7 and fixed["protocol_overrides"] == {}


@pytest.mark.parametrize("protocol, per_sample", [("fixed", True), ("backdoorbench", False)])
def test_train_loss_column_weighting(protocol, per_sample):
    net = tiny_net()
    defense = built(FineTune, ["--batch_size", "2", "--protocol", protocol, "--epochs", "3"], net)
    seen = []
    good = defense.loss_fn

    def loss_fn(logits, y):
        loss = good(logits, y)
        seen.append((float(loss.detach()), y.numel()))
        return loss

    defense.loss_fn = loss_fn
    data = torch.utils.data.TensorDataset(torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1]))
    loss, _ = defense.train_epoch(net, data, epoch=1)
    assert [n for _, n in seen] == [2, 2, 1]
    if per_sample:  # BackdoorBench's ft-sam: AverageMeter.update(loss, bsz)
        expected = sum(v * n for v, n in seen) / 5
    else:  # BackdoorBench's ft: sum(batch_loss_list) / len(batch_loss_list)
        expected = sum(v for v, _ in seen) / 3
    assert loss == pytest.approx(expected, rel=1e-12)


def test_evaluation_runs_in_fp32_under_amp():
    net = tiny_net()
    defense = built(FTSAM, ["--amp", "true", "--amp_dtype", "bf16"], net)
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    clean = torch.utils.data.TensorDataset(x, y)
    bd = torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long), torch.arange(4), torch.ones(4), y)
    defense.result = {"clean_test": clean, "bd_test": bd}
    defense.evaluate(net)
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    defense.train_step(net.train(), x, y)
    assert set(seen) == {torch.bfloat16}  # training still under autocast


def test_bare_adaptive_flag_is_refused_with_the_fix(tmp_path):
    code, out, err = run_cli(["defend", "--result_file", str(tmp_path / "none"), "--yaml_path", "cpu",
                              "--adaptive"])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "error: --adaptive needs a value" in err and "--adaptive false" in err
    assert built(FTSAM, ["--adaptive", "false"]).args.adaptive is False
