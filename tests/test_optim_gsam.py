"""GSAM's gradient decomposition (`SAM(alpha=...)`, `--alpha`): against an fp64 twin written here from the formula.

tests/test_parity_backdoorbench.py checks it against BackdoorBench's own `SAM.gradient_decompose` and its
`_train_sam` with --alpha (with BACKDOORBENCH_ROOT).
"""

import pytest
import torch

from ftsam_plugin.optim import SAM, freeze_bn
from ftsam_plugin.optim.gsam import gradient_decompose


# ---- Reference: GSAM's decomposition, h - alpha * (g - cos(g, h) * ||g|| / ||h|| * h), in fp64 over one vector ----
def decomposed(g_list, h_list, alpha, eps=1e-12):
    g = torch.cat([t.double().flatten() for t in g_list])
    h = torch.cat([t.double().flatten() for t in h_list])
    cos = (g @ h) / (g.norm() * h.norm() + eps)
    out = h - alpha * (g - cos * g.norm() * h / (h.norm() + eps))
    return list(torch.split(out, [t.numel() for t in h_list]))


def tensors(seed, shapes=((3, 4), (5,), (1,), (2, 3, 3))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen) for s in shapes]


@pytest.mark.parametrize("alpha", [0.1, 0.5, -0.3, 2.0])
def test_decomposition_matches_the_formula(alpha):
    g, h = tensors(0), tensors(1)
    want = decomposed(g, h, alpha)
    gradient_decompose(g, h, alpha)
    for got, ref in zip(h, want):
        assert torch.allclose(got.double(), ref.view_as(got), rtol=1e-6, atol=1e-7)


def test_what_it_removes_is_orthogonal_to_h():
    g, h = tensors(2), tensors(3)
    h0 = [t.clone() for t in h]
    gradient_decompose(g, h, 1.0)
    removed = torch.cat([(a - b).flatten() for a, b in zip(h0, h)]).double()  # = g's component orthogonal to h
    assert abs(float(removed @ torch.cat([t.flatten() for t in h0]).double())) < 1e-4 * float(removed.norm())


def test_alpha_zero_changes_nothing():
    g, h = tensors(4), tensors(5)
    h0 = [t.clone() for t in h]
    gradient_decompose(g, h, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(h, h0))


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def sam_step(model, opt, x, y, scaler=None):
    loss_fn = torch.nn.functional.cross_entropy
    scale = (lambda loss: scaler.scale(loss)) if scaler is not None else (lambda loss: loss)
    scale(loss_fn(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    with freeze_bn(model):
        scale(loss_fn(model(x), y)).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)


def test_sam_step_with_alpha_is_sgd_on_the_decomposed_gradient():
    """One ASAM step with alpha, against the same step done by hand: g at w, e, h at w + e, decomposition, SGD."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    rho, lr, alpha = 0.5, 0.1, 0.4
    model, ref = net(), net()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=True, alpha=alpha, lr=lr)
    sam_step(model, opt, x, y)
    # ---- by hand ----
    params = list(ref.parameters())
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    g = [p.grad.clone() for p in params]
    norm = torch.linalg.vector_norm(torch.cat([(p.detach().abs() * gp).flatten() for p, gp in zip(params, g)]))
    w0 = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gp in zip(params, g):
            p.add_(rho * p * p * gp / (norm + 1e-12))
    ref.zero_grad()
    with freeze_bn(ref):
        torch.nn.functional.cross_entropy(ref(x), y).backward()
    h = decomposed(g, [p.grad for p in params], alpha)
    with torch.no_grad():
        for p, w, hp in zip(params, w0, h):
            p.copy_(w - lr * hp.view_as(p).float())
    for a, b in zip(model.parameters(), params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # and alpha really changed the step
    plain = net()
    sam_step(plain, SAM(plain.parameters(), torch.optim.SGD, rho=rho, adaptive=True, lr=lr), x, y)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), plain.parameters())) > 1e-4


def test_grad_scaler_decomposes_unscaled_gradients():
    """With a GradScaler (a power-of-two scale: unscaling is exact) the step equals the unscaled one."""
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    a, b = net(), net()
    sam_step(a, SAM(a.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, alpha=0.5, lr=0.1), x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    sam_step(b, SAM(b.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, alpha=0.5, lr=0.1), x, y, scaler)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def test_bad_alpha_is_refused():
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        SAM(net().parameters(), torch.optim.SGD, alpha=float("nan"), lr=0.1)
