"""The SAM Triton kernels compiled for real NVIDIA targets on this CPU-only machine (Triton ships ptxas).

Runs ftsam_plugin.kernels.compile_check in a subprocess without TRITON_INTERPRET (the session's kernels are
interpreted) over every variant the plans can launch, for sm_80 and sm_90 (and sm_100 where the installed
Triton builds for it), and checks the generated code: no register spills, and in the aligned variants a main
loop made only of 128-bit global loads (`ld.global.v4`); the masked variants are the control (no v4 loads).
"""

import json
import os
import subprocess
import sys

import pytest

REQUIRED = (80, 90)
OPTIONAL = (100,)


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    archs = ",".join(map(str, REQUIRED + OPTIONAL))
    proc = subprocess.run([sys.executable, "-m", "ftsam_plugin.kernels.compile_check", "--arch", archs, "--json"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_variant_compiles_for_the_required_targets(report):
    from ftsam_plugin.kernels import compile_check
    from ftsam_plugin.kernels import sam_triton

    n = len(sam_triton.specialisations())
    assert n == 26  # 5 dtype pairs x {sumsq, perturb} + 3 param dtypes x restore, each aligned or not
    for arch in REQUIRED:
        assert str(arch) not in report["skipped"], report["skipped"]
        rows = [r for r in report["rows"] if r["arch"] == arch]
        assert len(rows) == n
        for r in rows:
            assert compile_check.problems(r) == [], r
    built = {r["arch"] for r in report["rows"]}
    for arch in OPTIONAL:  # built and clean, or reported as not buildable by this Triton
        assert (arch in built) != (str(arch) in report["skipped"])
        for r in (r for r in report["rows"] if r["arch"] == arch):
            assert compile_check.problems(r) == [], r


def test_aligned_main_loops_are_128_bit_and_masked_ones_are_not(report):
    for r in report["rows"]:
        assert r["spill_bytes"] == 0
        if r["aligned"]:
            assert r["loads_v4"] >= 2 and r["loads_narrow"] == 0 and r["stores_narrow"] == 0, r
            assert r["kind"] == "sumsq" or r["stores_v4"] >= 1, r
        else:
            assert r["loads_v4"] == 0 and r["loads_narrow"] > 0, r


def test_ptx_loop_reader_on_a_known_snippet():
    from ftsam_plugin.kernels.compile_check import main_loop

    ptx = "\n".join(["ld.global.b64 {%rd1}, [%rd2];", "$L__BB0_2:", "ld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd3];",
                     "@%p1 ld.global.v4.b32 {%r5,%r6,%r7,%r8}, [%rd4];", "st.global.v4.b32 [%rd5], {%r1,%r2,%r3,%r4};",
                     "@%p4 bra $L__BB0_2;", "$L__BB0_3:", "ld.global.b32 {%r9}, [%rd6];", "bra.uni $L__BB0_3;"])
    assert main_loop(ptx) == dict(loads_v4=2, loads_narrow=0, stores_v4=1, stores_narrow=0)
    assert main_loop("ld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd3];")["loads_v4"] == 0  # not in a loop
