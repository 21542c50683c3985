"""benchmarks/sam_host_cost.py in its smoke mode (a few calls per row): every launch mode and row still runs, so the
benchmark behind benchmarks/results/sam_host_cost.md cannot rot. Timings are not checked (no timed asserts)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_host_cost_benchmark_smoke_run_fills_every_cell(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sam_host_cost
    out = tmp_path / "host_cost.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sam_host_cost.py"), "--smoke", "--out",
                           str(out)], env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| per call"))
    assert [c.strip().split(", ", 1)[1] for c in header.split("|")[2:-1]] == list(sam_host_cost.MODES.values())
    for row in sam_host_cost.ROWS:
        line = next(line for line in text.splitlines() if line.startswith(f"| {row} |"))
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert len(cells) == len(sam_host_cost.MODES) and all(re.fullmatch(r"-?[\d.]+ \(-?[\d.]+\)", c)
                                                              for c in cells), line
    assert re.search(r"^Targets \(issue 32\), .*fast path, Triton's launcher: SAM's own host work <= 20 µs", text,
                     re.M)
    assert "Ratios, measured side by side in this run: Triton's launcher / stand-in launcher" in text


def test_host_cost_benchmark_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sam_host_cost.py"), "--reps", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --reps must be >= 4") and "Traceback" not in \
        proc.stderr
