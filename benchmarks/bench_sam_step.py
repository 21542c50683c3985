"""Benchmark SAM's norm, perturbation and restore on the PreAct-ResNet18 parameter set (54 tensors, 11.17M).

    python benchmarks/bench_sam_step.py [--reps 20] [--threads N] [--out benchmarks/results/sam_step.md]

CUDA: loop / foreach / triton, kernel time only: each route's plan is built once, the reps are queued back to
back behind a GPU sleep with an L2 flush before each, CUDA events around each (benchmarks/gpu_timing.py); GB/s
against the device's peak. CPU: loop / foreach (Triton's interpreter is no timing, so triton is skipped on
CPU), wall clock. benchmarks/gpu_check.py is the fuller GPU report (fractions of a measured copy_).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from gpu_timing import time_cuda

from ftsam_plugin import kernels
from ftsam_plugin.kernels.reference import preact_resnet18_shapes
from ftsam_plugin.provenance import machine_short

PEAK_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}  # HBM peak by device name


def make_params(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    ps = []
    for s in preact_resnet18_shapes():
        p = torch.randn(s, generator=g).to(device).requires_grad_()
        p.grad = torch.randn(s, generator=g).to(device)
        ps.append(p)
    return ps


def time_cpu(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def peak_gbs():
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and width:
        return 2 * clock * 1e3 * width / 8 / 1e9, name  # DDR: 2 transfers per clock
    return next((v for k, v in PEAK_GBS.items() if k in name), float("nan")), name


def machine():
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    dev += ", load average %.1f/%.1f/%.1f at the end" % os.getloadavg()
    return f"{machine_short()}, {dev}"


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def naive_foreach_adaptive_norm(ps):
    """The unfused composition: abs -> temporary, mul -> temporary, norm (for the investigation row)."""
    t = torch._foreach_abs([p.detach() for p in ps])
    torch._foreach_mul_(t, [p.grad for p in ps])
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(t)))


def run(reps):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ps = make_params(device)
    n = sum(p.numel() for p in ps)
    es = ps[0].element_size()
    backends = ["loop", "foreach"] + (["triton"] if device == "cuda" and kernels.triton_available() else [])
    timer = time_cuda if device == "cuda" else time_cpu
    rows = []
    for mode, adaptive in (("plain", False), ("adaptive", True)):
        moved = {"norm": (2 if adaptive else 1) * n * es, "perturb": 4 * n * es, "restore": 2 * n * es}
        for backend in backends:
            plan = kernels.create_plan(ps, adaptive, restore="copy", backend=backend)  # built once, as in SAM
            norm = plan.grad_norm()
            plan.perturb(norm, 1e-6)
            ops = {"norm": plan.grad_norm, "perturb": lambda: plan.perturb(norm, 1e-6), "restore": plan.restore}
            for op, fn in ops.items():
                us = timer(fn, reps)
                rows.append(dict(mode=mode, op=op, backend=backend, us=us, gbs=moved[op] / us / 1e3))
            plan.restore()
    extra = []
    if device == "cpu":
        extra.append(("adaptive norm, foreach as abs->mul->norm (unfused)",
                      timer(lambda: naive_foreach_adaptive_norm(ps), reps)))
        extra.append(("adaptive norm, loop as davda54 (abs*g).norm, no fp32 cast",
                      timer(lambda: torch.stack([(p.detach().abs() * p.grad).norm() for p in ps]).norm(), reps)))
        extra.append(("plain norm, torch.nn.utils.get_total_norm(foreach=True)",
                      timer(lambda: torch.nn.utils.get_total_norm([p.grad for p in ps], foreach=True), reps)))
    return device, n, backends, rows, extra


def table(device, n, backends, rows, extra, reps):
    peak, dev_name = peak_gbs() if device == "cuda" else (None, None)
    lines = ["| mode | op | " + " | ".join(f"{b} µs" for b in backends) + " | loop/foreach | "
             + ("foreach/triton | triton GB/s (% peak) |" if "triton" in backends else "foreach GB/s |"),
             "|" + "---|" * (3 + len(backends) + (2 if "triton" in backends else 1))]
    for mode in ("plain", "adaptive"):
        for op in ("norm", "perturb", "restore"):
            r = {x["backend"]: x for x in rows if x["mode"] == mode and x["op"] == op}
            cells = [f"{r[b]['us']:.0f}" for b in backends] + [f"{r['loop']['us'] / r['foreach']['us']:.2f}×"]
            if "triton" in backends:
                t = r["triton"]
                cells += [f"{r['foreach']['us'] / t['us']:.2f}×", f"{t['gbs']:.0f} ({100 * t['gbs'] / peak:.0f}%)"]
            else:
                cells += [f"{r['foreach']['gbs']:.1f}"]
            lines.append(f"| {mode} | {op} | " + " | ".join(cells) + " |")
    head = [f"Parameters: {len(preact_resnet18_shapes())} tensors, {n:,} fp32 elements (PreAct-ResNet18, 10 classes).",
            f"Device: {device}" + (f" ({dev_name}, peak {peak:.0f} GB/s, L2 flushed, CUDA events)" if peak else
                                   " (wall clock; triton skipped: the interpreter is no timing)"),
            f"Median of {reps} reps. Bytes counted: norm 4N (8N adaptive), perturb 16N (read w,g; write w,old w), "
            "restore 8N.", ""]
    tail = [""] + [f"- {name}: {us:.0f} µs" for name, us in extra]
    return "\n".join(head + lines + tail)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write a markdown report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, n, backends, rows, extra = run(args.reps)
    text = table(device, n, backends, rows, extra, args.reps)
    print(text)
    if args.out:
        from ftsam_plugin.io import atomic_write_text

        cmd = "python benchmarks/bench_sam_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_text(args.out, f"# SAM step kernels\n\nCommand: `{cmd.strip()}`  \nCommit: {commit()}  \n"
                                    f"Machine: {machine()}\n\n{text}\n")
    return rows


if __name__ == "__main__":
    main()
