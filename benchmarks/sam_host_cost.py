"""Host cost of SAM's extra work per step, on a CPU: launches stubbed, or through Triton's launch path and launcher.

    python benchmarks/sam_host_cost.py [--baseline REV] [--rounds 3] [--reps 1000] [--out FILE.md]
    python benchmarks/sam_host_cost.py --smoke --out /tmp/smoke.md   # every mode and row, a few calls (tests)

The 54 parameter tensors of PreAct-ResNet18 (11.2M fp32, each with a grad) live on the CPU and backend="triton"
is let through on them. What is timed (as CPU time of the measuring thread, so other processes on shared cores
do not inflate it) is the Python/host work a GPU run pays per step (on a GPU the kernels run asynchronously
behind it), in five launch modes, each a column:
- stubbed: each Triton kernel replaced by an object whose launch does nothing (the plans' own work only);
- Triton's path / fast path, stand-in launcher: kernels compiled for sm_90 and launched through
  `kernel[grid](...)` (binding, specialisation, cache look-up, checks), or through the plans' prepared launches
  (`sam_triton.Launch`: after the first, the compiled kernel's launcher called directly), into the stand-in
  driver of ftsam_plugin.kernels.null_driver whose launcher is a Python function that does nothing;
- Triton's path / fast path, Triton's launcher: the same, with Triton's own launcher (its NVIDIA backend's
  CudaLauncher and C launch: arguments unpacked, cuPointerGetAttribute on each pointer, cuLaunchKernelEx) linked
  against a no-op libcuda.so.1 built here (null_driver, launcher="triton"): all a CUDA launch costs on the host
  but the driver's own work inside cuLaunchKernelEx and cuPointerGetAttribute.
Rows:
- SAM step: `first_step()` + `second_step()` of ftsam_plugin.optim.SAM (FT-SAM's ASAM, rho 2) with a base
  optimizer whose step does nothing, grads kept between steps (the base step's own cost is its own row);
- its pieces one by one: the check that the plans still fit (`StepPlans.refresh`) and the three plan calls;
- the same step with the Python plan guard (a machine without a C++ compiler), when all grads moved, and when
  the plans must be rebuilt (storage moved);
- the functional kernels.grad_norm / perturb / restore, which build what they need on every call.
With --baseline REV the same measurement also runs on the package as of git revision REV (taken with git archive
into a temporary folder) and the table puts the two side by side. Each (code, mode, round) runs in a fresh
subprocess; rounds alternate between them; a cell reports the median over rounds of each round's median over
batches of 50 calls, and in brackets the best batch seen.
"""

import argparse
import importlib.util
import inspect
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_US = 20.0  # issues 20 and 32: SAM's own host work per step, fast path, Triton's own launcher
MOVED_TARGET_US = 30.0  # issue 32: the same after every grad moved
MODES = {"stubbed": "launches stubbed", "triton": "Triton's path, stand-in launcher",
         "fast": "fast path, stand-in launcher", "triton-real": "Triton's path, Triton's launcher",
         "fast-real": "fast path, Triton's launcher"}
OWN = "SAM's own host work per step (the two rows above subtracted)"
MOVED_OWN = "SAM's own host work after all grads moved (the moved step less the assignments and the base step)"
PARTS = ("  in it: the check that nothing moved (StepPlans.refresh)", "  in it: the norm launch(es)",
         "  in it: the perturb launch(es)", "  in it: the restore launch(es)")
ROWS = ("SAM step: first_step + second_step", "  of which the base optimizer's no-op step", OWN, *PARTS,
        "SAM step with the Python plan guard (FTSAM_PLAN_GUARD=python: no C++ compiler)",
        "SAM step after all 54 grads moved (incl. the 54 assignments)", "  54 grad assignments alone", MOVED_OWN,
        "SAM step with a plan rebuild (storage moved)", "grad_norm (functional)", "perturb (functional)",
        "restore (functional)")


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


def _stub_launches():
    from ftsam_plugin.kernels import sam_triton

    sam_triton.INTERPRET = sam_triton.LAUNCH_ON_CPU = True  # let backend="triton" take CPU tensors
    for name in sam_triton.KERNELS:
        sam_triton.KERNELS[name] = _NoLaunch()


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _null_driver(fast, launcher):
    """Install the stand-in driver of this checkout (loaded by path: the package measured may predate it)."""
    from ftsam_plugin.kernels import sam_triton

    try:
        import ftsam_plugin.kernels.native_build  # noqa: F401 (a package before it: this checkout's, by path)
    except ImportError:
        _load("ftsam_plugin.kernels.native_build", ROOT / "ftsam_plugin/kernels/native_build.py")
    module = _load("_null_driver", ROOT / "ftsam_plugin/kernels/null_driver.py")
    module.install(launcher=launcher)  # for the rest of this measuring process
    sam_triton.FAST_LAUNCH = fast
    sam_triton.INTERPRET = True  # a package before null_driver checks this to let CPU tensors through


def _per_call_us(fn, reps, batch=50):
    """Median over batches of the CPU time per call of this thread: work by other processes sharing the cores
    (this machine is shared) does not count, unlike wall clock."""
    fn()
    batch = min(batch, reps)
    samples = []
    for _ in range(max(1, reps // batch)):
        start = time.thread_time()
        for _ in range(batch):
            fn()
        samples.append((time.thread_time() - start) / batch * 1e6)
    return [statistics.median(samples), min(samples)]


def _minus(a, *others):
    return [x - sum(o[i] for o in others) for i, x in enumerate(a)]


def _params():
    import torch

    from ftsam_plugin.kernels.reference import preact_resnet18_shapes

    params = []
    for s in preact_resnet18_shapes():
        p = torch.nn.Parameter(torch.randn(s))
        p.grad = torch.randn(s)
        params.append(p)
    return params


def measure(reps, mode):
    """{row: [median, best] µs per call} for the package on sys.path in launch `mode` (None: not in this package)."""
    import torch

    from ftsam_plugin import kernels
    from ftsam_plugin.optim import SAM

    torch.set_num_threads(1)
    if mode == "stubbed":
        _stub_launches()
    else:
        _null_driver(fast=mode.startswith("fast"), launcher="triton" if mode.endswith("real") else "stub")

    class NullOptimizer(torch.optim.Optimizer):
        def __init__(self, params, **kw):
            super().__init__(params, dict(kw))

        def step(self, closure=None):
            return None

    def sam(params):
        return SAM(params, NullOptimizer, rho=2.0, adaptive=True, backend="triton")

    params = _params()
    opt = sam(params)

    def step(o=opt):
        o.first_step()
        o.second_step()

    def rebuild_step():
        opt._plans = None
        step()

    grad_sets = [[p.grad for p in params], [g.clone() for g in (p.grad for p in params)]]

    def swap_grads():  # alternate between two sets of grad tensors: every grad at a new address
        grad_sets.reverse()
        for p, g in zip(params, grad_sets[0]):
            p.grad = g

    def moved_step():
        swap_grads()
        step()

    norm = kernels.grad_norm(params, True, backend="triton")
    saved = kernels.perturb(params, norm, 2.0, True, backend="triton")
    out = dict.fromkeys(ROWS)
    out[ROWS[0]] = _per_call_us(step, reps)
    out[ROWS[1]] = _per_call_us(opt.base_optimizer.step, reps)
    out[OWN] = _minus(out[ROWS[0]], out[ROWS[1]])
    out.update(zip(PARTS, _parts(opt, reps)))
    out[ROWS[7]] = _python_guard_step(sam, step, reps)
    out[ROWS[8]] = _per_call_us(moved_step, reps // 4)
    out[ROWS[9]] = _per_call_us(swap_grads, reps // 4)
    out[MOVED_OWN] = _minus(out[ROWS[8]], out[ROWS[9]], out[ROWS[1]])
    out[ROWS[11]] = _per_call_us(rebuild_step, max(1, reps // 10))
    out["grad_norm (functional)"] = _per_call_us(lambda: kernels.grad_norm(params, True, backend="triton"),
                                                 reps // 4)
    out["perturb (functional)"] = _per_call_us(lambda: kernels.perturb(params, norm, 2.0, True, backend="triton"),
                                               reps // 4)
    out["restore (functional)"] = _per_call_us(lambda: kernels.restore(params, saved, backend="triton"), reps // 4)
    return out


def _python_guard_step(sam, step, reps):
    """A SAM step whose plans were built with FTSAM_PLAN_GUARD=python; None for a package without plan guards."""
    if importlib.util.find_spec("ftsam_plugin.kernels.plan_guard") is None:
        return None
    os.environ["FTSAM_PLAN_GUARD"] = "python"
    try:
        opt = sam(_params())
        step(opt)  # the plans (and their guard) are built now
    finally:
        del os.environ["FTSAM_PLAN_GUARD"]
    return _per_call_us(lambda: step(opt), reps)


def _parts(opt, reps):
    """The pieces of a step with unchanged storage, timed one by one: the check, then the three plan calls
    (none where this package has no StepPlans)."""
    plans = getattr(opt, "_plans", None)
    if plans is None or not hasattr(plans, "refresh"):
        return [None] * len(PARTS)
    norm = plans.grad_norm()
    takes_groups = len(inspect.signature(plans.perturb).parameters) > 1
    perturb = (lambda: plans.perturb(norm, opt.param_groups)) if takes_groups else (lambda: plans.perturb(norm))
    pieces = [lambda: plans.refresh(opt.param_groups), plans.grad_norm, perturb, plans.restore]
    return [_per_call_us(fn, reps) for fn in pieces]


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _extract(rev, dest):
    """The ftsam_plugin package as of `rev` into `dest` (a folder to put on PYTHONPATH)."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "ftsam_plugin"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, **safe)
    return dest


def _run_measure(src, reps, mode):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FTSAM_PLAN_GUARD")}
    env.update(PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", mode, "--reps", str(reps)],
                          env=env, capture_output=True, text=True, cwd=src)
    if proc.returncode:
        raise RuntimeError(f"measurement ({mode}) in {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _combine(results):
    """Per row: (median over rounds of the round medians, min over rounds of the round minima); None for a row
    the package does not have."""
    return {row: None if results[0][row] is None else
            (statistics.median(r[row][0] for r in results), min(r[row][1] for r in results)) for row in ROWS}


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, load average %.1f/%.1f/%.1f at the end" % os.getloadavg()


def _verdicts(columns, names):
    """Target lines and side-by-side ratios for the newest code (the last column group)."""
    newest = names[-1].split(", ")[0]
    real, stand_in = f"{newest}, {MODES['fast-real']}", f"{newest}, {MODES['fast']}"
    lines = []
    if real in columns:
        own, moved = columns[real][OWN], columns[real][MOVED_OWN]
        lines.append(f"Targets (issue 32), {real}: SAM's own host work <= {TARGET_US:.0f} µs per step: median "
                     f"{own[0]:.1f} µs ({'met' if own[0] <= TARGET_US else 'missed'}); after all grads moved <= "
                     f"{MOVED_TARGET_US:.0f} µs: median {moved[0]:.1f} µs "
                     f"({'met' if moved[0] <= MOVED_TARGET_US else 'missed'}).")
        ratios = [f"Triton's launcher / stand-in launcher (fast path, own host work): "
                  f"{own[0] / columns[stand_in][OWN][0]:.2f}"]
        before = [n for n in names if n.endswith(MODES["fast-real"]) and n != real]
        if before:
            ratios.append(f"{newest} / {before[0].split(', ')[0]} (fast path, Triton's launcher, own host work): "
                          f"{own[0] / columns[before[0]][OWN][0]:.2f}")
        lines.append("Ratios, measured side by side in this run: " + "; ".join(ratios) + ".")
    return lines


def report(columns, reps, rounds, argv):
    """Markdown: one column per (code, mode), the targets and ratios for the newest code's fast path."""
    import torch
    import triton

    names = list(columns)
    lines = ["| per call, µs CPU time: median (best batch) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for row in ROWS:
        cells = ["n/a" if columns[n][row] is None else "%.1f (%.1f)" % tuple(columns[n][row]) for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [""] + _verdicts(columns, names)
    cmd = "python benchmarks/sam_host_cost.py " + " ".join(argv)
    head = ["# SAM host cost per step", "", f"Command: `{cmd.strip()}`  ",
            f"Machine: {machine()}; torch {torch.__version__}, Triton {triton.__version__}, 1 thread  ",
            f"CPU time of the measuring thread (`time.thread_time`), median over {rounds} alternating rounds (fresh "
            f"process each) of the median of ~{reps} calls per row (batches of 50); in brackets the best batch of "
            "any round, the least disturbed by the other processes. Parameters: PreAct-ResNet18's 54 tensors, "
            "11,171,146 fp32 elements, on the CPU; ASAM (adaptive), rho 2, restore by copy. Modes: "
            f"*{MODES['stubbed']}* (each kernel a no-op object: the plans' own work); kernels compiled for sm_90 and "
            "launched through Triton's `kernel[grid](...)` (*Triton's path*) or the plans' prepared launches (*fast "
            "path*), into a *stand-in launcher* (a Python function that does nothing) or *Triton's launcher* (its "
            "NVIDIA backend's own, over a no-op libcuda.so.1: a GPU adds only the driver's work inside "
            "cuLaunchKernelEx and cuPointerGetAttribute, three launches per step). The CPU tensors also make "
            "each plan's device guard a no-op.", ""]
    return "\n".join(head + lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to measure beside the working tree (before/after)")
    parser.add_argument("--reps", type=int, default=1000, help="calls per row and round (default 1000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one round of 20 calls per row: checks it all runs")
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.reps, args.measure)))
        return 0
    if args.smoke:
        args.reps, args.rounds = 20, 1
    if args.reps < 4 or args.rounds < 1:
        print("error: --reps must be >= 4 and --rounds >= 1; pass e.g. --reps 1000 --rounds 3", file=sys.stderr)
        return 2
    head = _git("rev-parse", "--short", "HEAD") + ("+changes" if _git("status", "--porcelain", "ftsam_plugin")
                                                   else "")
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {}
        if args.baseline:
            srcs[f"before ({_git('rev-parse', '--short', args.baseline)})"] = _extract(args.baseline, tmp)
        srcs[f"after ({head})"] = ROOT
        runs = [(f"{name}, {label}", src, mode) for name, src in srcs.items() for mode, label in MODES.items()]
        results = {name: [] for name, _, _ in runs}
        for _ in range(args.rounds):
            for name, src, mode in runs:
                results[name].append(_run_measure(src, args.reps, mode))
    text = report({name: _combine(r) for name, r in results.items()}, args.reps, args.rounds, argv)
    print(text)
    if args.out:
        from ftsam_plugin.io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
