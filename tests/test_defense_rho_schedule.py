"""`--rho_schedule`: rho constant, or following the lr from rho down to rho_min (BackdoorBench's ProportionScheduler).

The reference's own scheduler is run beside ours over a full run in tests/test_parity_backdoorbench.py (with
BACKDOORBENCH_ROOT); here: the rule, how flags and protocols resolve it, and that the steps really use it.
"""

import argparse
import logging

import pytest
import torch
from torch.utils.data import TensorDataset

from ftsam_plugin.defense.ftsam import FTSAM
from ftsam_plugin.defense.rho_schedule import RHO_SCHEDULES, rho_at
from ftsam_plugin.errors import FtsamError


def parse(argv):
    return FTSAM.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def built(argv, net=None):
    defense = FTSAM(parse(["--yaml_path", "cpu", "--device", "cpu", *argv]))
    defense.set_devices()
    if net is not None:
        defense.setup_training(net)
    return defense


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def test_the_rule():
    assert sorted(RHO_SCHEDULES) == ["constant", "proportional"]
    # the example: rho_max 8, rho_min 2, lr 0.01 -> 8 at the start, 5 halfway down a cosine, 2 at lr 0
    assert [rho_at("proportional", 8.0, 2.0, lr, 0.01) for lr in (0.01, 0.005, 0.0)] == [8.0, 5.0, 2.0]
    assert rho_at("constant", 8.0, 2.0, 0.005, 0.01) == 8.0
    assert rho_at("proportional", 8.0, None, 0.005, 0.01) == 8.0  # no rho_min: constant


@pytest.mark.parametrize("argv,expected", [
    # (flags, (rho, rho_min, rho_schedule)); cpu.yaml says rho 2
    ([], (2.0, None, "constant")),
    (["--rho_schedule", "proportional", "--rho", "8", "--rho_min", "2"], (8.0, 2.0, "proportional")),
    (["--rho_max", "8", "--rho_min", "2", "--rho_schedule", "proportional"], (8.0, 2.0, "proportional")),
    (["--rho_min", "2"], (2.0, 2.0, "constant")),  # rho_min = rho: a constant is what was asked
    # the reference's: ProportionScheduler from rho_max (default 2) to rho_min (default 2), --rho ignored
    (["--protocol", "backdoorbench"], (2.0, 2.0, "proportional")),
    (["--protocol", "backdoorbench", "--rho_max", "8"], (8.0, 2.0, "proportional")),
    (["--protocol", "backdoorbench", "--rho_min", "1"], (2.0, 1.0, "proportional")),
    (["--protocol", "backdoorbench", "--rho", "4"], (4.0, None, "constant")),  # ours: --rho is a constant rho
    (["--protocol", "backdoorbench", "--rho", "4", "--rho_max", "8"], (4.0, None, "constant")),
    (["--protocol", "backdoorbench", "--rho_schedule", "constant"], (2.0, 2.0, "constant")),
])
def test_flags_and_protocols_resolve_the_schedule(argv, expected):
    args = built(argv).args
    assert (args.rho, args.rho_min, args.rho_schedule) == expected


@pytest.mark.parametrize("argv,needle", [
    (["--rho_min", "1"], "rho_min 1.0 differs from rho 2.0 but rho_schedule is constant; pass --rho_schedule "
                         "proportional"),
    (["--rho_schedule", "proportional", "--rho_min", "3"], "rho_min 3.0 is above rho 2.0"),
    (["--rho", "auto", "--rho_min", "1"], "means nothing with --rho auto and a constant rho"),
    (["--rho", "auto", "--rho_min", "1", "--rho_schedule", "proportional"], "rho_min 1.0 is above rho 0.5"),
    (["--rho_min", "-1", "--rho_schedule", "proportional"], "rho_min must be a finite number > 0"),
])
def test_bad_schedules_are_one_line_errors(argv, needle):
    with pytest.raises(FtsamError) as info:
        built(argv)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_backdoorbench_protocol_notes_that_the_reference_ignores_rho():
    args = built(["--protocol", "backdoorbench", "--rho", "4"]).args
    assert args.protocol_notes == ["--rho 4.0 is applied; the reference ignores --rho and would have run rho = 2.0 "
                                   "(its --rho_max)"]
    args = built(["--protocol", "backdoorbench", "--rho", "4", "--rho_max", "8"]).args
    assert "would have run rho = 8.0" in args.protocol_notes[0]
    assert built(["--protocol", "backdoorbench", "--rho_max", "8"]).args.protocol_notes == []
    assert built(["--rho", "4"]).args.protocol_notes == []  # fixed: nothing to say


def test_the_note_goes_to_the_runs_log(tmp_path, caplog):
    defense = built(["--protocol", "backdoorbench", "--rho", "4"])
    defense.args.log = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ftsam_plugin.defense"):
        defense.set_logger()
    defense._close_logger()
    assert "protocol backdoorbench: --rho 4.0 is applied; the reference ignores --rho and would have run rho = 2.0" \
        in caplog.text
    assert "would have run rho = 2.0" in "".join(p.read_text() for p in tmp_path.glob("*.log"))


@pytest.mark.parametrize("protocol", ["fixed", "backdoorbench"])
def test_every_step_perturbs_with_the_rho_of_its_lr(protocol):
    """A whole run (3 epochs of 4 steps): the rho each SAM step perturbs with, against the rule at the lr that step
    uses; per-batch (backdoorbench, cosine T_max 100) or per-epoch (fixed, T_max = epochs) lr steps."""
    net = tiny_net()
    defense = built(["--protocol", protocol, "--rho_schedule", "proportional", "--rho", "8", "--rho_min", "2",
                     "--batch_size", "2", "--epochs", "3", "--lr", "0.01"], net)
    opt = defense.optimizer
    seen = []
    first_step = opt.first_step

    def spy(*a, **kw):
        before = [p.detach().clone() for p in net.parameters()]
        out = first_step(*a, **kw)
        # ASAM (eta 0): e = rho * w^2 * g / || |w| g ||, so || e / |w| || is the rho the kernels perturbed with
        ratios = [((p.detach() - w) / w.abs())[w != 0] for p, w in zip(net.parameters(), before)]
        applied = float(torch.linalg.vector_norm(torch.cat(ratios).double()))
        seen.append((opt.param_groups[0]["lr"], applied))
        return out

    opt.first_step = spy
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(8, 3, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    rows = []
    for epoch in range(1, 4):
        rows.append(defense.epoch_start_metrics()["rho"])
        loss, _ = defense.train_epoch(net, data, epoch)
        defense.end_epoch_schedule(loss)
    assert len(seen) == 12
    wanted = [rho_at("proportional", 8.0, 2.0, lr, 0.01) for lr, _ in seen]
    assert [rho for _, rho in seen] == pytest.approx(wanted, rel=1e-4)
    assert seen[0][0] == 0.01 and wanted[0] == 8.0
    assert len(set(wanted)) == (12 if protocol == "backdoorbench" else 3)  # it really moves
    assert rows == [wanted[0], wanted[4], wanted[8]]  # the CSV's rho: the epoch's first step's
    assert opt.plan_builds == 1  # a new rho rebuilds no kernel plan


def test_constant_schedule_keeps_rho():
    net = tiny_net()
    defense = built(["--batch_size", "4", "--rho", "3"], net)
    data = TensorDataset(torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,)))
    loss, _ = defense.train_epoch(net, data, 1)
    defense.end_epoch_schedule(loss)
    assert defense.optimizer.param_groups[0]["lr"] < 0.01 and defense.optimizer.param_groups[0]["rho"] == 3.0
