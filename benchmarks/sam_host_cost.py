"""Host cost of SAM's extra work per step with every GPU launch stubbed out (runs on a CPU, needs no GPU).

    python benchmarks/sam_host_cost.py [--baseline REV] [--rounds 3] [--out benchmarks/results/sam_host_cost.md]

The 54 parameter tensors of PreAct-ResNet18 (11.2M fp32, each with a grad) live on the CPU; backend="triton" is
let through on CPU tensors and each Triton kernel is replaced by an object whose launch does nothing, so what is
timed (as CPU time of the measuring thread, so other processes on shared cores do not inflate it) is
exactly the Python/host work around the launches (on a GPU the kernels run asynchronously behind it;
Triton's own launcher cost comes on top and is measured by benchmarks/gpu_check.py on a GPU). Rows:
- SAM step: `first_step()` + `second_step()` of ftsam_plugin.optim.SAM (FT-SAM's ASAM, rho 2) with a base
  optimizer whose step does nothing, grads kept between steps (the base step's own cost is its own row);
- the same step when the plans must be rebuilt (storage moved), where the optimizer caches plans;
- the functional kernels.grad_norm / perturb / restore, which build what they need on every call.
With --baseline REV the same measurement also runs on the package as of git revision REV (taken with git archive
into a temporary folder) and the table puts the two side by side. Each (code, round) runs in a fresh subprocess;
rounds alternate between the two; a row reports the median over rounds of each round's median over batches of
50 calls, and the best batch seen.
"""

import argparse
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
TARGET_US = 40.0
ROWS = ("SAM step: first_step + second_step", "  of which the base optimizer's no-op step",
        "SAM's own host work per step (the two rows above subtracted)",
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

    sam_triton.INTERPRET = True  # let backend="triton" accept CPU tensors (nothing runs: launches are stubbed)
    if hasattr(sam_triton, "KERNELS"):
        for name in sam_triton.KERNELS:
            sam_triton.KERNELS[name] = _NoLaunch()
    else:  # the package before the plans: module-level kernels
        for name in ("_sumsq_kernel", "_finish_norm_kernel", "_perturb_kernel", "_restore_kernel"):
            setattr(sam_triton, name, _NoLaunch())


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


def measure(reps):
    """{row: median µs per call} for the package on sys.path (launches stubbed)."""
    import torch

    from ftsam_plugin import kernels
    from ftsam_plugin.kernels.reference import preact_resnet18_shapes
    from ftsam_plugin.optim import SAM

    torch.set_num_threads(1)
    _stub_launches()

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
    out[ROWS[3]] = _per_call_us(moved_step, reps // 4)
    out[ROWS[4]] = _per_call_us(swap_grads, reps // 4)
    out[ROWS[5]] = _per_call_us(rebuild_step, reps // 10) if hasattr(opt, "_plans") else None
    out[ROWS[6]] = _per_call_us(lambda: kernels.grad_norm(params, True, backend="triton"), reps // 4)
    out[ROWS[7]] = _per_call_us(lambda: kernels.perturb(params, norm, 2.0, True, backend="triton"), reps // 4)
    out[ROWS[8]] = _per_call_us(lambda: kernels.restore(params, saved, backend="triton"), reps // 4)
    return out


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


def _run_measure(src, reps):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", "--reps", str(reps)], env=env,
                          capture_output=True, text=True, cwd=src)
    if proc.returncode:
        raise RuntimeError(f"measurement in {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _combine(results):
    """Per row: (median over rounds of the round medians, min over rounds of the round minima)."""
    return {row: None if results[0][row] is None else
            (statistics.median(r[row][0] for r in results), min(r[row][1] for r in results)) for row in ROWS}


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, load average %.1f/%.1f/%.1f at the end" % os.getloadavg()


def report(columns, reps, rounds, argv):
    import torch

    names = list(columns)
    lines = ["| per call, µs CPU time (launches stubbed): median (best batch) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for row in ROWS:
        cells = ["n/a" if columns[n][row] is None else "%.1f (%.1f)" % columns[n][row] for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    own = columns[names[-1]][ROWS[2]]
    lines += ["", f"Target (issue 11): SAM's own host work <= {TARGET_US:.0f} µs per step. {names[-1]}: median "
              f"{own[0]:.1f} µs ({'met' if own[0] <= TARGET_US else 'missed'}), best batch {own[1]:.1f} µs "
              f"({'met' if own[1] <= TARGET_US else 'missed'})."]
    cmd = "python benchmarks/sam_host_cost.py " + " ".join(argv)
    head = ["# SAM host cost per step (kernel launches stubbed)", "", f"Command: `{cmd.strip()}`  ",
            f"Machine: {machine()}; torch {torch.__version__}, 1 thread  ",
            f"CPU time of the measuring thread (`time.thread_time`), median over {rounds} alternating rounds (fresh "
            f"process each) of the median of ~{reps} calls per row (batches of 50); in brackets the best batch of "
            "any round, the least disturbed by the other processes. Parameters: PreAct-ResNet18's 54 tensors, "
            "11,171,146 fp32 elements, on the CPU; ASAM (adaptive), rho 2, restore by copy.", ""]
    return "\n".join(head + lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to measure beside the working tree (before/after)")
    parser.add_argument("--reps", type=int, default=2000, help="calls per row and round (default 2000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.reps)))
        return 0
    head = _git("rev-parse", "--short", "HEAD") + ("+changes" if _git("status", "--porcelain", "ftsam_plugin")
                                                   else "")
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {}
        if args.baseline:
            srcs[f"before ({_git('rev-parse', '--short', args.baseline)})"] = _extract(args.baseline, tmp)
        srcs[f"after ({head})"] = ROOT
        results = {name: [] for name in srcs}
        for _ in range(args.rounds):
            for name, src in srcs.items():
                results[name].append(_run_measure(src, args.reps))
    text = report({name: _combine(r) for name, r in results.items()}, args.reps, args.rounds, argv)
    print(text)
    if args.out:
        from ftsam_plugin.io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
