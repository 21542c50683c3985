"""FT-SAM under DistributedDataParallel: two gloo processes on CPU keep identical parameters, and match a
single-process simulation of the protocol (pass 1 local under no_sync, pass 2 all-reduced)."""

import argparse
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from ftsam_plugin.defense.ftsam import FTSAM

WORLD, STEPS, RHO = 2, 3, 2.0


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


def make_defense():
    parser = argparse.ArgumentParser()
    FTSAM.add_arguments(parser)
    args = parser.parse_args(["--yaml_path", "cpu", "--device", "cpu", "--rho", str(RHO), "--label_smoothing", "0"])
    return FTSAM(args)


def _worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    defense = make_defense()
    defense.set_devices()  # joins the gloo group described by the environment
    assert defense.dist.world_size == WORLD and defense.dist.rank == rank
    model = tiny_net()
    defense.setup_training(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    for step in range(STEPS):
        x, y = batch(rank, step)
        defense.train_step(wrapped, x, y)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(outdir, f"{rank}.pt"))
    dist.destroy_process_group()


# ---- Reference: the DDP protocol simulated in one process with plain torch ----
def simulate(steps=STEPS, sam_at=None):
    """`sam_at`: the steps that are SAM steps (default all); the others average the ranks' gradients at w."""
    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    params = list(model.parameters())
    for step in range(steps):
        grads = []
        for rank in range(WORLD):
            replica = copy.deepcopy(model)
            x, y = batch(rank, step)
            g = torch.autograd.grad(F.cross_entropy(replica(x), y), list(replica.parameters()))
            if sam_at is not None and step not in sam_at:
                grads.append(g)
                continue
            norm = torch.sqrt(sum(((p.detach() * gi) ** 2).sum() for p, gi in zip(params, g)))
            with torch.no_grad():
                for p, gi in zip(replica.parameters(), g):
                    p.add_(RHO * p * p * gi / (norm + 1e-12))  # ASAM, eta 0, local gradient
            grads.append(torch.autograd.grad(F.cross_entropy(replica(x), y), list(replica.parameters())))
        for p, *gs in zip(params, *grads):
            p.grad = sum(gs) / WORLD  # DDP averages the second-pass gradients
        opt.step()
    return {k: v for k, v in model.named_parameters()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_two_gloo_ranks_stay_identical_and_follow_the_protocol(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    states = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    expected = simulate()
    for key in expected:  # parameters (BN buffers are rank-local until DDP re-broadcasts rank 0's at a forward)
        assert torch.equal(states[0][key], states[1][key]), key  # bit-identical across ranks
    start = dict(tiny_net().named_parameters())
    for key, value in expected.items():
        assert not torch.equal(states[0][key], start[key].detach())
        torch.testing.assert_close(states[0][key], value.detach(), rtol=1e-5, atol=1e-6)


# ---- torchrun details: an explicit GPU index is refused ----
def test_explicit_cuda_index_under_torchrun_is_refused(monkeypatch):
    from ftsam_plugin.defense import ddp
    from ftsam_plugin.errors import FtsamError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FtsamError, match=r"under torchrun pass --device cuda \(each process takes cuda:LOCAL_RANK\)"):
        ddp.resolve_device("cuda:0", local_rank=1)


def _spawn(fn, *args):
    mp.start_processes(fn, args=(_free_port(), *args), nprocs=WORLD, start_method="spawn", join=True)


def _join(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


# ---- SAM + GradScaler under DDP: an inf on one rank's local first pass skips the step on every rank ----
def _skip_worker(rank, port, outdir):
    from ftsam_plugin.optim.sam import SAM

    _join(rank, port)
    dist.init_process_group("gloo")
    model = tiny_net()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, adaptive=True, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(rank, 0)
    with wrapped.no_sync():
        scaler.scale(F.cross_entropy(wrapped(x), y)).backward()
    if rank == 1:
        next(model.parameters()).grad.view(-1)[0] = float("inf")  # rank-local overflow in pass 1
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(F.cross_entropy(wrapped(x), y)).backward()  # pass 2: finite, all-reduced
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    torch.save({"skipped": opt._skipped, "scale": scaler.get_scale(),
                "unchanged": all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))},
               os.path.join(outdir, f"skip{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_amp_skip_decision_is_shared_by_all_ranks(tmp_path):
    _spawn(_skip_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"skip{r}.pt") for r in range(WORLD)]
    for g in got:  # rank 0's own grads were finite: without the shared flag it would step and keep its scale
        assert g == {"skipped": True, "scale": 2.0 ** 7, "unchanged": True}


# ---- The whole defense under torchrun-style DDP (2 gloo processes): fresh run, then interrupt + resume ----
class Interrupt(KeyboardInterrupt):
    pass


DEFEND = ["--yaml_path", "cpu", "--device", "cpu", "--ratio", "0.2", "--batch_size", "8", "--num_workers", "0",
          "--epochs", "2"]


def _defend(record, *extra):
    parser = argparse.ArgumentParser()
    FTSAM.add_arguments(parser)
    args = parser.parse_args(["--result_file", str(record), *DEFEND, *extra])
    return FTSAM(args).defense(args.result_file)["model"]


def _defend_worker(rank, port, outdir, full_record, resumed_record, extra):
    from ftsam_plugin.data import records

    _join(rank, port)
    saves = []
    real_save = records.save_defense_result

    def counting_save(*args, **kwargs):
        saves.append(rank)
        return real_save(*args, **kwargs)

    records.save_defense_result = counting_save
    full = _defend(full_record, *extra)

    def stop(self, epoch):
        if epoch == 1:
            raise Interrupt()

    FTSAM._after_epoch = stop
    try:
        _defend(resumed_record, *extra)
        raise AssertionError("the run was not interrupted")
    except Interrupt:
        pass
    del FTSAM._after_epoch
    resumed = _defend(resumed_record, *extra, "--resume", "--keep_checkpoint")
    snap = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    torch.save({"full": snap(full), "resumed": snap(resumed), "saves": len(saves)},
               os.path.join(outdir, f"defend{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("extra", [(), ("--unlearn", "uap-l2"), ("--eval_subset", "10")], ids=["plain", "unlearn", "subset"])
def test_full_defense_under_ddp_is_rank_consistent_and_resumes_exactly(tmp_path, extra):
    import shutil

    from ftsam_plugin.io import safe_load

    from helpers import make_attack_record

    full_record = make_attack_record(tmp_path, name="full", n_per_class=10, epochs=1)
    resumed_record = tmp_path / "record" / "resumed"
    shutil.copytree(full_record, resumed_record)
    _spawn(_defend_worker, str(tmp_path), str(full_record), str(resumed_record), tuple(extra))
    ranks = [torch.load(tmp_path / f"defend{r}.pt") for r in range(WORLD)]
    assert [r["saves"] for r in ranks] == [2, 0]  # defense_result.pt written by rank 0 only, once per run
    attack = safe_load(full_record / "attack_result.pt")["model"]
    for run, record in (("full", full_record), ("resumed", resumed_record)):
        saved = safe_load(record / "defense" / "ftsam" / "defense_result.pt")["model"]
        assert any(not torch.equal(saved[k], attack[k]) for k in saved)  # it trained
        for key, value in saved.items():  # rank 0's file == every rank's final weights and BN buffers
            for r in ranks:
                assert torch.equal(r[run][key].cpu(), value), (run, key)
    # interrupt + resume == uninterrupted, bit for bit: every rank resumed its own RNG stream (augmentations)
    for key, value in ranks[0]["full"].items():
        assert torch.equal(ranks[0]["resumed"][key], value), key
    ckpt = safe_load(resumed_record / "defense" / "ftsam" / "checkpoint" / "last.pt", what="checkpoint")
    assert len(ckpt["rng_ranks"]) == WORLD
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])
