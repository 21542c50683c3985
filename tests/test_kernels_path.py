"""The path step on the SAM kernels (optim/path.py's Triton route, kernels' `directions`): against the foreach route.

Triton runs in its interpreter here (TRITON_INTERPRET=1 from conftest): small sizes only. The compiled kernels on a
GPU are checked by benchmarks/gpu_check.py.
"""

import pytest
import torch

from ftsam_plugin import kernels
from ftsam_plugin.kernels.triton_plan import LayoutError
from ftsam_plugin.kernels.triton_plan import TritonPlan
from ftsam_plugin.optim import SAM
from ftsam_plugin.optim.path import PathAnchor

# Tolerance of the Triton route against the foreach one, per param dtype (the kernel tests' table): the two round w + e
# to the param dtype from slightly different e, so they may differ by about one unit in the last place of w (rtol).
# e itself differs through the norm: the kernels sum every square in fp32 in their own order; foreach takes one norm
# per tensor, rounded to that tensor's dtype (fp16/bf16 for half params), then the norm of those. So the atol is the
# lowest-precision dtype's rtol times the largest |e|: an e wrong by more than that (another rho, another norm) fails.
RTOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(4, 3, 3, 3), (4,), (7, 5), (300,), (0,), (6,)]
SIZES = (3, 3)  # two param groups
RHOS = (0.3, 0.7)
DTYPES = {"fp32": [torch.float32] * 6,
          "fp32 + bf16 + fp16": [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float32,
                                 torch.float16],
          "fp16": [torch.float16] * 6, "bf16": [torch.bfloat16] * 6}


def make_params(dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(d) for s, d in zip(SHAPES, dtypes)]


def move_away(params, seed=1, scale=0.05):
    """w away from theta0 (different amounts per param, so d is not a multiple of one tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def path_step(backend, dtypes, rhos=RHOS):
    """(w before, w perturbed, the anchor) of one path step on `backend` from the same theta0 and w."""
    params = make_params(dtypes)
    anchor = PathAnchor(params, backend)
    move_away(params)
    before = [p.clone() for p in params]
    anchor.perturb(rhos, SIZES)
    return before, [p.clone() for p in params], anchor


def assert_close_steps(before, got, want, dtypes):
    lowest = max(RTOL[d] for d in dtypes)
    largest_e = max(((w.double() - b.double()).abs().max().item() for w, b in zip(want, before) if w.numel()))
    assert largest_e > 1e-3  # the perturbation is there to compare
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=RTOL[w.dtype], atol=lowest * largest_e)


@pytest.mark.parametrize("name", DTYPES)
def test_triton_path_step_matches_foreach_and_restores_exactly(name):
    dtypes = DTYPES[name]
    before, got, fused = path_step("triton", dtypes)
    before_f, want, _ = path_step("foreach", dtypes)
    assert fused.fused and fused.plan_builds == 1
    assert all(torch.equal(a, b) for a, b in zip(before, before_f))
    assert_close_steps(before, got, want, dtypes)
    fused.restore()
    for p, b in zip(fused.params, before):
        assert torch.equal(p, b)


def test_one_norm_over_both_groups_and_each_groups_rho():
    # fp64 by hand: the groups share ||d|| over every param, and each scales by its own rho
    before, got, fused = path_step("triton", DTYPES["fp32"])
    d = [(a.double() - b.double()) for a, b in zip(fused.anchor, before)]
    norm = torch.linalg.vector_norm(torch.cat([t.flatten() for t in d]))
    rhos = [RHOS[0]] * SIZES[0] + [RHOS[1]] * SIZES[1]
    for g, b, di, rho in zip(got, before, d, rhos):
        torch.testing.assert_close(g.double(), b.double() + rho * di / norm, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_first_step_has_no_direction_on_both_routes(name):
    for backend in ("triton", "foreach"):
        params = make_params(DTYPES[name])
        before = [p.clone() for p in params]
        PathAnchor(params, backend).perturb(RHOS, SIZES)  # d = 0: e = 0 * rho / (0 + 1e-12) = 0, not NaN
        for p, b in zip(params, before):
            assert torch.equal(p, b), backend


def test_moved_param_storage_rebuilds_the_plan():
    params = make_params(DTYPES["fp32"])
    fused, reference = PathAnchor(params, "triton"), PathAnchor([p.clone() for p in params], "foreach")
    for anchor in (fused, reference):
        move_away(anchor.params)
        anchor.perturb(RHOS, SIZES)
        anchor.restore()
    assert fused.plan_builds == 1
    old = fused.params[2].data  # kept alive: a stale plan would write here, not into freed memory
    fused.params[2].data = old.clone()  # new storage, same values: the old plan's address is stale
    before = [p.clone() for p in reference.params]
    fused.perturb(RHOS, SIZES)
    reference.perturb(RHOS, SIZES)
    assert fused.plan_builds == 2
    assert_close_steps(before, fused.params, reference.params, DTYPES["fp32"])
    fused.restore()
    for p, b in zip(fused.params, before):
        assert torch.equal(p, b)
    fused.perturb(RHOS, SIZES)  # nothing moved since: the plan is reused
    assert fused.plan_builds == 2


def test_sam_passes_its_backend_to_the_path_step():
    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "rho": 0.9}]
        opt = SAM(groups, torch.optim.SGD, rho=0.4, perturbation="path", lr=0.1, backend=backend)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            opt.perturb_path()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        return [p.detach() for p in model.parameters()], opt.path

    got, fused = run("triton")
    want, plain = run("foreach")
    assert fused.fused and fused.plan_builds == 1 and not plain.fused
    for a, b in zip(got, want):  # three steps: the tiny differences of each step pass through two more SGD steps
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["foreach", "loop", "triton"])
def test_directions_read_as_the_grads(backend):
    # a plan given directions = the grads does what the plan reading the grads does, bit for bit
    grads = make_params(DTYPES["fp32 + bf16 + fp16"], seed=3)
    with_grads, with_directions = make_params(DTYPES["fp32 + bf16 + fp16"]), make_params(DTYPES["fp32 + bf16 + fp16"])
    for p, g in zip(with_grads, grads):
        p.grad = g
    for mode in ("copy", "subtract"):
        a = kernels.create_plan(with_grads, restore=mode, backend=backend)
        b = kernels.create_plan(with_directions, restore=mode, backend=backend, directions=grads)
        norm = a.grad_norm().clone()
        assert torch.equal(b.grad_norm(), norm)
        a.perturb(norm, 0.5)
        b.perturb(norm, 0.5)
        assert all(torch.equal(p, q) for p, q in zip(with_grads, with_directions))
        a.restore()
        b.restore()
        assert all(torch.equal(p, q) for p, q in zip(with_grads, with_directions))


@pytest.mark.parametrize("backend", ["foreach", "loop", "triton"])
def test_directions_with_a_wrong_layout_are_refused(backend):
    params = make_params(DTYPES["fp32"])
    directions = [torch.zeros_like(p) for p in params]
    with pytest.raises(ValueError, match=r"directions has 5 tensors for 6 parameters"):
        kernels.create_plan(params, backend=backend, directions=directions[:-1])
    with pytest.raises(ValueError, match=r"directions\[2\] has shape \(5, 7\) but its parameter \(7, 5\)"):
        kernels.create_plan(params, backend=backend, directions=[*directions[:2], directions[2].T.contiguous(),
                                                                  *directions[3:]])
    with pytest.raises(ValueError, match="float64"):
        kernels.create_plan(params, backend=backend, directions=[d.double() for d in directions])


def test_triton_refuses_directions_strided_unlike_their_params():
    params = [torch.randn(7, 5)]
    strided = torch.zeros(5, 7).T  # shape (7, 5), column-major
    with pytest.raises(LayoutError, match=r"direction shape/strides \(7, 5\)/\(1, 7\) differ"):
        kernels.create_plan(params, backend="triton", directions=[strided])
    with pytest.raises(ValueError, match="directions has 2 tensors for 1 parameters"):
        TritonPlan(params, directions=[strided, strided])
