"""Host cost of SAM's extra work per step, on a CPU: launches stubbed, or through Triton's launch path.

    python benchmarks/sam_host_cost.py [--baseline REV] [--rounds 3] [--out benchmarks/results/sam_host_cost.md]

The 54 parameter tensors of PreAct-ResNet18 (11.2M fp32, each with a grad) live on the CPU and backend="triton"
is let through on them. What is timed (as CPU time of the measuring thread, so other processes on shared cores
do not inflate it) is the Python/host work a GPU run pays per step (on a GPU the kernels run asynchronously
behind it), in three launch modes, each a column:
- stubbed: each Triton kernel replaced by an object whose launch does nothing (the plans' own work only);
- Triton's path: kernels compiled for sm_90 and launched through `kernel[grid](...)` (binding, specialisation,
  cache look-up, checks) into a stand-in driver whose launcher does nothing (ftsam_plugin.kernels.null_driver):
  all a CUDA launch costs on the host except the driver's cuLaunchKernel itself (a few µs);
- fast path: the same, with the plans' prepared launches (`sam_triton.Launch`: after the first launch, the
  compiled kernel's launcher called directly); only where the package has them.
Rows:
- SAM step: `first_step()` + `second_step()` of ftsam_plugin.optim.SAM (FT-SAM's ASAM, rho 2) with a base
  optimizer whose step does nothing, grads kept between steps (the base step's own cost is its own row);
- its pieces one by one: the checks that the plans still fit (settings, grads, data pointers, layouts) and the
  three plan calls (the launches);
- the same step when all grads moved, and when the plans must be rebuilt (storage moved);
- the functional kernels.grad_norm / perturb / restore, which build what they need on every call.
With --baseline REV the same measurement also runs on the package as of git revision REV (taken with git archive
into a temporary folder) and the table puts the two side by side. Each (code, mode, round) runs in a fresh
subprocess; rounds alternate between them; a cell reports the median over rounds of each round's median over
batches of 50 calls, and in brackets the best batch seen.
"""

import argparse
import importlib.util
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
TARGET_US = 20.0  # issue 20: SAM's own host work per step with the fast path, launch path included
MODES = {"stubbed": "launches stubbed", "triton": "Triton's launch path", "fast": "fast path"}
PARTS = ("  in it: the groups' settings compared", "  in it: the 54 grads gathered",
         "  in it: 108 data pointers compared", "  in it: 108 dtypes, shapes and strides compared",
         "  in it: the norm launch(es)", "  in it: the perturb launch(es)", "  in it: the restore launch(es)")
ROWS = ("SAM step: first_step + second_step", "  of which the base optimizer's no-op step",
        "SAM's own host work per step (the two rows above subtracted)", *PARTS,
        "SAM step after all 54 grads moved (incl. the 54 assignments)", "  54 grad assignments alone",
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
    if hasattr(sam_triton, "KERNELS"):
        for name in sam_triton.KERNELS:
            sam_triton.KERNELS[name] = _NoLaunch()
    else:  # the package before the plans: module-level kernels
        for name in ("_sumsq_kernel", "_finish_norm_kernel", "_perturb_kernel", "_restore_kernel"):
            setattr(sam_triton, name, _NoLaunch())


def _null_driver(fast):
    """Install the stand-in driver of this checkout (loaded by path: the package measured may predate it)."""
    from ftsam_plugin.kernels import sam_triton

    if fast and not hasattr(sam_triton, "Launch"):
        return False
    spec = importlib.util.spec_from_file_location("_null_driver", ROOT / "ftsam_plugin/kernels/null_driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install()  # for the rest of this measuring process
    sam_triton.FAST_LAUNCH = fast
    sam_triton.INTERPRET = True  # a package before null_driver checks this to let CPU tensors through
    return True


def _per_call_us(fn, reps, batch=50):
    """Median over batches of the CPU time per call of this thread: work by other processes sharing the cores
    (this machine is shared) does not count, unlike wall clock."""
    fn()
    samples = []
    for _ in range(max(1, reps // batch)):
        start = time.thread_time()
        for _ in range(batch):
            fn()
        samples.append((time.thread_time() - start) / batch * 1e6)
    return [statistics.median(samples), min(samples)]


def measure(reps, mode):
    """{row: [median, best] µs per call} for the package on sys.path in launch `mode`; None if it has no such
    mode (the fast path before it existed)."""
    import torch

    from ftsam_plugin import kernels
    from ftsam_plugin.kernels.reference import preact_resnet18_shapes
    from ftsam_plugin.optim import SAM

    torch.set_num_threads(1)
    if mode == "stubbed":
        _stub_launches()
    elif not _null_driver(fast=mode == "fast"):
        return None

    class NullOptimizer(torch.optim.Optimizer):
        def __init__(self, params, **kw):
            super().__init__(params, dict(kw))

        def step(self, closure=None):
            return None

    params = []
    for s in preact_resnet18_shapes():
        p = torch.nn.Parameter(torch.randn(s))
        p.grad = torch.randn(s)
        params.append(p)
    opt = SAM(params, NullOptimizer, rho=2.0, adaptive=True, backend="triton")

    def step():
        opt.first_step()
        opt.second_step()

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
    out = {ROWS[0]: _per_call_us(step, reps), ROWS[1]: _per_call_us(opt.base_optimizer.step, reps)}
    out[ROWS[2]] = [a - b for a, b in zip(out[ROWS[0]], out[ROWS[1]])]
    out.update(zip(PARTS, _parts(opt, reps)))
    out["SAM step after all 54 grads moved (incl. the 54 assignments)"] = _per_call_us(moved_step, reps // 4)
    out["  54 grad assignments alone"] = _per_call_us(swap_grads, reps // 4)
    out["SAM step with a plan rebuild (storage moved)"] = (_per_call_us(rebuild_step, reps // 10)
                                                           if hasattr(opt, "_plans") else None)
    out["grad_norm (functional)"] = _per_call_us(lambda: kernels.grad_norm(params, True, backend="triton"),
                                                 reps // 4)
    out["perturb (functional)"] = _per_call_us(lambda: kernels.perturb(params, norm, 2.0, True, backend="triton"),
                                               reps // 4)
    out["restore (functional)"] = _per_call_us(lambda: kernels.restore(params, saved, backend="triton"), reps // 4)
    return out


def _parts(opt, reps):
    """The pieces of a step with unchanged storage, timed one by one (None where this package has no such piece:
    the parts read the optimizer's plans, `ftsam_plugin.optim.step_plans`)."""
    plans = getattr(opt, "_plans", None)
    if plans is None or not hasattr(plans, "_ptrs"):
        return [None] * len(PARTS)
    from ftsam_plugin.optim import step_plans

    tensors = plans._params + [p.grad for p in plans._params]
    layouts = getattr(plans, "_layouts", None)
    norm = plans.grad_norm()
    pieces = [lambda: step_plans._settings(opt.param_groups), lambda: [p.grad for p in plans._params],
              lambda: step_plans._ptrs_equal(tensors, plans._ptrs, plans._index),
              None if layouts is None else lambda: layouts.quick(tensors),
              plans.grad_norm, lambda: plans.perturb(norm), plans.restore]  # nothing runs: launches do nothing
    return [None if fn is None else _per_call_us(fn, reps) for fn in pieces]


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
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", mode, "--reps", str(reps)],
                          env=env, capture_output=True, text=True, cwd=src)
    if proc.returncode:
        raise RuntimeError(f"measurement ({mode}) in {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _combine(results):
    """Per row: (median over rounds of the round medians, min over rounds of the round minima); None for a mode
    the package does not have."""
    if results[0] is None:
        return None
    return {row: None if results[0][row] is None else
            (statistics.median(r[row][0] for r in results), min(r[row][1] for r in results)) for row in ROWS}


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, load average %.1f/%.1f/%.1f at the end" % os.getloadavg()


def report(columns, reps, rounds, argv):
    """Markdown: one column per (code, mode) that exists, the target line for the newest code's fast path."""
    import torch
    import triton

    names = [n for n in columns if columns[n] is not None]
    lines = ["| per call, µs CPU time: median (best batch) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for row in ROWS:
        cells = ["n/a" if columns[n][row] is None else "%.1f (%.1f)" % columns[n][row] for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    fast = [n for n in names if n.endswith(MODES["fast"])]
    if fast:
        own = columns[fast[-1]][ROWS[2]]
        lines += ["", f"Target (issue 20): SAM's own host work <= {TARGET_US:.0f} µs per step, launch path included. "
                  f"{fast[-1]}: median {own[0]:.1f} µs ({'met' if own[0] <= TARGET_US else 'missed'}), best batch "
                  f"{own[1]:.1f} µs ({'met' if own[1] <= TARGET_US else 'missed'})."]
    cmd = "python benchmarks/sam_host_cost.py " + " ".join(argv)
    head = ["# SAM host cost per step", "", f"Command: `{cmd.strip()}`  ",
            f"Machine: {machine()}; torch {torch.__version__}, Triton {triton.__version__}, 1 thread  ",
            f"CPU time of the measuring thread (`time.thread_time`), median over {rounds} alternating rounds (fresh "
            f"process each) of the median of ~{reps} calls per row (batches of 50); in brackets the best batch of "
            "any round, the least disturbed by the other processes. Parameters: PreAct-ResNet18's 54 tensors, "
            "11,171,146 fp32 elements, on the CPU; ASAM (adaptive), rho 2, restore by copy. Modes: "
            f"*{MODES['stubbed']}* (each kernel a no-op object: the plans' own work), *{MODES['triton']}* (kernels "
            "compiled for sm_90, launched through Triton's `kernel[grid](...)` into a stand-in driver whose "
            f"launcher does nothing), *{MODES['fast']}* (the same with the plans' prepared launches). A real GPU adds "
            "the driver's own launch call (a few µs per launch, three launches per step) to the last two; the "
            "CPU tensors here also make each plan's device guard a no-op.", ""]
    return "\n".join(head + lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to measure beside the working tree (before/after)")
    parser.add_argument("--reps", type=int, default=2000, help="calls per row and round (default 2000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.reps, args.measure)))
        return 0
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
