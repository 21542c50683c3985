"""The path-aware perturbation (optim/path.py, SAM(perturbation="path") and path_rho): a step against a hand
computation, d = 0 at the start, resume, GradScaler, DDP, and the defense end to end."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ftsam_plugin.io import safe_load
from ftsam_plugin.optim import SAM
from ftsam_plugin.optim import SamSchedule

from helpers import clone_record, make_attack_record, run_cli

LR, WD = 0.1, 5e-4


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def path_step(model, opt, x, y, scaler=None):
    """One step the way FTSAM._one_pass_step takes it."""
    opt.zero_grad()
    opt.perturb_path()
    loss = loss_of(model, x, y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)


def plain_sgd_step(model, x, y):
    """A plain SGD step (no momentum) by hand."""
    grads = torch.autograd.grad(loss_of(model, x, y), list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.add_(g.add(p, alpha=WD), alpha=-LR)  # SGD's own arithmetic


def test_path_step_matches_hand_computation():
    model = tiny_model()
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, perturbation="path", lr=LR, weight_decay=WD)
    plain_sgd_step(model, *batch(1))  # move away from theta0 first, outside the optimizer
    plain_sgd_step(model, *batch(2))
    w = [p.detach().clone() for p in model.parameters()]
    # by hand: d = theta0 - w, e = rho * d / (||d|| + 1e-12), gradient at w + e, SGD step from w
    d = [a - b for a, b in zip(theta0, w)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in d]))
    ref = tiny_model()
    with torch.no_grad():
        for p, wi, di in zip(ref.parameters(), w, d):
            p.copy_(wi + di * (0.3 / (norm + 1e-12)))
    ref.load_state_dict({**ref.state_dict(), **{k: v for k, v in model.state_dict().items() if "running" in k
                                               or "num_batches" in k}})
    x, y = batch(3)
    grads = torch.autograd.grad(loss_of(ref, x, y), list(ref.parameters()))
    # SGD's own arithmetic (torch's add with alpha may fuse the multiply): w - lr * (g + wd * w)
    expected = [wi.add(g.add(wi, alpha=WD), alpha=-LR) for wi, g in zip(w, grads)]
    path_step(model, opt, x, y)
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), e)
    assert opt.schedule.sam_steps == 1 and opt.path_steps == 0  # perturbation "path": the schedule's steps


def test_first_step_has_no_direction_and_is_a_plain_step():
    a, b = tiny_model(), tiny_model()
    opt = SAM(a.parameters(), torch.optim.SGD, rho=0.5, perturbation="path", lr=LR, weight_decay=WD)
    x, y = batch()
    path_step(a, opt, x, y)  # d = theta0 - w = 0: e = 0
    plain_sgd_step(b, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.detach(), q.detach())


def test_path_rho_makes_the_schedules_plain_steps_path_steps():
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=2.0, adaptive=True, path_rho=0.5, lr=LR,
              schedule=SamSchedule(every=2))
    assert opt.path is not None and opt.perturbation == "gradient"
    kinds = []
    for step in range(4):
        kinds.append(opt.step_kind())
        x, y = batch(step)
        if kinds[-1] == "gradient":
            loss_of(model, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
        else:
            path_step(model, opt, x, y)
    assert kinds == ["gradient", "path", "gradient", "path"]
    assert (opt.schedule.sam_steps, opt.path_steps) == (2, 2)
    plain = SAM(tiny_model().parameters(), torch.optim.SGD, rho=2.0, lr=LR, schedule=SamSchedule(every=2))
    assert plain.path is None and [plain.step_kind(), plain.schedule.advance(False), plain.step_kind()] == \
        ["gradient", None, "plain"]


def test_state_dict_resumes_identically_and_checks_theta0():
    x_batches = [batch(s) for s in range(6)]

    def run(steps, model, opt):
        for x, y in steps:
            path_step(model, opt, x, y)

    full = tiny_model()
    full_opt = SAM(full.parameters(), torch.optim.SGD, rho=0.5, perturbation="path", lr=LR, momentum=0.9)
    run(x_batches, full, full_opt)

    first = tiny_model()
    first_opt = SAM(first.parameters(), torch.optim.SGD, rho=0.5, perturbation="path", lr=LR, momentum=0.9)
    run(x_batches[:3], first, first_opt)
    state, weights = first_opt.state_dict(), {k: v.clone() for k, v in first.state_dict().items()}
    assert state["path"]["steps"] == 0 and len(state["path"]["anchor_sha256"]) == 64

    resumed = tiny_model()  # built from the same theta0 (the record), then loaded: as the defense resumes
    opt = SAM(resumed.parameters(), torch.optim.SGD, rho=0.5, perturbation="path", lr=LR, momentum=0.9)
    resumed.load_state_dict(weights)
    opt.load_state_dict(state)
    run(x_batches[3:], resumed, opt)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p.detach(), q.detach())

    other = tiny_model()
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # another theta0
    other_opt = SAM(other.parameters(), torch.optim.SGD, rho=0.5, perturbation="path", lr=LR, momentum=0.9)
    with pytest.raises(ValueError, match="path anchor"):
        other_opt.load_state_dict(state)
    gradient_opt = SAM(tiny_model().parameters(), torch.optim.SGD, rho=0.5, lr=LR, momentum=0.9)
    with pytest.raises(ValueError, match="path anchor"):
        gradient_opt.load_state_dict(state)


def test_grad_scaler_skips_a_non_finite_path_step():
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturbation="path", lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    path_step(model, opt, *batch(0), scaler=scaler)  # away from theta0
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    opt.perturb_path()
    scaler.scale(loss_of(model, *batch(1))).backward()
    model[4].bias.grad[0] = float("nan")
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    for p, b in zip(model.parameters(), before):  # restored, and the step skipped
        assert torch.equal(p.detach(), b)
    assert scaler.get_scale() == 2.0 ** 9


def test_bad_arguments():
    with pytest.raises(ValueError, match="perturbation"):
        SAM(tiny_model().parameters(), torch.optim.SGD, rho=1.0, perturbation="towards", lr=LR)
    with pytest.raises(ValueError, match="path_rho"):
        SAM(tiny_model().parameters(), torch.optim.SGD, rho=1.0, path_rho=float("nan"), lr=LR)
    with pytest.raises(ValueError, match="perturb_path"):
        SAM(tiny_model().parameters(), torch.optim.SGD, rho=1.0, lr=LR).perturb_path()


# ---- DDP: every rank computes the same d (same weights, same theta0), so the ranks stay identical ----
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = tiny_model()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturbation="path", lr=LR)
    for step in range(3):
        x, y = batch(100 * rank + step)  # each rank its own data
        opt.zero_grad()
        opt.perturb_path()
        loss_of(wrapped, x, y).backward()  # all-reduced
        opt.second_step(zero_grad=True)
    torch.save([p.detach() for p in model.parameters()], os.path.join(outdir, f"{rank}.pt"))
    dist.destroy_process_group()


def _ddp_reference():
    """The same 3 steps in one process: the gradient at w + e averaged over the two ranks' batches."""
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturbation="path", lr=LR)
    for step in range(3):
        opt.zero_grad()
        opt.perturb_path()
        # BatchNorm in train mode normalises per rank: average the two ranks' losses, as DDP averages grads
        loss = sum(loss_of(model, *batch(100 * rank + step)) for rank in range(2)) / 2
        loss.backward()
        opt.second_step(zero_grad=True)
    return [p.detach() for p in model.parameters()]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_ranks_take_the_same_path_step(tmp_path):
    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for a, b in zip(*ranks):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0], _ddp_reference()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- the defense: --perturbation path and --path_rho through `ftsam defend`, resume exact ----
FLAGS = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.2", "--batch_size", "8", "--num_workers", "0",
         "--epochs", "3", "--eval_every", "3"]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return make_attack_record(tmp_path_factory.mktemp("path"), name="rec", n_per_class=10, epochs=1)


class Interrupt(KeyboardInterrupt):
    pass


def test_defense_with_path_steps_resumes_to_the_uninterrupted_weights(record, monkeypatch):
    from ftsam_plugin.defense.ftsam import FTSAM

    extra = ["--sam_epochs", "1-1", "--path_rho", "0.5"]
    full = clone_record(record, "full")
    code, _, err = run_cli(["defend", "--result_file", str(full), *FLAGS, *extra])
    assert code == 0, err
    expected = safe_load(full / "defense" / "ftsam" / "defense_result.pt")["model"]
    rows = (full / "defense" / "ftsam" / "ftsam_df.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [(r.split(",")[header.index("sam_steps")], r.split(",")[header.index("path_steps")]) for r in rows[1:]]
    assert steps == [("3", "0"), ("3", "3"), ("3", "6")]  # 20 images, batch 8: 3 steps an epoch

    part = clone_record(record, "part")
    argv = ["defend", "--result_file", str(part), *FLAGS, *extra]

    def stop(self, epoch):
        if epoch == 2:
            raise Interrupt()

    with monkeypatch.context() as patch:
        patch.setattr(FTSAM, "_after_epoch", stop)
        assert run_cli(argv)[0] == 130
    code, _, err = run_cli([*argv, "--resume", "--path_rho", "0.25"])  # another setting: refused, nothing lost
    assert code == 2 and "path_rho" in err, err
    code, _, err = run_cli([*argv, "--resume"])
    assert code == 0, err
    got = safe_load(part / "defense" / "ftsam" / "defense_result.pt")["model"]
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
