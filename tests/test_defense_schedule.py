"""FT-SAM with cheaper SAM schedules (--sam_every, --sam_prob, --sam_epochs) end to end: today's FT-SAM at the
"every step" rule, SAM step counts, resume, config errors, DDP, and the time-to-purify outputs."""

import argparse
import csv
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftsam_plugin.defense.ftsam import FTSAM
from ftsam_plugin.io import safe_load
from ftsam_plugin.optim import SAM, freeze_bn
from ftsam_plugin.optim.schedule import step_uniform

from helpers import make_attack_record, run_cli, without_clock_columns
from test_defense_ddp import RHO, WORLD, _free_port, _join, batch, simulate, tiny_net
from test_optim_schedule import assert_close_weights, hand_ftsam_step

# 20-sample subset, batch 8: 3 steps per epoch
FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.2", "--batch_size", "8", "--num_workers", "0"]
CHEAP = ["--sam_every", "2", "--sam_prob", "0.6", "--sam_epochs", "1-3"]
STEPS_PER_EPOCH = 3


class Interrupt(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("schedule"), name="rec", n_per_class=10, epochs=1)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def defend(record, *extra, epochs=4):
    code, _, err = run_cli(["defend", "--result_file", str(record), *FLAGS, "--epochs", str(epochs),
                            "--eval_every", "2", *extra])
    assert code == 0, err
    folder = record / "defense" / "ftsam"
    return folder, safe_load(folder / "defense_result.pt")["model"], err


def expected_sam_steps(epochs, every, prob, window, seed=0):
    steps = range(epochs * STEPS_PER_EPOCH)
    return [s for s in steps if window[0] <= 1 + s // STEPS_PER_EPOCH <= window[1] and s % every == 0
            and step_uniform(seed, s) < prob]


def make_defense(*extra):
    parser = argparse.ArgumentParser()
    FTSAM.add_arguments(parser)
    args = parser.parse_args(["--yaml_path", "cpu", "--device", "cpu", "--rho", str(RHO), "--label_smoothing", "0",
                              *extra])
    return FTSAM(args)


# ---- reference: FTSAM.train_step as it was before schedules (SAM on every step) ----
def reference_train_step(defense, model, x, y):
    sam = defense.optimizer
    sam.zero_grad(set_to_none=True)
    defense.loss_fn(model(x), y).backward()
    sam.first_step(zero_grad=True)
    with freeze_bn(model):
        defense.loss_fn(model(x), y).backward()
    sam.second_step(zero_grad=True)


@pytest.mark.parametrize("flags", [[], ["--sam_every", "1", "--sam_prob", "1"]])
def test_every_step_rule_equals_todays_ftsam_bit_for_bit(flags):
    ours, ref = make_defense(*flags), make_defense()
    a, b = tiny_net(), tiny_net()
    ours.setup_training(a)
    ref.setup_training(b)
    ours.optimizer.schedule.set_epoch(1)
    for step in range(4):
        ours.train_step(a, *batch(0, step))
        reference_train_step(ref, b, *batch(0, step))
    for (key, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), key
    assert ours.optimizer.schedule.sam_steps == 4
    # both sides above use the SAM class: the same steps computed without it agree up to rounding
    c = tiny_net()
    group = ref.optimizer.param_groups[0]
    sgd = torch.optim.SGD(c.parameters(), lr=group["lr"], momentum=group["momentum"],
                          weight_decay=group["weight_decay"])
    for step in range(4):
        hand_ftsam_step(c, sgd, lambda m, x, y: ref.loss_fn(m(x), y), *batch(0, step), rho=RHO)
    assert_close_weights(a, c)


@pytest.mark.parametrize("flags", [[], ["--sam_every", "2"], ["--perturbation", "path"]])
def test_ftsam_steps_keep_their_grads_in_place(flags):
    # zeroed in place, never set to None: the grads keep their storage, and SAM's kernel plans (the Triton one
    # holds their addresses) are built once and never re-pointed (issue 32: on CUDA freed grads came back elsewhere)
    defense, model = make_defense(*flags), tiny_net()
    defense.setup_training(model)
    defense.optimizer.schedule.set_epoch(1)
    defense.train_step(model, *batch(0, 0))
    grads = [p.grad for p in model.parameters()]
    for step in range(1, 5):
        defense.train_step(model, *batch(0, step))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert defense.optimizer.grad_moves == 0 and defense.optimizer.plan_builds <= 1


def test_cli_flags_give_the_rule_and_outputs(record, monkeypatch):
    taken = []
    real_first = SAM.first_step
    monkeypatch.setattr(SAM, "first_step", lambda self, *a, **k: (taken.append(self.schedule.step),
                                                                    real_first(self, *a, **k))[1])
    folder, _, err = defend(record, *CHEAP)
    want = expected_sam_steps(4, 2, 0.6, (1, 3))
    assert taken == want  # steps 0, 2, ..., 8 in epochs 1-3, each with probability 0.6 (some are taken, not all)
    rows = read_csv(folder / "ftsam_df.csv")
    per_epoch = [sum(1 for s in want if s < e * STEPS_PER_EPOCH) for e in range(1, 5)]
    assert [int(r["sam_steps"]) for r in rows] == per_epoch and per_epoch[3] == per_epoch[2]  # epoch 4: plain
    # the time columns: cumulative, and the time to purify in the summary and the log
    train = [float(r["train_time_s"]) for r in rows]
    wall = [float(r["wall_time_s"]) for r in rows]
    assert 0 < train[0] <= train[1] <= train[2] <= train[3] and all(t <= w for t, w in zip(train, wall))
    summary = {r[""]: r for r in read_csv(folder / "ftsam_df_summary.csv")}
    assert summary["last"]["purify_eval_every"] == "2" and summary["last"]["train_time_s"] == rows[3]["train_time_s"]
    asr = [float(r["test_asr"]) for r in rows if r["test_asr"]]
    purified = summary["last"]["purify_epoch"]
    assert purified == ("never" if asr[-1] > 0.05 else ("2" if asr[0] <= 0.05 else "4"))
    assert "time to purify (ASR <= 5% from then to the end)" in err


def test_resume_with_a_schedule_equals_the_uninterrupted_run(record, monkeypatch):
    import shutil

    full, resumed = record.parent / "full", record.parent / "resumed"  # beside it: the record's data path holds
    for folder in (full, resumed):
        shutil.copytree(record, folder, ignore=shutil.ignore_patterns("defense"))
    out, expected, _ = defend(full, *CHEAP)

    def stop(self, epoch):
        if epoch == 2:
            raise Interrupt()

    argv = ["defend", "--result_file", str(resumed), *FLAGS, "--epochs", "4", "--eval_every", "2", *CHEAP]
    with monkeypatch.context() as patch:
        patch.setattr(FTSAM, "_after_epoch", stop)
        assert run_cli(argv)[0] == 130
    ckpt = safe_load(resumed / "defense" / "ftsam" / "checkpoint" / "last.pt", what="checkpoint")
    assert ckpt["optimizer"]["sam_schedule"]["step"] == 2 * STEPS_PER_EPOCH
    code, _, err = run_cli([*argv, "--resume", "--keep_checkpoint"])  # kept: the refusal below reads it
    assert code == 0, err
    got = safe_load(resumed / "defense" / "ftsam" / "defense_result.pt")["model"]
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    for name in ("ftsam_df.csv", "ftsam_df_summary.csv"):
        assert without_clock_columns((resumed / "defense" / "ftsam" / name).read_text()) == \
            without_clock_columns((out / name).read_text())
    train = [float(r["train_time_s"]) for r in read_csv(resumed / "defense" / "ftsam" / "ftsam_df.csv")]
    assert train == sorted(train)  # the resumed run continues the interrupted one's totals
    code, _, err = run_cli([*argv[:-6], "--sam_every", "3", "--resume"])  # another rule: refused
    assert code == 2 and "was made with sam_every=2, now 3" in err


@pytest.mark.parametrize("flags,message", [
    (["--sam_every", "0"], "sam_every must be an integer >= 1, got 0"),
    (["--sam_every", "1.5"], "invalid int value"),
    (["--sam_prob", "0"], "sam_prob must be a finite number in (0, 1], got 0"),
    (["--sam_prob", "1.5"], "sam_prob must be a finite number in (0, 1], got 1.5"),
    (["--sam_epochs", "5-2"], "sam_epochs must be an epoch window FIRST-LAST like 1-5, got '5-2'"),
    (["--sam_epochs", "first"], "sam_epochs must be an epoch window FIRST-LAST like 1-5, got 'first'"),
    (["--sam_epochs", "0-5"], "sam_epochs must be an epoch window FIRST-LAST like 1-5, got '0-5'"),
    (["--sam_epochs", "9-10"], "sam_epochs 9-10 starts after the run's last epoch (4): no step would be a SAM step"),
])
def test_bad_schedule_settings_are_one_line_errors(record, flags, message):
    code, _, err = run_cli(["defend", "--result_file", str(record), *FLAGS, "--epochs", "4", *flags])
    assert code == 2 and message in err and "Traceback" not in err


def test_yaml_keys_and_ft_checks_but_ignores_them(record, tmp_path):
    from ftsam_plugin.defense.config import load_yaml, merge_config, validate

    yaml = tmp_path / "cheap.yaml"
    yaml.write_text("epochs: 4\nsam_every: 2\nsam_prob: 0.5\nsam_epochs: [1, 3]\n")
    cfg = validate(merge_config(load_yaml(str(yaml)), {}), uses_sam=True)
    assert (cfg["sam_every"], cfg["sam_prob"], cfg["sam_epochs"]) == (2, 0.5, [1, 3])
    defaults = validate(merge_config(load_yaml("cpu"), {}), uses_sam=True)
    assert (defaults["sam_every"], defaults["sam_prob"], defaults["sam_epochs"]) == (1, 1.0, None)
    yaml.write_text("epochs: 4\nsam_every: 0\nsam_epochs: [9, 10]\n")
    from ftsam_plugin.errors import FtsamError

    with pytest.raises(FtsamError, match="sam_every must be an integer >= 1, got 0"):  # plain FT checks them too
        validate(merge_config(load_yaml(str(yaml)), {}), uses_sam=False)
    yaml.write_text("epochs: 4\nsam_every: 2\nsam_epochs: [1, 3]\n")
    validate(merge_config(load_yaml(str(yaml)), {}), uses_sam=False)  # sound values: ignored, without a word


# ---- DDP: every rank takes the same decision at the same step, plain steps all-reduce ----
DDP_STEPS, DDP_FLAGS = 8, ("--sam_prob", "0.5")  # seed 0 vs 1: other choices at steps 5 and 7


def _schedule_worker(rank, port, outdir):
    _join(rank, port)
    defense = make_defense(*DDP_FLAGS)
    defense.set_devices()
    model = tiny_net()
    defense.setup_training(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    defense.optimizer.schedule.set_epoch(1)
    decisions = []
    for step in range(DDP_STEPS):
        decisions.append(defense.optimizer.sam_step_due())
        defense.train_step(wrapped, *batch(rank, step))
    torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "decisions": decisions},
               os.path.join(outdir, f"schedule{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_ranks_take_the_same_steps_and_follow_the_protocol(tmp_path):
    mp.start_processes(_schedule_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn",
                       join=True)
    got = [torch.load(tmp_path / f"schedule{r}.pt") for r in range(WORLD)]
    sam_at = {s for s in range(DDP_STEPS) if step_uniform(0, s) < 0.5}
    assert got[0]["decisions"] == got[1]["decisions"] == [s in sam_at for s in range(DDP_STEPS)]
    expected = simulate(DDP_STEPS, sam_at)
    for key, value in expected.items():
        assert torch.equal(got[0]["params"][key], got[1]["params"][key]), key
        torch.testing.assert_close(got[0]["params"][key], value.detach(), rtol=1e-5, atol=1e-6)
