"""The plans' fast launch path, checked on the CPU with a stand-in CUDA driver (ftsam_plugin.kernels.null_driver).

Kernels compile for sm_90 (Triton ships ptxas) and the driver's launcher records what it is handed instead of
launching; runs in a subprocess without TRITON_INTERPRET (the session's kernels are interpreted). A fast launch
must hand the launcher exactly what Triton's own `kernel[grid](...)` hands it, on the current stream; launch
hooks (a profiler) and FAST_LAUNCH=False keep Triton's path; every variant a launch compiles is one the compile
test builds. Through Triton's own launcher (over a no-op libcuda.so.1) the two paths reach cuLaunchKernelEx
with the same grid and arguments. The interpreted fallback is what every other kernel test runs.
"""

import os
import subprocess
import sys

import pytest
import torch

from ftsam_plugin import kernels

PRELUDE = r"""
import torch
from ftsam_plugin import kernels
from ftsam_plugin.kernels import null_driver, sam_triton

def params():
    ps = []
    for shape, dtype in (((300,), torch.float32), ((5, 7), torch.float32), ((200,), torch.bfloat16)):
        p = torch.randn(shape).to(dtype).requires_grad_()
        p.grad = torch.randn(shape).to(dtype)
        ps.append(p)
    return ps
"""

SCRIPT = PRELUDE + r"""
from triton import knobs

def same(a, b):  # Triton's path passes a tensor, the fast path its address
    if isinstance(a, torch.Tensor):
        return b == a.data_ptr() if isinstance(b, int) else a is b
    return type(a) is type(b) and a == b

def run(plan):
    plan.grad_norm(); plan.perturb(plan._out, 0.5); plan.restore()

def hooked(record):  # Triton's own path passes its launch metadata and (empty) hook chains; the fast path None
    return record.hooks != (None, None, None)

with null_driver.installed(arch=90, record=True) as driver:
    ps, norm = params(), torch.tensor(3.0)
    plan = kernels.create_plan(ps, adaptive=True, backend="triton")
    assert len(plan._groups) == 2
    run(plan)  # each launch's first call: Triton's path, compiling
    slow = list(driver.launches)
    assert len(slow) == 6 and all(hooked(r) for r in slow)
    driver.launches.clear()
    driver.stream = 7  # the current stream: taken at each launch
    run(plan)
    fast = list(driver.launches)
    assert len(fast) == 6 and not any(hooked(r) for r in fast), [r.hooks for r in fast]
    for s, f in zip(slow, fast):
        assert (s.grid, s.function, s.metadata) == (f.grid, f.function, f.metadata), (s, f)
        assert f.stream == 7 and s.stream == 0
        assert len(s.args) == len(f.args) and all(map(same, s.args, f.args)), (s.args, f.args)
    driver.launches.clear()
    plan.perturb(norm, 0.25)  # another norm tensor and rho: the two arguments given per call
    for s, f in zip(slow[2:4], driver.launches):
        assert f.args[2] == norm.data_ptr() and f.args[5] == 0.25 and s.args[5] == 0.5
        assert all(same(a, b) for i, (a, b) in enumerate(zip(s.args, f.args)) if i not in (2, 5))

    calls = []
    hook = lambda metadata: calls.append(metadata)
    knobs.runtime.launch_enter_hook.add(hook)  # a profiler: Triton's path, which feeds it
    driver.launches.clear()
    plan.grad_norm()
    assert all(hooked(r) for r in driver.launches) and len(driver.launches) == 2
    knobs.runtime.launch_enter_hook.remove(hook)
    driver.launches.clear()
    plan.grad_norm()
    assert not any(hooked(r) for r in driver.launches)

    # every variant a launch compiles is one compile_check builds ahead: plans whose groups have odd sizes (an odd
    # table length would leave the next work list 8 bytes off), several groups, an unaligned (masked) group
    from ftsam_plugin.kernels import compile_check
    buf = torch.randn(1000)
    views = [buf[1 + 10 * k:11 + 10 * k].requires_grad_() for k in range(3)]  # 4 bytes past 16: masked
    for v in views:
        v.grad = torch.randn(10)
    for ps in (params() + params()[:1], params()[:1] + params()[2:], views + params()):
        odd = kernels.create_plan(ps, adaptive=True, backend="triton")
        run(odd)
        run(odd)
    signature = {len(fn.arg_names): list(sam_triton.SIGNATURES[k].values()) for k, fn in sam_triton.KERNELS.items()}
    for r in driver.launches:  # every pointer argument, a tensor (Triton's path) or an address (the fast path)
        pointers = [a for a, t in zip(r.args, signature[len(r.args)]) if t.startswith("*")]
        assert all((a.data_ptr() if isinstance(a, torch.Tensor) else a) % 16 == 0 for a in pointers), r.args
    built = [compile_check.source(*spec) for spec in sam_triton.specialisations()]
    compiled = [k.src for fn in sam_triton.KERNELS.values() for caches in fn.device_caches.values()
                for k in caches[0].values()]
    assert len(compiled) == 9, len(compiled)  # fp32, bf16 and unaligned fp32: three kernels each
    for src in compiled:
        assert any(ref.fn is src.fn and ref.constants == src.constants and ref.signature == src.signature
                   and ref.attrs == {k: v for k, v in src.attrs.items() if v} for ref in built), src.attrs

    sam_triton.FAST_LAUNCH = False  # plans built now keep Triton's path
    off = kernels.create_plan(params(), backend="triton")
    driver.launches.clear()
    for _ in range(2):
        off.grad_norm()
    assert len(driver.launches) == 4 and all(hooked(r) for r in driver.launches)
print("fast launch ok")
"""


REAL_LAUNCHER = PRELUDE + r"""

def words(kind, args):  # a pointer's 8 bytes, a 4-byte scalar's low 4 (the launcher reads 8 at each argument)
    types = list(sam_triton.SIGNATURES[kind].values())
    return [a if t.startswith("*") else a & 0xFFFFFFFF for t, a in zip(types, args)]

def each(driver, plan):  # norm, perturb and restore: cuLaunchKernelEx once per group each, the last one kept
    out = []
    for call in (plan.grad_norm, lambda: plan.perturb(plan._out, 0.5), plan.restore):
        before = driver.cuda_launches()
        call()
        assert driver.cuda_launches() == before + len(plan._groups) == before + 2
        out.append(driver.last_cuda_launch())
    return out

def check(plan, slow, fast):
    for kind, s, f in zip(("sumsq", "perturb", "restore"), slow, fast):
        assert (s["grid"], s["block"], s["function"]) == (f["grid"], f["block"], f["function"]) == \
            ((plan._groups[-1].n_work, 1, 1), (32 * sam_triton.NUM_WARPS, 1, 1), 1), (s, f)
        assert words(kind, s["args"]) == words(kind, f["args"]), (kind, s["args"], f["args"])
    last = plan._groups[-1]
    assert fast[0]["args"] == [t.data_ptr() for t in (last.table, last.work, plan._partials, plan._counter,
                                                        plan._out)]

with null_driver.installed(arch=90, launcher="triton") as driver:
    for direct in (True, False):  # Triton 3.8's C launch called directly; the launcher object (other Tritons)
        if not direct:
            sam_triton._c_launch = lambda run: None
        plan = kernels.create_plan(params(), adaptive=True, backend="triton")
        slow = each(driver, plan)  # first calls: Triton's kernel[grid](...) (compiling the first time)
        fast = each(driver, plan)
        assert all(callable(launch._fast) for g in plan._groups for launch in (g.norm, g.perturb, g.restore))
        check(plan, slow, fast)
print("real launcher ok")
"""


def test_fast_launches_through_tritons_own_launcher_match_its_path():
    # Triton's compiled launcher (its NVIDIA backend's C launch) over a no-op libcuda.so.1: what reaches
    # cuLaunchKernelEx from a fast launch equals what Triton's kernel[grid](...) passes
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", REAL_LAUNCHER], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "real launcher ok" in proc.stdout


def test_fast_launches_hand_the_launcher_what_triton_does():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "fast launch ok" in proc.stdout


def test_interpreted_launches_keep_tritons_path():
    ps = [torch.randn(5).requires_grad_()]
    ps[0].grad = torch.randn(5)
    plan = kernels.create_plan(ps, backend="triton")
    plan.grad_norm()
    plan.grad_norm()
    assert plan._groups[0].norm._fast is False  # the interpreter returns no compiled kernel: no fast path
