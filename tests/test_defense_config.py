"""Defense config, loss and subset selection: fast unit tests (no record, no training)."""

import argparse
import logging

import numpy as np
import pytest
import torch
import yaml

from ftsam_plugin.defense import config
from ftsam_plugin.defense.ddp import resolve_device
from ftsam_plugin.defense.losses import smooth_crossentropy
from ftsam_plugin.defense.subsets import choose_by_class, class_balanced_subset, read_index_file
from ftsam_plugin.defense.ftsam import FTSAM, FineTune
from ftsam_plugin.errors import FtsamError


# ---- Reference: BackdoorBench's smoothing written out per sample (independent of the implementation) ----
def reference_smooth_ce(logits, target, eps):
    logits = logits.double()
    n, c = logits.shape
    out = []
    for i in range(n):
        logp = torch.log_softmax(logits[i], 0)
        q = torch.full((c,), eps / (c - 1), dtype=torch.float64)
        q[target[i]] = 1 - eps
        out.append(sum(float(q[j]) * (np.log(float(q[j])) - float(logp[j])) for j in range(c) if q[j] > 0))
    return float(np.mean(out))


def parse(argv):
    parser = argparse.ArgumentParser()
    FTSAM.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smooth_crossentropy_matches_reference(eps):
    logits = torch.randn(7, 5)
    target = torch.randint(0, 5, (7,))
    got = float(smooth_crossentropy(logits, target, eps))
    assert got == pytest.approx(reference_smooth_ce(logits, target, eps), rel=1e-5, abs=1e-6)


def test_smooth_crossentropy_differs_from_torch_label_smoothing():
    # BackdoorBench puts eps/(C-1) on wrong classes; torch puts eps/C: the gradients differ
    logits = torch.randn(4, 10, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    g_ours = torch.autograd.grad(smooth_crossentropy(logits, target, 0.1), logits)[0]
    g_torch = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1), logits)[0]
    assert not torch.allclose(g_ours, g_torch, atol=1e-4)
    # the gradient of KL(q||p) is p - q (batch mean)
    q = torch.full((4, 10), 0.1 / 9)
    q[torch.arange(4), target] = 0.9
    torch.testing.assert_close(g_ours, (torch.softmax(logits.detach(), 1) - q) / 4)


def test_no_argparse_default_beats_the_yaml():
    args = parse([])
    assert all(v is None for v in vars(args).values())


def test_yaml_applies_and_only_given_flags_override():
    ftsam = FTSAM(parse(["--dataset", "gtsrb", "--device", "cpu"]))  # packaged gtsrb.yaml, no record
    assert (ftsam.args.rho, ftsam.args.label_smoothing, ftsam.args.epochs) == (8.0, 0.0, 50)
    assert ftsam.args.adaptive is True and ftsam.args.protocol == "fixed" and ftsam.args.restore == "copy"
    ftsam = FTSAM(parse(["--dataset", "gtsrb", "--device", "cpu", "--rho", "3", "--adaptive", "false",
                         "--num_workers", "2"]))
    assert (ftsam.args.rho, ftsam.args.adaptive, ftsam.args.num_workers, ftsam.args.epochs) == (3.0, False, 2, 50)
    ft = FineTune(parse(["--dataset", "cifar10", "--device", "cpu", "--client_optimizer", "sgd", "--pin_memory", "0"]))
    assert (ft.args.client_optimizer, ft.args.pin_memory, ft.args.rho) == ("sgd", False, 2.0)


@pytest.mark.parametrize("name,rho,epochs", [("cifar10", 2.0, 100), ("cifar100", 2.0, 100), ("gtsrb", 8.0, 50),
                                             ("tiny", 8.0, 100), ("cpu", 2.0, 2)])
def test_packaged_configs(name, rho, epochs):
    cfg = yaml.safe_load(config.packaged_config(name).read_text())
    assert set(cfg) <= config.KNOWN_KEYS
    assert (cfg["rho"], cfg["epochs"], cfg["amp"]) == (rho, epochs, False)
    assert cfg["lr_scheduler"] == "CosineAnnealingLR"


def test_bb_aliases_rho_max_and_protocol_restore(tmp_path):
    path = tmp_path / "bb.yaml"
    path.write_text("device: cpu\nrho_max: 8.0\nrho_min: 8.0\nepochs: 3\nprotocol: backdoorbench\n")
    ftsam = FTSAM(parse(["--yaml_path", str(path)]))
    # the protocol runs the reference's effective rho 2 (its YAML rho_max was dead); restore by subtraction
    assert ftsam.args.rho == 2.0 and ftsam.args.restore == "subtract"
    assert FTSAM(parse(["--yaml_path", str(path), "--protocol", "fixed"])).args.rho == 8.0  # the alias applies
    assert FTSAM(parse(["--yaml_path", str(path), "--rho_max", "5"])).args.rho == 5.0
    assert FTSAM(parse(["--yaml_path", str(path), "--rho_max", "5", "--rho", "1"])).args.rho == 1.0


def test_unknown_yaml_keys_warn(tmp_path, caplog):
    path = tmp_path / "x.yaml"
    path.write_text("device: cpu\nrhoo: 3\nfoo_bar: 1\n")
    with caplog.at_level(logging.WARNING, logger="ftsam_plugin.defense"):
        FTSAM(parse(["--yaml_path", str(path)]))
    assert "foo_bar, rhoo" in caplog.text


@pytest.mark.parametrize("argv,needle", [
    (["--rho", "0"], "rho must be a finite number > 0, got 0.0"),
    (["--rho", "-1"], "rho must be a finite number > 0"),
    (["--ratio", "0"], "ratio must be a finite number in (0, 1]"),
    (["--ratio", "1.5"], "ratio must be a finite number in (0, 1]"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--batch_size", "0"], "batch_size must be an integer >= 1"),
    (["--alpha", "inf"], "alpha must be a finite number"),
])
def test_validation_errors(argv, needle):
    with pytest.raises(FtsamError) as info:
        FTSAM(parse(["--yaml_path", "cpu", *argv]))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_yaml_and_missing_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("device: cpu\nrho: [1, 2\n")
    with pytest.raises(FtsamError, match="not valid YAML"):
        FTSAM(parse(["--yaml_path", str(path)]))
    with pytest.raises(FtsamError, match="cannot read config"):
        FTSAM(parse(["--yaml_path", str(tmp_path / "none.yaml")]))


def test_bool_flags_reject_garbage():
    with pytest.raises(SystemExit):
        parse(["--adaptive", "maybe"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_names_the_fix():
    with pytest.raises(FtsamError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(FtsamError, match="--device cpu"):
        FTSAM(parse(["--yaml_path", "cpu", "--device", "cuda"]))
    with pytest.raises(FtsamError, match="torchrun"):
        resolve_device("cuda:0,1")


def test_subset_backdoorbench_protocol_equals_reference():
    labels = np.random.default_rng(1).integers(0, 4, size=200)
    ratio, seed, c = 0.3, 7, 4
    # ---- Reference: BackdoorBench's choose_by_class after fix_random (global numpy RNG) ----
    np.random.seed(seed)
    by_class = [[i for i, y in enumerate(labels) if y == k] for k in range(c)]
    expected = []
    for k in range(c):
        expected += np.random.choice(by_class[k], int(len(labels) * ratio / c), replace=False).tolist()
    assert choose_by_class(labels, c, ratio, seed) == expected


def test_subset_fixed_is_balanced_and_seeded():
    labels = np.repeat(np.arange(5), 30)
    idx = class_balanced_subset(labels, 5, 0.2, seed=3)
    assert len(idx) == len(set(idx)) == 30
    assert np.bincount(labels[idx]).tolist() == [6] * 5
    assert idx == class_balanced_subset(labels, 5, 0.2, seed=3)
    assert idx != class_balanced_subset(labels, 5, 0.2, seed=4)


def test_subset_impossible_names_the_class():
    labels = np.array([0] * 50 + [1] * 50 + [2] * 2)
    with pytest.raises(FtsamError, match="class 2 has 2 training samples"):
        class_balanced_subset(labels, 3, 0.3, seed=0)


def test_index_file(tmp_path):
    path = tmp_path / "idx.txt"
    path.write_text("3\n1\n4\n")
    assert read_index_file(str(path), 10) == [3, 1, 4]
    with pytest.raises(FtsamError, match="outside"):
        read_index_file(str(path), 4)


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def prepared(argv, net):
    defense = FTSAM(parse(["--yaml_path", "cpu", "--device", "cpu", *argv]))
    defense.set_devices()
    defense.setup_training(net)
    return defense


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_amp_is_really_used(dtype):
    net = tiny_net()
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    defense = prepared(["--amp", "true", "--amp_dtype", dtype], net)
    assert (defense.scaler is not None) == (dtype == "fp16")
    before = [p.detach().clone() for p in net.parameters()]
    defense.train_step(net, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    want = torch.bfloat16 if dtype == "bf16" else torch.float16
    assert seen == [want, want]  # both SAM passes ran under autocast
    assert all(p.dtype == torch.float32 for p in net.parameters())
    if dtype == "bf16":
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_fp16_grad_scaler_steps_on_finite_grads_and_skips_inf():
    net = tiny_net()
    defense = prepared(["--amp", "true", "--amp_dtype", "fp16"], net)
    defense.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # small: no overflow on the first step
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in net.parameters()]
    defense.train_step(net, x, y)
    assert defense.scaler.get_scale() == 16.0  # finite grads: no back-off
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the step was taken
    good_loss = defense.loss_fn
    for bad_pass in (1, 2):  # an inf in either SAM pass: the step is skipped, the weights stay exactly as they were
        calls = []

        def loss_fn(logits, target):
            calls.append(1)
            return good_loss(logits, target) * (float("inf") if len(calls) == bad_pass else 1.0)

        defense.loss_fn = loss_fn
        before = [p.detach().clone() for p in net.parameters()]
        scale = defense.scaler.get_scale()
        defense.train_step(net, x, y)
        assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())), bad_pass
        assert defense.scaler.get_scale() < scale, bad_pass


def test_schedules_fixed_vs_backdoorbench_protocol():
    fixed = prepared(["--epochs", "7"], tiny_net())
    assert fixed.scheduler.T_max == 7 and not fixed.step_per_batch
    assert fixed.scheduler.optimizer is fixed.optimizer.base_optimizer
    bb = prepared(["--epochs", "7", "--protocol", "backdoorbench"], tiny_net())
    assert bb.scheduler.T_max == 100 and bb.step_per_batch and bb.args.restore == "subtract"
    plateau = prepared(["--lr_scheduler", "ReduceLROnPlateau", "--protocol", "backdoorbench"], tiny_net())
    assert plateau.plateau and not plateau.step_per_batch  # stepped once per epoch with the train loss
    # BackdoorBench's ft: the T_max = 100 cosine stepped once per epoch, plain cross-entropy
    ft = FineTune(parse(["--yaml_path", "cpu", "--device", "cpu", "--epochs", "7", "--protocol", "backdoorbench"]))
    ft.set_devices()
    ft.setup_training(tiny_net())
    assert ft.scheduler.T_max == 100 and not ft.step_per_batch and ft.args.label_smoothing == 0.0
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert float(ft.loss_fn(logits, target)) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)),
                                                              rel=1e-5)
    ft = FineTune(parse(["--yaml_path", "cpu", "--device", "cpu", "--protocol", "backdoorbench",
                         "--label_smoothing", "0.2"]))
    assert ft.args.label_smoothing == 0.2  # given on the command line: kept


def test_backdoorbench_protocol_uses_the_references_effective_sam_values(tmp_path, caplog):
    path = tmp_path / "gtsrb_like.yaml"  # the reference's gtsrb/tiny YAML values, which it never applied
    cfg = dict(yaml.safe_load(config.packaged_config("cpu").read_text()), rho=8.0, label_smoothing=0.0, adaptive=False)
    path.write_text(yaml.safe_dump(cfg))  # (a key given twice is an error)
    fixed = FTSAM(parse(["--yaml_path", str(path), "--device", "cpu"]))
    assert (fixed.args.rho, fixed.args.label_smoothing, fixed.args.adaptive) == (8.0, 0.0, False)
    bb = FTSAM(parse(["--yaml_path", str(path), "--device", "cpu", "--protocol", "backdoorbench"]))
    assert (bb.args.rho, bb.args.label_smoothing, bb.args.adaptive, bb.args.eta) == (2.0, 0.1, True, 0.0)
    assert bb.args.protocol_overrides == {"rho": (8.0, 2.0), "label_smoothing": (0.0, 0.1), "adaptive": (False, True),
                                          "rho_min": (None, 2.0), "rho_schedule": ("constant", "proportional")}
    given = FTSAM(parse(["--yaml_path", str(path), "--device", "cpu", "--protocol", "backdoorbench", "--rho", "8",
                         "--label_smoothing", "0"]))
    assert (given.args.rho, given.args.label_smoothing, given.args.adaptive) == (8.0, 0.0, True)
    alias = FTSAM(parse(["--yaml_path", str(path), "--device", "cpu", "--protocol", "backdoorbench",
                         "--rho_max", "4"]))
    assert alias.args.rho == 4.0


def test_non_finite_loss_stops_with_epoch_and_step():
    net = tiny_net()
    defense = prepared(["--batch_size", "2"], net)
    calls = []

    def loss_fn(logits, y):
        calls.append(1)
        scale = float("nan") if len(calls) > 2 else 1.0  # finite for step 1 (two SAM passes), NaN at step 2
        return torch.nn.functional.cross_entropy(logits, y) * scale

    defense.loss_fn = loss_fn
    data = torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(FtsamError, match="non-finite loss at epoch 4 step 2"):
        defense.train_epoch(net, data, epoch=4)


def test_checkpoint_round_trip_is_safe_and_checks_settings(tmp_path):
    from ftsam_plugin.io import safe_load

    net = tiny_net()
    writer = prepared(["--epochs", "5"], net)
    writer.train_step(net, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    writer.scheduler.step()
    path = str(tmp_path / "last.pt")
    writer._save_checkpoint(path, 2, net, [3, 1, 2], [{"epoch": 1, "test_acc": None}, {"epoch": 2, "test_acc": 0.5}])
    assert safe_load(path, what="checkpoint")["epoch"] == 2  # weights_only: no pickled objects inside
    expected_next = (torch.rand(3), float(np.random.rand()))  # the RNG streams right after the save
    fresh = tiny_net()
    reader = prepared(["--epochs", "5"], fresh)
    start, history = reader._load_checkpoint(path, fresh, [3, 1, 2])
    got_next = (torch.rand(3), float(np.random.rand()))
    assert torch.equal(got_next[0], expected_next[0]) and got_next[1] == expected_next[1]
    assert (start, history[1]["test_acc"]) == (3, 0.5)
    for a, b in zip(net.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert reader.optimizer.state_dict()["state"].keys() == writer.optimizer.state_dict()["state"].keys()
    assert reader.scheduler.last_epoch == 1
    with pytest.raises(FtsamError, match="epochs=5"):
        prepared(["--epochs", "4"], tiny_net())._load_checkpoint(path, tiny_net(), [3, 1, 2])
    with pytest.raises(FtsamError, match="another clean subset"):
        prepared(["--epochs", "5"], tiny_net())._load_checkpoint(path, tiny_net(), [1, 2, 3])
    with pytest.raises(FtsamError, match="run without --resume"):
        reader._load_checkpoint(str(tmp_path / "none.pt"), fresh, [3, 1, 2])
