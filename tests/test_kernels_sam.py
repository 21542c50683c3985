"""SAM kernels (ftsam_plugin.kernels): every backend against an fp64 oracle and against each other.

Triton runs in its interpreter here (TRITON_INTERPRET=1 from conftest), so it gets small sizes only; the compiled
Triton kernels are checked on CUDA (when there is a GPU) in a subprocess without TRITON_INTERPRET.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

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
# every mode in fp32, and the low-precision dtypes with the richest modes (keeps the interpreter runs short);
# rtol: the accuracy of results in that dtype (fp32 ~ a few ulp of its 2**-24 unit roundoff)
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
    # the norm is an fp32 result whatever the param dtype (fp16/bf16 values upcast exactly): fp32 cases use the
    # table's rtol; for fp16/bf16 params the table's (their dtype's) rtol would be far too loose, and torch's CPU
    # fp32 norm kernels (loop/foreach) over upcast fp16/bf16 grads are off by up to ~3e-6, so 5e-6 there
    norm_rtol = rtol if dtype == torch.float32 else 5e-6
    torch.testing.assert_close(got.double(), oracle_norm(ps, **MODES[mode]), rtol=norm_rtol, atol=0)


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
    monkeypatch.setattr(sam_triton, "LAUNCH_ON_CPU", False)  # CPU tensors, no interpreter: explicit triton fails
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.grad_norm(ps, backend="triton")


# ---- plans: built once, reused; alignment groups; the checks every backend shares ----
def clone_params(ps):
    qs = [p.detach().clone().requires_grad_() for p in ps]
    for q, p in zip(qs, ps):
        q.grad = None if p.grad is None else p.grad.clone()
    return qs


def views_at(buffer, offset, shapes):
    """Tensors of `shapes` packed into `buffer` from element `offset` on (offset 1: not 16-byte aligned)."""
    out = []
    for s in shapes:
        n = math.prod(s)
        out.append(buffer[offset:offset + n].view(s))
        offset += n
    return out


@pytest.mark.parametrize("mode", ["plain", "eta"])
def test_triton_plan_reused_over_steps_matches_foreach(mode):
    # full chunks (unmasked path) and tails (masked), several steps with new grad values in the same storage
    shapes = [(2 * sam_triton.CHUNK + 5,), (3, 5), (0,), (sam_triton.CHUNK,)]
    ps = make_params(shapes)
    ref = clone_params(ps)
    plan = kernels.create_plan(ps, backend="triton", restore="copy", **MODES[mode])
    ref_plan = kernels.create_plan(ref, backend="foreach", restore="copy", **MODES[mode])
    before = [p.detach().clone() for p in ps]
    saveds = []
    for _ in range(3):
        for p, q in zip(ps, ref):
            p.grad.copy_(torch.randn(p.shape))
            q.grad.copy_(p.grad)
        out = plan.grad_norm()  # the plan's own buffer: the next call overwrites it
        norm = out.clone()
        torch.testing.assert_close(norm.double(), oracle_norm(ps, **MODES[mode]), rtol=1e-6, atol=0)
        out.fill_(float("nan"))  # a norm that is not written again (a ticket counter never reset) stays NaN
        assert torch.equal(plan.grad_norm(), norm)  # the ticket counter was reset: a second call agrees bitwise
        saved = plan.perturb(norm, 0.5)
        ref_plan.perturb(ref_plan.grad_norm(), 0.5)
        for p, q in zip(ps, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        saveds.append(saved)
        plan.restore()
        ref_plan.restore()
        assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert all(a is b for s in saveds[1:] for a, b in zip(s, saveds[0]))  # one persistent buffer, reused


def test_triton_groups_split_by_alignment_and_dtype():
    shapes = [(37,), (4, 3, 3, 3), (70000,)]
    buf, gbuf = torch.randn(80000), torch.randn(80000)
    unaligned = [v.requires_grad_() for v in views_at(buf, 1, shapes)]  # 4-byte offset: masked path
    for p, g in zip(unaligned, views_at(gbuf, 1, shapes)):
        p.grad = g
    aligned = make_params(shapes)
    half = make_params([(300,), (33, 2)], torch.bfloat16)
    ps = unaligned + aligned + half
    plan = kernels.create_plan(ps, adaptive=True, eta=0.01, backend="triton")
    keys = {(g.w_dtype, g.aligned) for g in plan._groups}
    assert keys == {(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)}
    norm = plan.grad_norm()  # three launches share one ticket counter; the last program of all finishes
    torch.testing.assert_close(norm.double(), oracle_norm(ps, adaptive=True, eta=0.01), rtol=5e-6, atol=0)
    before = [p.detach().clone() for p in ps]
    plan.perturb(norm, 0.5)
    for p, b in zip(ps, before):
        q = b.clone()
        q.grad = p.grad
        rtol = 1.6e-2 if p.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(p.detach().double() - b.double(), oracle_e(q, norm.double(), 0.5, True, 0.01),
                                   rtol=4 * rtol, atol=rtol * b.double().abs().max().item())
    plan.restore()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))


def test_triton_launches_under_the_params_device(monkeypatch):
    from ftsam_plugin.kernels import triton_plan

    guard = triton_plan.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # what a plan on cuda:1 enters
    events = []

    class Recorder:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    real_launch = sam_triton.Launch.__call__
    monkeypatch.setattr(triton_plan, "device_guard", lambda device: Recorder())
    monkeypatch.setattr(sam_triton.Launch, "__call__", lambda *a: (events.append("launch"), real_launch(*a)))
    plan = kernels.create_plan(make_params([(5,), (3, 3)]), backend="triton")
    plan.perturb(plan.grad_norm(), 0.1)
    plan.restore()
    assert events == ["enter", "launch", "exit"] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_mixed_devices_are_refused(backend):
    with pytest.raises(ValueError, match="float64.*model.float"):
        kernels.grad_norm(make_params([(3,), (4,)], torch.float64), backend=backend)
    ps = make_params([(3,)])
    meta = torch.empty(4, device="meta").requires_grad_()
    meta.grad = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="several devices"):
        kernels.grad_norm(ps + [meta], backend=backend)
    with pytest.raises(ValueError, match="several devices"):
        kernels.perturb(ps + [meta], torch.tensor(1.0), 0.1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_checks_saved_against_params(backend):
    ps = make_params([(3,), (2, 2)])
    saved = kernels.perturb(ps, kernels.grad_norm(ps, backend=backend), 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"saved\[1\] is torch.float32 \(4,\) but its parameter is .*\(2, 2\)"):
        kernels.restore(ps, [saved[0], saved[1].flatten()], backend=backend)
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.restore(ps, [saved[0].bfloat16(), saved[1]], backend=backend)
    with pytest.raises(ValueError, match="2 params for 1 saved"):
        kernels.restore(ps, saved[:1], backend=backend)


def test_auto_falls_back_to_foreach_once_where_triton_cannot(monkeypatch):
    monkeypatch.setattr(kernels, "AUTO_TRITON_DEVICES", ("cpu",))  # as on CUDA: auto would pick Triton
    monkeypatch.setattr(kernels, "_warned_fallback", [])
    p = torch.randn(4, 6).requires_grad_()
    p.grad = torch.randn(6, 4).t()  # grad strides differ from the param's: the kernels cannot pair them
    with pytest.raises(ValueError, match="grad shape/strides .* differ.*use backend='foreach'"):
        kernels.create_plan([p], backend="triton")
    with pytest.warns(RuntimeWarning, match="backend='auto' uses foreach"):
        plan = kernels.create_plan([p], adaptive=True, backend="auto")
    assert isinstance(plan, kernels.TorchPlan)
    torch.testing.assert_close(plan.grad_norm().double(), oracle_norm([p], adaptive=True), rtol=1e-6, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback is silent
        kernels.create_plan([p], backend="auto")
    ok = make_params([(5,)])
    assert type(kernels.create_plan(ok, backend="auto")).__name__ == "TritonPlan"


def with_grad_of(p, grad):
    """p with a grad of another dtype (torch >= 2.10 asks for grad_dtype=None first)."""
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None
    try:
        p.grad = grad
    except RuntimeError:
        pytest.skip("this torch does not allow a grad dtype other than the param's")
    return p


def test_triton_mixed_dtype_pairs():
    # fp32 weights with an fp16 grad: one of the kernels' pairs, computed like the other backends
    w = with_grad_of(torch.randn(40000).requires_grad_(), torch.randn(40000).half())
    torch.testing.assert_close(kernels.grad_norm([w], adaptive=True, backend="triton"),
                               kernels.grad_norm([w], adaptive=True, backend="loop"), rtol=1e-6, atol=0)
    q = with_grad_of(w.detach().clone().requires_grad_(), w.grad.clone())
    for p, backend in ((w, "triton"), (q, "loop")):
        kernels.perturb([p], kernels.grad_norm([p], backend=backend), 0.5, backend=backend)
    torch.testing.assert_close(w, q, rtol=1e-6, atol=1e-7)
    # fp16 weights with an fp32 grad: not a pair the kernels take
    p = with_grad_of(torch.randn(5, dtype=torch.float16).requires_grad_(), torch.randn(5))
    with pytest.raises(ValueError, match="float16/float32"):
        kernels.create_plan([p], backend="triton")
    torch.testing.assert_close(kernels.grad_norm([p], backend="foreach").double(), oracle_norm([p]), rtol=1e-6,
                               atol=0)


def check_norm_follows_grads(plan, ps, kw, rtol, steps=3):
    """A reused plan's norm follows its grads: new grads every call, and the plan's result NaN-filled before a
    repeat. A norm kernel that never resets its ticket counter returns its first norm forever: caught here, while
    a repeat on unchanged grads would agree with it. Shared by the interpreted test and the CUDA script."""
    for _ in range(steps):
        for p in ps:
            p.grad.copy_(torch.randn(p.shape, device=p.device).to(p.grad.dtype))
        oracle = oracle_norm(ps, **kw)
        out = plan.grad_norm()
        torch.testing.assert_close(out.double(), oracle, rtol=rtol, atol=0)
        out.fill_(float("nan"))
        torch.testing.assert_close(plan.grad_norm().double(), oracle, rtol=rtol, atol=0)


@pytest.mark.parametrize("mode", ["plain", "eta"])
def test_a_reused_plans_norm_follows_new_grads(mode):
    ps = make_params([(2 * sam_triton.CHUNK + 5,), (3, 5), (7,)]) + make_params([(300,)], torch.bfloat16)
    plan = kernels.create_plan(ps, backend="triton", **MODES[mode])  # two groups: two launches per norm
    check_norm_follows_grads(plan, ps, MODES[mode], rtol=5e-6)


# ---- compiled Triton on a GPU (the session's TRITON_INTERPRET=1 is left out of the subprocess's environment) ----
CUDA_SCRIPT = r"""
import torch
from ftsam_plugin import kernels
from ftsam_plugin.kernels import sam_triton
from ftsam_plugin.kernels.reference import preact_resnet18_shapes
from test_kernels_sam import MODES, SMALL, check_norm_follows_grads, oracle_e, oracle_norm

assert not sam_triton.INTERPRET, "the Triton interpreter is on"
torch.manual_seed(0)
RESNET = preact_resnet18_shapes()


def make(shapes, dtype):
    ps = []
    for s in shapes:
        p = torch.randn(s, device="cuda").to(dtype).requires_grad_()
        p.grad = torch.randn(s, device="cuda").to(dtype)
        ps.append(p)
    return ps


def clone(ps):
    qs = [p.detach().clone().requires_grad_() for p in ps]
    for q, p in zip(qs, ps):
        q.grad = p.grad.clone()
    return qs


# (shapes, dtype, rtol of results in that dtype, rtol of the fp32 norm, modes)
CASES = [(SMALL, torch.float32, 1e-6, 2e-6, list(MODES)),
         # 11.2M terms: one fp32 accumulation order vs another drifts past 1e-6 (torch's own norm too)
         (RESNET, torch.float32, 1e-6, 1e-5, ["plain", "adaptive"]),
         (SMALL, torch.float16, 2e-3, 5e-6, ["eta", "plain"]),  # fp32 norm of upcast grads: as on CPU
         (SMALL, torch.bfloat16, 1.6e-2, 5e-6, ["weights_only"])]
for shapes, dtype, rtol, norm_rtol, modes in CASES:
    for mode in modes:
        kw = MODES[mode]
        base = make(shapes, dtype)
        oracle = oracle_norm(base, **kw)
        norms = {}
        for backend in ("triton", "foreach"):
            norms[backend] = kernels.grad_norm(base, backend=backend, **kw)
            torch.testing.assert_close(norms[backend].double(), oracle, rtol=norm_rtol, atol=0)
        torch.testing.assert_close(norms["triton"], norms["foreach"], rtol=norm_rtol, atol=0)
        # deterministic: fixed-order partial sums, bit-identical on every call
        assert all(torch.equal(kernels.grad_norm(base, backend="triton", **kw), norms["triton"]) for _ in range(3))
        # one plan reused with new grads (and its result NaN-filled between repeats) follows them
        reused = clone(base)
        check_norm_follows_grads(kernels.create_plan(reused, backend="triton", **kw), reused, kw, norm_rtol)
        for store in ("w", "e"):
            after = {}
            for backend in ("triton", "foreach"):
                ps = clone(base)
                saved = kernels.perturb(ps, norms["triton"], 0.5, store=store, backend=backend, **kw)
                for p, b, s in zip(ps, base, saved):
                    e = oracle_e(b, norms["triton"].double(), 0.5, **kw)
                    atol = rtol * b.detach().double().abs().max().item()
                    torch.testing.assert_close(p.detach().double() - b.detach().double(), e, rtol=4 * rtol,
                                               atol=atol)
                    assert torch.equal(s, b.detach()) if store == "w" else s.dtype == dtype
                after[backend] = [p.detach().clone() for p in ps]
                kernels.restore(ps, saved, mode="copy" if store == "w" else "subtract", backend=backend)
                for p, b in zip(ps, base):
                    if store == "w":
                        assert torch.equal(p.detach(), b.detach())
                    else:
                        torch.testing.assert_close(p.detach(), b.detach(), rtol=rtol, atol=rtol)
            for a, b in zip(after["triton"], after["foreach"]):
                torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.double().abs().max().item())
if torch.cuda.device_count() >= 2:  # params on cuda:1 while cuda:0 is current: launched under cuda:1
    torch.cuda.set_device(0)
    ps = [p.to("cuda:1").detach().requires_grad_() for p in make(SMALL, torch.float32)]
    for p in ps:
        p.grad = torch.randn_like(p)
    norm = kernels.grad_norm(ps, adaptive=True, backend="triton")
    assert norm.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    torch.testing.assert_close(norm.double(), oracle_norm(ps, adaptive=True), rtol=2e-6, atol=0)
print("compiled triton ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_compiled_triton_on_cuda_matches_foreach_and_fp64():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = str(Path(__file__).resolve().parent)  # so the script can import this module's oracle
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", CUDA_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "compiled triton ok" in proc.stdout
