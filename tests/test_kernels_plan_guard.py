"""The plan guard (ftsam_plugin.kernels.plan_guard): the compiled check and its Python twin give the same answer,
the expected one, on every failure case, one by one and over random sequences of changes."""

import logging
import random

import pytest
import torch

from ftsam_plugin.kernels import native_build
from ftsam_plugin.kernels import plan_guard as pg

IMPLS = ["compiled", "python"]
# (shape, alignment its grad must keep): an aligned slot, size-1 dims, an empty tensor
SLOTS = [((5,), 16), ((4, 6), 1), ((3, 1, 2, 1), 16), ((0,), 16), ((4, 4), 1)]


def make(slots=SLOTS):
    ps = []
    for shape, _ in slots:
        p = torch.nn.Parameter(torch.randn(shape))
        p.grad = torch.randn(shape)
        ps.append(p)
    return ps


def guards(ps, slots=SLOTS):
    return {impl: pg.create_guard(ps, [a for _, a in slots], impl) for impl in IMPLS}


def misaligned(t):
    """A copy of `t` at an address 4 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 4, dtype=t.dtype)
    start = next(k for k in range(4) if (buf.data_ptr() + 4 * k) % 16 == 4)
    return buf[start:start + t.numel()].view(t.shape).copy_(t)


def restrided(t):
    """`t` with other strides in its size-1 dims only (cuDNN's channels_last 1x1-conv grads look like this)."""
    stride = [s if n > 1 else s * 7 + 3 for n, s in zip(t.shape, t.stride())]
    return torch.empty_strided(t.shape, stride).copy_(t)


def with_bf16_grad(p):
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None
    try:
        p.grad = p.grad.bfloat16()
    except RuntimeError:
        pytest.skip("this torch does not allow a grad dtype other than the param's")


# change -> (what it does to ps, the code and param index it must give). ps[0] (5,) needs 16, ps[1] (4, 6) 1
CASES = {
    "nothing": (lambda ps: None, pg.SAME, -1),
    "grads zeroed in place": (lambda ps: [p.grad.zero_() for p in ps], pg.SAME, -1),
    "grads moved": (lambda ps: [setattr(p, "grad", p.grad.clone()) for p in ps], pg.MOVED, -1),
    "grad strides differ in size-1 dims": (lambda ps: setattr(ps[2], "grad", restrided(ps[2].grad)), pg.MOVED, -1),
    "grad off 16 bytes, slot needs 1": (lambda ps: setattr(ps[1], "grad", misaligned(ps[1].grad)), pg.MOVED, -1),
    "param storage moved": (lambda ps: setattr(ps[1], "data", ps[1].data.clone()), pg.PARAM_STORAGE, 1),
    "param dtype, same address": (lambda ps: setattr(ps[1], "data", ps[1].data.view(torch.float16)),
                                  pg.PARAM_DTYPE, 1),
    "param shrunk, same address": (lambda ps: setattr(ps[1], "data", ps[1].data[:2]), pg.PARAM_SHAPE, 1),
    "param transposed, same address": (lambda ps: setattr(ps[4], "data", ps[4].data.t()), pg.PARAM_STRIDES, 4),
    "grad gone": (lambda ps: setattr(ps[1], "grad", None), pg.NO_GRAD, 1),
    "grad dtype": (lambda ps: with_bf16_grad(ps[1]), pg.GRAD_DTYPE, 1),
    "grad transposed": (lambda ps: setattr(ps[1], "grad", torch.randn(6, 4).t()), pg.GRAD_LAYOUT, 1),
    "grad off 16 bytes, slot needs 16": (lambda ps: setattr(ps[0], "grad", misaligned(ps[0].grad)),
                                         pg.GRAD_ALIGNMENT, 0),
}


def test_every_reason_has_a_case():
    assert {code for _, code, _ in CASES.values()} == {pg.SAME, pg.MOVED, *range(2, 2 + len(pg.REASONS))}


@pytest.mark.parametrize("case", list(CASES))
def test_both_guards_give_the_expected_answer(case):
    change, code, index = CASES[case]
    ps = make()
    gs = guards(ps)
    change(ps)
    got = {impl: g.check() for impl, g in gs.items()}
    assert got == {impl: (code, index) for impl in IMPLS}, got
    if code == pg.MOVED:  # from now on the grads' new place is the reference, and the plans get their addresses
        assert {impl: g.check() for impl, g in gs.items()} == {impl: (pg.SAME, -1) for impl in IMPLS}
        assert all(g.grad_ptrs().tolist() == [p.grad.data_ptr() for p in ps] for g in gs.values())


def test_the_first_change_in_params_order_is_reported():
    ps = make()
    gs = guards(ps)
    ps[4].grad = None
    ps[1].data = ps[1].data.clone()
    assert {impl: g.check() for impl, g in gs.items()} == {impl: (pg.PARAM_STORAGE, 1) for impl in IMPLS}


OPS = [lambda ps, i: None, lambda ps, i: ps[i].grad.zero_(),
       lambda ps, i: setattr(ps[i], "grad", ps[i].grad.clone()),
       lambda ps, i: setattr(ps[i], "grad", restrided(ps[i].grad)),
       lambda ps, i: setattr(ps[i], "grad", misaligned(ps[i].grad)),
       lambda ps, i: setattr(ps[i], "grad", ps[i].grad.t().contiguous().t()) if ps[i].ndim == 2 else None,
       lambda ps, i: setattr(ps[i], "grad", None) if random.random() < 0.3 else None,
       lambda ps, i: setattr(ps[i], "data", ps[i].data.clone()) if random.random() < 0.3 else None,
       lambda ps, i: setattr(ps[i], "data", ps[i].data.flatten()[:1]) if random.random() < 0.3 else None]


@pytest.mark.parametrize("dynamo_guards", [True, False])
def test_both_guards_agree_over_random_changes(dynamo_guards, monkeypatch):
    if not dynamo_guards:  # the Python guard on a torch without TensorGuards: its rule alone
        monkeypatch.setattr(pg, "_TensorGuards", None)
    rng = random.Random(0)
    random.seed(1)
    seen = set()
    ps = make()
    gs = guards(ps)
    for _ in range(400):
        for _ in range(rng.randint(1, 2)):
            rng.choice(OPS)(ps, rng.randrange(len(ps)))
        got = {impl: g.check() for impl, g in gs.items()}
        assert got["compiled"] == got["python"], got
        seen.add(got["python"][0])
        if got["python"][0] >= 2:  # stale: a new plan, a new guard
            ps = make()
            gs = guards(ps)
        else:
            assert torch.equal(gs["compiled"].grad_ptrs(), gs["python"].grad_ptrs())
    assert {pg.SAME, pg.MOVED, pg.PARAM_STORAGE, pg.PARAM_SHAPE, pg.NO_GRAD, pg.GRAD_LAYOUT,
            pg.GRAD_ALIGNMENT} <= seen, seen


def test_python_guard_rechecks_the_quick_checks_false_alarm():
    ps = make()
    guard = pg.PythonGuard(ps, [a for _, a in SLOTS])
    if guard._quick._guard is None:
        pytest.skip("this torch has no TensorGuards: there is no quick check")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # other dispatch keys: TensorGuards says no
        assert not guard._quick.same(guard._params)
        assert guard.check() == (pg.SAME, -1)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_is_refused(impl):
    ps = make()
    with pytest.raises(ValueError, match="params but"):
        pg.create_guard(ps, [1], impl)
    ps[0].grad = None
    with pytest.raises(ValueError, match="needs a grad"):
        pg.create_guard(ps, [1] * len(ps), impl)


def test_implementation_is_chosen_in_one_place(monkeypatch, caplog):
    with pytest.raises(ValueError, match="unknown plan guard 'fast'"):
        pg.resolve_impl("fast")
    monkeypatch.setenv(pg.ENV, "python")
    assert isinstance(pg.create_guard(make(), [1] * len(SLOTS)), pg.PythonGuard)
    monkeypatch.delenv(pg.ENV)

    def no_compiler():
        raise native_build.BuildError("no c++ compiler found")

    monkeypatch.setattr(pg, "compiled_module", no_compiler)
    pg._auto.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="ftsam_plugin.kernels"):
            assert pg.resolve_impl() == "python"  # auto falls back, and says so
        assert "could not be built" in caplog.text
        with pytest.raises(native_build.BuildError):  # asked for by name: fails loudly
            pg.create_guard(make(), [1] * len(SLOTS), "compiled")
    finally:
        pg._auto.cache_clear()


def test_native_build_caches_and_reports_compiler_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    good, bad = tmp_path / "ok.c", tmp_path / "bad.c"
    good.write_text("int answer(void) { return 42; }\n")
    bad.write_text("int answer(void) { return }\n")
    path = native_build.shared_library("ok", good, ["-shared", "-fPIC"])
    assert path.is_file() and str(path).startswith(str(tmp_path / "ftsam" / "native"))
    stamp = path.stat().st_mtime_ns
    assert native_build.shared_library("ok", good, ["-shared", "-fPIC"]) == path and path.stat().st_mtime_ns == stamp
    assert native_build.shared_library("ok", good, ["-shared", "-fPIC", "-O2"]) != path  # other flags: own build
    with pytest.raises(native_build.BuildError, match="building bad.c failed"):
        native_build.shared_library("bad", bad, ["-shared", "-fPIC"])
