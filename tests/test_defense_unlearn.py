"""`--unlearn uap` (defense/unlearn.py): the scan finds a planted shortcut class, a training step's added images and
UAP update against a hand computation, resume bit for bit, the per-epoch signal, and bad settings."""

import math
import shutil
import time

import pytest
import torch

from ftsam_plugin.defense.ftsam import FTSAM
from ftsam_plugin.defense.unlearn import TRAIN_STEP_SIZE, L2UapUnlearning, UapUnlearning, create_unlearner
from ftsam_plugin.io import safe_load

from helpers import check_error, cpu_yaml, make_attack_record, run_cli, without_clock_columns
from test_defense_schedule import Interrupt, read_csv

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.2", "--batch_size", "8", "--num_workers", "0"]


class Shortcut(torch.nn.Module):
    """A classifier with a planted shortcut: class `target`'s logit grows fast with the pixels' brightness (any
    images, whatever their class); the logits read a fixed random projection of the signs of BatchNorm's output
    (a small perturbation flips few of them: no other class is easy to reach). BatchNorm is there so that a pass in
    train mode would move its running statistics."""

    def __init__(self, target: int, num_classes: int = 10):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.bn = torch.nn.BatchNorm2d(3)
        self.proj = torch.nn.Parameter(torch.randn(num_classes, 3 * 8 * 8, generator=gen) * 0.1)
        self.target = target

    def forward(self, x):
        z = self.bn(x)
        logits = torch.sign(z).flatten(1) @ self.proj.t()
        bright = (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).mean((1, 2, 3))
        shortcut = torch.zeros_like(logits)
        shortcut[:, self.target] = 200.0 * (bright - 0.52)
        return logits + shortcut


def images(n=200, seed=1):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 8, 8, generator=gen) * 0.5 + 0.25  # mean brightness about 0.5
    x = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.arange(n) % 10


@pytest.mark.parametrize("target", [3, 7])
def test_scan_finds_the_planted_shortcut_class(target):
    model = Shortcut(target).train()
    x, y = images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    un = UapUnlearning(8 / 255, 0.25, 10, MEAN, STD, seed=0)
    assert un.scan(model, x, y) == target == un.target
    assert un.success[target] > 60 and max(s for c, s in enumerate(un.success) if c != target) < 40
    assert float(un.delta.abs().max()) == pytest.approx(8 / 255)  # at the radius, not past it
    assert model.training  # its mode back, its weights and BatchNorm statistics untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.proj.grad is None


class PatchShortcut(Shortcut):
    """The shortcut reads one pixel (a patch trigger's shape): class `target` wins where that pixel is near white."""

    def forward(self, x):
        logits = torch.sign(self.bn(x)).flatten(1) @ self.proj.t()
        pixel = x[:, :, 0, 0] * torch.tensor(STD).view(1, 3) + torch.tensor(MEAN).view(1, 3)
        shortcut = torch.zeros_like(logits)
        shortcut[:, self.target] = 40.0 * (pixel.mean(1) - 0.85)
        return logits + shortcut


def test_an_l2_uap_finds_a_patch_shortcut_that_an_linf_one_misses():
    x, y = images()
    linf = create_unlearner("uap", eps=None, frac=0.25, num_classes=10, mean=MEAN, std=STD, seed=0)
    l2 = create_unlearner("uap-l2", eps=None, frac=0.25, num_classes=10, mean=MEAN, std=STD, seed=0)
    assert isinstance(l2, L2UapUnlearning) and l2.eps == pytest.approx(2.0) and linf.eps == pytest.approx(10 / 255)
    linf.scan(PatchShortcut(5), x, y)
    assert linf.success[5] < 5  # 10/255 per pixel cannot whiten one pixel
    assert l2.scan(PatchShortcut(5), x, y) == 5 and l2.success[5] > 90
    assert float(l2.delta.norm()) <= 2.0 + 1e-5
    assert float(l2.delta.abs().max()) > 0.3  # concentrated on the shortcut's pixel


def test_an_l2_step_is_the_normalised_gradient_projected_to_the_ball():
    from test_defense_ddp import tiny_net  # a conv net: the gradient's size differs from pixel to pixel

    model = tiny_net().train()
    x, _ = images(8, seed=4)
    y = torch.arange(8) % 3
    un = L2UapUnlearning(0.5, 0.25, 3, MEAN, STD)
    un.target, un.delta = 1, torch.full((1, 3, 8, 8), 0.06)  # norm 0.06 * sqrt(192) = 0.83: outside, projected
    ref = tiny_net().eval()
    d = un.delta.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(ref(un.apply(x[:2], d)), torch.full((2,), 1))
    (g,) = torch.autograd.grad(loss, d)
    moved = un.delta - TRAIN_STEP_SIZE * 0.5 * g / g.norm()
    want = moved * (0.5 / moved.norm())
    un.augment(model, x, y)
    assert torch.allclose(un.delta, want, atol=1e-7) and float(un.delta.norm()) == pytest.approx(0.5)


def test_apply_adds_in_pixels_and_clips_to_valid_pixels():
    un = UapUnlearning(0.1, 0.25, 10, MEAN, STD)
    pixels = torch.tensor([0.0, 0.5, 0.95]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    x = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    delta = torch.tensor([-0.1, 0.1, 0.1]).view(1, 3, 1, 1)
    got = un.apply(x, delta) * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    want = torch.tensor([0.0, 0.6, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(got, want, atol=1e-6)


def test_augment_step_against_a_hand_computation():
    """The batch grows by ceil(frac * n) images: x[:k] carrying the UAP after one signed step towards the suspect
    class (taken in eval mode), at their own labels; the model's weights, grads, BN statistics and mode unchanged."""
    model = Shortcut(3).train()
    x, y = images(10, seed=2)
    un = UapUnlearning(8 / 255, 0.25, 10, MEAN, STD)
    un.target = 3
    un.delta = torch.full((1, 3, 8, 8), 2 / 255)
    un.delta[0, 0, 0, 0] = -8 / 255
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # by hand: the eval-mode gradient of CE(model(x[:3] + delta), 3) w.r.t. delta, a signed step, the projection
    k = math.ceil(0.25 * 10)
    ref = Shortcut(3)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    d = un.delta.clone().requires_grad_(True)
    pix = (x[:k] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1) + d).clamp(0, 1)
    loss = torch.nn.functional.cross_entropy(ref((pix - torch.tensor(MEAN).view(1, 3, 1, 1))
                                                 / torch.tensor(STD).view(1, 3, 1, 1)), torch.full((k,), 3))
    (g,) = torch.autograd.grad(loss, d)
    new_delta = (un.delta - TRAIN_STEP_SIZE * (8 / 255) * g.sign()).clamp(-8 / 255, 8 / 255)
    old_delta = un.delta.clone()
    xa, ya = un.augment(model, x, y)
    assert xa.shape[0] == 10 + k and torch.equal(ya, torch.cat([y, y[:k]]))
    assert torch.equal(xa[:10], x)
    assert torch.equal(un.delta, new_delta)
    assert torch.equal(xa[10:], un.apply(x[:k], new_delta))
    assert model.training and model.proj.grad is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    metrics = un.epoch_metrics()  # the share of UAP images (not of class 3) sent to class 3, by the UAP before the step
    with torch.no_grad():
        pred = ref(un.apply(x[:k], old_delta)).argmax(1)
    keep = y[:k] != 3
    assert metrics["unlearn_class"] == 3
    assert metrics["unlearn_success"] == pytest.approx(100.0 * float((pred[keep] == 3).float().mean()))
    assert math.isnan(un.epoch_metrics()["unlearn_success"])  # reset


def test_the_signal_counts_each_step_with_the_uap_it_started_from():
    model = Shortcut(3)

    def rate(un, x, y):  # % of the images not of class 3 that x + the UAP sends to class 3 (eval mode)
        with torch.no_grad():
            pred = model.eval()(un.apply(x, un.delta)).argmax(1)
        return 100.0 * float((pred[y != 3] == 3).float().mean())

    for seed in range(200):  # a batch whose count changes with the step: the test can tell before from after
        x, y = images(40, seed=seed)
        un = UapUnlearning(8 / 255, 0.25, 10, MEAN, STD)
        un.target, un.delta = 3, torch.full((1, 3, 8, 8), 1 / 255)
        k = math.ceil(0.25 * len(x))
        before = rate(un, x[:k], y[:k])
        un.augment(model.train(), x, y)
        if rate(un, x[:k], y[:k]) != before:
            break
    else:
        pytest.fail("no batch whose count the step changes")
    assert un.epoch_metrics()["unlearn_success"] == pytest.approx(before)


def test_augment_before_scan_is_an_error():
    with pytest.raises(RuntimeError, match="before scan"):
        UapUnlearning(0.03, 0.25, 10, MEAN, STD).augment(Shortcut(0), *images(4))


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("unlearn"), name="rec", n_per_class=10, epochs=1)


def test_run_logs_the_scan_and_the_signal_and_resumes_bit_for_bit(record, monkeypatch):
    full, resumed = record.parent / "full", record.parent / "resumed"
    for folder in (full, resumed):
        shutil.copytree(record, folder, ignore=shutil.ignore_patterns("defense"))
    argv = ["--defense", "ftsam", *FLAGS, "--epochs", "3", "--eval_every", "3", "--unlearn", "uap"]
    code, _, err = run_cli(["defend", "--result_file", str(full), *argv])
    assert code == 0, err
    assert "unlearn uap: targeted-UAP success per class" in err and "suspect class" in err
    rows = read_csv(full / "defense" / "ftsam" / "ftsam_df.csv")
    assert len(rows) == 3 and all(r["unlearn_class"] == rows[0]["unlearn_class"] for r in rows)
    assert all(0 <= float(r["unlearn_success"]) <= 100 for r in rows)
    expected = safe_load(full / "defense" / "ftsam" / "defense_result.pt")["model"]

    def stop(self, epoch):
        if epoch == 1:
            raise Interrupt()

    again = ["defend", "--result_file", str(resumed), *argv]
    with monkeypatch.context() as patch:
        patch.setattr(FTSAM, "_after_epoch", stop)
        assert run_cli(again)[0] == 130
    ckpt = safe_load(resumed / "defense" / "ftsam" / "checkpoint" / "last.pt", what="checkpoint")
    assert ckpt["extra"]["unlearn"]["delta"].shape[1:] == (3, 32, 32)
    code, _, err = run_cli([*again, "--resume", "--keep_checkpoint"])
    assert code == 0, err
    assert "targeted-UAP success per class" not in err  # the UAP comes from the checkpoint, not a new scan
    got = safe_load(resumed / "defense" / "ftsam" / "defense_result.pt")["model"]
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert without_clock_columns((resumed / "defense" / "ftsam" / "ftsam_df.csv").read_text()) == \
        without_clock_columns((full / "defense" / "ftsam" / "ftsam_df.csv").read_text())
    code, _, err = run_cli([*again, "--unlearn_frac", "0.5", "--resume"])  # another setting: refused
    assert code == 2 and "was made with unlearn_frac=0.25, now 0.5" in err


def test_the_scan_counts_as_training_time_of_the_first_epoch(record, monkeypatch):
    folder = record.parent / "timed"
    shutil.copytree(record, folder, ignore=shutil.ignore_patterns("defense"))
    real_scan = UapUnlearning.scan

    def slow_scan(self, *args):  # a scan that takes at least 2 s
        time.sleep(2.0)
        return real_scan(self, *args)

    monkeypatch.setattr(UapUnlearning, "scan", slow_scan)
    code, _, err = run_cli(["defend", "--result_file", str(folder), "--defense", "ft-baseline", *FLAGS, "--epochs",
                            "2", "--unlearn", "uap"])
    assert code == 0, err
    rows = read_csv(folder / "defense" / "ft-baseline" / "ft-baseline_df.csv")
    first, second = (float(rows[0]["train_time_s"]), float(rows[1]["train_time_s"]))
    assert first >= 2.0 and second - first < 2.0  # in epoch 1's total, once
    assert float(rows[0]["wall_time_s"]) >= first


@pytest.mark.parametrize("flags,message", [
    (["--unlearn_eps", "0"], "unlearn_eps must be a finite number > 0, got 0"),
    (["--unlearn_frac", "1.5"], "unlearn_frac must be a finite number in (0, 1], got 1.5"),
])
def test_bad_settings_get_one_line(record, flags, message):
    check_error(run_cli(["defend", "--result_file", str(record), *FLAGS, "--epochs", "1", *flags]), message,
                whole=False)


def test_an_unknown_unlearner_in_the_yaml_gets_one_line(record, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(cpu_yaml(unlearn="maybe"))
    flags = ["--yaml_path", str(path), *FLAGS[2:]]
    check_error(run_cli(["defend", "--result_file", str(record), *flags, "--epochs", "1"]), "unlearn", whole=False)


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, port, outdir):
    import os

    import torch.distributed as dist

    from ftsam_plugin.defense import ddp
    from test_defense_ddp import _join, tiny_net

    _join(rank, port)
    dist.init_process_group("gloo")
    info = ddp.DistInfo(rank=rank, world_size=2)
    un = UapUnlearning(8 / 255, 0.5, 3, MEAN, STD)
    un.target, un.delta = 1, torch.zeros(1, 3, 8, 8)
    x, _ = images(6, seed=10 + rank)  # each rank its own batch
    un.augment(tiny_net().train(), x, torch.arange(6) % 3, info)
    torch.save(un.delta, os.path.join(outdir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_ranks_keep_one_uap_stepped_with_the_summed_gradient(tmp_path):
    import torch.multiprocessing as mp

    from test_defense_ddp import _free_port, tiny_net

    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    deltas = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert torch.equal(deltas[0], deltas[1])
    grads = []  # by hand: each rank's eval-mode gradient on its own first 3 images, summed, then one signed step
    for rank in range(2):
        model = tiny_net().eval()
        x, _ = images(6, seed=10 + rank)
        d = torch.zeros(1, 3, 8, 8, requires_grad=True)
        un = UapUnlearning(8 / 255, 0.5, 3, MEAN, STD)
        loss = torch.nn.functional.cross_entropy(model(un.apply(x[:3], d)), torch.full((3,), 1))
        grads.append(torch.autograd.grad(loss, d)[0])
    want = (-TRAIN_STEP_SIZE * (8 / 255) * (grads[0] + grads[1]).sign()).clamp(-8 / 255, 8 / 255)
    assert torch.equal(deltas[0], want)
    assert not torch.equal(want, (-TRAIN_STEP_SIZE * (8 / 255) * grads[0].sign()))  # the ranks' gradients differ
