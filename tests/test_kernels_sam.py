"""SAM kernels (ftsam_plugin.kernels): every backend against an fp64 oracle and against each other.

Triton runs in its interpreter here (TRITON_INTERPRET=1 from conftest), so it gets small sizes only.
"""

import math

import pytest
import torch

from ftsam_plugin import kernels
from ftsam_plugin.kernels import sam_triton
from ftsam_plugin.kernels.reference import preact_resnet18_shapes


# ---- PyTorch Reference (fp64) ----
def _scaled(p, adaptive, weights_only):
    return adaptive and (not weights_only or p.ndim > 1)


def oracle_norm(params, adaptive=False, eta=0.0, weights_only=False):
    parts = [(((p.detach().double().abs() + eta) if _scaled(p, adaptive, weights_only) else 1.0)
              * p.grad.double()).flatten() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(parts)) if parts else torch.zeros((), dtype=torch.float64)


def oracle_e(p, norm, rho, adaptive=False, eta=0.0, weights_only=False):
    t = (p.detach().double().abs() + eta) if _scaled(p, adaptive, weights_only) else 1.0
    return rho * t * t * p.grad.double() / (norm + 1e-12)


BACKENDS = ["loop", "foreach", "triton"]
MODES = {"plain": dict(), "adaptive": dict(adaptive=True), "eta": dict(adaptive=True, eta=0.1),
         "weights_only": dict(adaptive=True, eta=0.01, weights_only=True)}
SMALL = [(1,), (7,), (1023,), (65537,), (8, 3, 3, 3), (5, 4)]
# every mode in fp32, and the low-precision dtypes with the richest modes (keeps the interpreter runs short)
CASES = [(torch.float32, 1e-6, m) for m in MODES] + [(torch.float16, 2e-3, "eta"), (torch.float16, 2e-3, "plain"),
                                                     (torch.bfloat16, 1.6e-2, "weights_only")]


def make_params(shapes, dtype=torch.float32, none_at=()):
    ps = []
    for i, s in enumerate(shapes):
        p = torch.randn(s).to(dtype).requires_grad_()
        p.grad = None if i in none_at else torch.randn(s).to(dtype)
        ps.append(p)
    return ps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol,mode", CASES)
def test_grad_norm_matches_fp64(backend, dtype, rtol, mode):
    ps = make_params(SMALL, dtype, none_at=(1,))
    got = kernels.grad_norm(ps, backend=backend, **MODES[mode])
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got.double(), oracle_norm(ps, **MODES[mode]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["loop", "foreach"])
@pytest.mark.parametrize("mode", ["plain", "adaptive"])
def test_grad_norm_preact_resnet18(backend, mode):
    shapes = preact_resnet18_shapes()
    assert len(shapes) == 54 and sum(math.prod(s) for s in shapes) == 11_171_146
    ps = make_params(shapes)
    got = kernels.grad_norm(ps, backend=backend, **MODES[mode])
    # torch's CPU fp32 norm kernel (norm/vector_norm/_foreach_norm alike) is off by ~4e-5 on a 2.36M tensor
    torch.testing.assert_close(got.double(), oracle_norm(ps, **MODES[mode]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_param_and_no_grads(backend):
    p = make_params([(33,)])
    torch.testing.assert_close(kernels.grad_norm(p, backend=backend).double(), p[0].grad.double().norm())
    none = make_params([(3,), (4,)], none_at=(0, 1))
    assert kernels.grad_norm(none, backend=backend).item() == 0.0
    assert kernels.grad_norm([], backend=backend).item() == 0.0
    assert kernels.perturb(none, torch.tensor(1.0), 0.05, backend=backend) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_grads_give_zero_perturbation(backend, adaptive):
    ps = make_params([(7,), (1023,)])
    for p in ps:
        p.grad.zero_()
    before = [p.detach().clone() for p in ps]
    norm = kernels.grad_norm(ps, adaptive=adaptive, backend=backend)
    assert norm.item() == 0.0
    saved = kernels.perturb(ps, norm, 2.0, adaptive=adaptive, store="e", backend=backend)
    for p, b, e in zip(ps, before, saved):
        assert torch.equal(p.detach(), b) and torch.count_nonzero(e) == 0 and not e.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol,mode", CASES)
@pytest.mark.parametrize("store", ["w", "e"])
def test_perturb_and_restore(backend, dtype, rtol, mode, store):
    ps = make_params(SMALL, dtype, none_at=(2,))
    before = [p.detach().clone() for p in ps]
    norm = kernels.grad_norm(ps, backend=backend, **MODES[mode])
    saved = kernels.perturb(ps, norm, 0.5, store=store, backend=backend, **MODES[mode])
    live = kernels.with_grad(ps)
    assert len(saved) == len(live) == len(ps) - 1
    assert torch.equal(ps[2].detach(), before[2])  # no grad: untouched
    pairs = [(p, b) for p, b in zip(ps, before) if p.grad is not None]
    for (p, b), s in zip(pairs, saved):
        q = b.clone()
        q.grad = p.grad
        e = oracle_e(q, norm.double(), 0.5, **MODES[mode])
        assert s.dtype == dtype and s.shape == p.shape
        atol = rtol * b.double().abs().max().item()  # w + e rounds to the param dtype
        torch.testing.assert_close(p.detach().double() - b.double(), e, rtol=rtol * 4, atol=atol)
        if store == "w":
            assert torch.equal(s, b)
        else:
            torch.testing.assert_close(s.double(), e, rtol=rtol, atol=torch.finfo(dtype).tiny)  # subnormal e
    kernels.restore(live, saved, mode="copy" if store == "w" else "subtract", backend=backend)
    for p, b in zip(ps, before):
        if store == "w":
            assert torch.equal(p.detach(), b)
        else:
            torch.testing.assert_close(p.detach(), b, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("mode", list(MODES))
def test_backends_agree(mode):
    ps = make_params(SMALL)
    norms, weights = {}, {}
    for backend in BACKENDS:
        qs = [p.detach().clone().requires_grad_() for p in ps]
        for q, p in zip(qs, ps):
            q.grad = p.grad
        norms[backend] = kernels.grad_norm(qs, backend=backend, **MODES[mode])
        kernels.perturb(qs, norms[backend], 2.0, backend=backend, **MODES[mode])
        weights[backend] = qs
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(norms[backend], norms["loop"], rtol=1e-6, atol=0)
        for a, b in zip(weights[backend], weights["loop"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_backend_selection_and_errors(monkeypatch):
    ps = make_params([(3,)])
    assert kernels.resolve_backend("auto", ps) == "foreach"  # CPU tensors
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.grad_norm(ps, backend="cuda")
    with pytest.raises(ValueError, match="mode"):
        kernels.restore(ps, ps, mode="add")
    with pytest.raises(ValueError, match="store"):
        kernels.perturb(ps, torch.tensor(1.0), 0.1, store="x")
    monkeypatch.setattr(sam_triton, "INTERPRET", False)  # CPU tensors, no interpreter: explicit triton fails loudly
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.grad_norm(ps, backend="triton")


def test_triton_norm_is_deterministic():
    ps = make_params([(65537,), (1023,)])
    a = kernels.grad_norm(ps, adaptive=True, backend="triton")
    assert all(torch.equal(a, kernels.grad_norm(ps, adaptive=True, backend="triton")) for _ in range(2))
