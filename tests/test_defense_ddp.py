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
def simulate():
    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    params = list(model.parameters())
    for step in range(STEPS):
        grads = []
        for rank in range(WORLD):
            replica = copy.deepcopy(model)
            x, y = batch(rank, step)
            g = torch.autograd.grad(F.cross_entropy(replica(x), y), list(replica.parameters()))
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
