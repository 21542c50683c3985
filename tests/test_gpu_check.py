"""benchmarks/gpu_check.py in its CPU smoke mode (Triton interpreter, tiny sizes): the whole report runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_mode_writes_a_passing_report(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu_check.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "SMOKE MODE" in text and "Correctness failures: 0." in text
    results = re.findall(r"^\| (.+?) \| (triton|foreach|loop) \| ([^|]*) \| ([^|]*) \| ([^|]*) \|$", text, re.M)
    cases = {case for case, *_ in results if not case.startswith(("CUDA graph", "Stress"))}
    assert len(cases) >= 10 and len(results) >= 3 * len(cases)
    assert any(case.startswith("fp32 + bf16 params") for case in cases)
    assert any(case.startswith("grads from a channels_last batch (") for case in cases)
    for case, backend, norm_err, pert_err, result in results:
        if case.startswith("CUDA graph"):
            assert "skipped: no CUDA" in result  # the CPU smoke run has no CUDA to capture on
            continue
        if case.startswith("Stress"):
            assert result.strip() == "PASS", (case, result)
            continue
        assert result.strip() == "PASS", (case, backend, result)
        assert float(norm_err) < 1e-5 and float(pert_err) <= 1.0
    for section in ("## 2. Kernel-only timings", "whole SAM extra work", "`sum` of the same", "| `sum` |",
                    "## 3. End to end", "FT-SAM (triton)"):
        assert section in text
    # the defense's own FT-SAM loop: one plan, grads never moved
    row = r"^\| FT-SAM \(triton\) \| [\d.]+ \| [\d.]+× \| 1 builds, 0 grad moves over 3 steps \|$"
    assert re.search(row, text, re.M)
    assert "- met: FT-SAM's loop keeps its grads in place" in text


@pytest.fixture
def gpu_check(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # gpu_check imports gpu_timing as a sibling
    import gpu_check

    return gpu_check


def broken_norms(gpu_check, monkeypatch, broken):
    """Every plan gpu_check builds gets grad_norm = broken(plan, its real grad_norm); the smoke problems of one case."""
    real = gpu_check.kernels.create_plan

    def create_plan(*args, **kw):
        plan = real(*args, **kw)
        plan.grad_norm = broken(plan, plan.grad_norm)
        return plan

    monkeypatch.setattr(gpu_check.kernels, "create_plan", create_plan)
    cpu = gpu_check.torch.device("cpu")
    return gpu_check.check_backend(lambda: gpu_check.make([(5,), (3, 4)], cpu), "triton", True, 0.0, False)[0]


def test_repeatability_checks_can_fail(gpu_check, monkeypatch):
    # a plan whose grads double before every norm: the norm and the perturbation change from call to call
    def drifting(plan, norm):
        return lambda: ([p.grad.mul_(2) for p in plan.params], norm())[1]

    problems = broken_norms(gpu_check, monkeypatch, drifting)
    assert "norm not bitwise repeatable" in problems
    assert "perturbation not bitwise repeatable" in problems


def test_stale_norm_checks_can_fail(gpu_check, monkeypatch):
    # a plan whose norm is computed once and never written again, as with a norm kernel whose ticket counter is
    # never reset: repeating it on unchanged grads would agree; NaN-filling its result and doubling the grads do not
    def stale(plan, norm):
        first = []
        return lambda: first[0] if first else (first.append(norm()), first[0])[1]

    problems = broken_norms(gpu_check, monkeypatch, stale)
    assert "norm not bitwise repeatable" in problems
    assert any(p.startswith("norm of a reused plan does not follow its grads") for p in problems), problems
    rows, failed = gpu_check.check_stress(gpu_check.torch.device("cpu"), smoke=True)
    assert failed and "the doubled grads' norm is not 2x" in rows[0]
