"""One-command GPU check of the SAM kernels: compiled correctness, kernel bandwidth, end-to-end step time.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check_<device>.md] [--reps 20]
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.md   # CPU, Triton interpreter, tiny sizes (CI)

Sized for well under 5 minutes on one H100/H200 (not yet timed on one); writes a Markdown report naming the device:
1. Correctness of every backend (triton, foreach, loop) against an fp64 oracle on PreAct-ResNet18's 54 tensors
   (fp32 SAM and ASAM, channels_last, bf16, fp16, weights-only ASAM, fp32 weights with bf16 grads, fp32 + bf16
   params in one plan (two launches per norm sharing the ticket counter), the grads a channels_last batch gives
   a contiguous model (their real strides), zero-element and unaligned tensors): norm, perturbation, exact
   copy-restore and subtract-restore; a reused Triton plan's norm bitwise repeatable with its result NaN-filled
   before each call, and following its grads when they double; the perturbation bitwise repeatable; the
   path-aware step (PAM, optim/path.py: the same kernels with d = theta0 - w read as g; two param groups with
   their own rho) on each backend, its ||d|| and perturbation against fp64 and its restore exact; a Triton
   plan captured in a CUDA graph and replayed (its norm NaN-filled first) equals eager; a stress loop (thousands
   of eager norms of the two-launch plan with its grads doubled on every second call, and of graph replays of
   norm + perturb and of restore) compared bit for bit with the first of each kind. A norm kernel that stops
   writing its result (a ticket counter never reset) fails each of these.
2. Kernel-only timings, plan prebuilt, launches queued back to back behind a GPU sleep, L2 flushed before each
   rep, CUDA events: norm / perturb / restore / the whole SAM extra work (ASAM, fp32), as GB/s and as a
   fraction of a measured reference on the same device: a `sum` (read only) for the norms, which only read,
   a `copy_` (read + write) for the rest; for triton, foreach and loop; and the host time to queue each route
   (real launches, GPU kept busy).
3. End to end: the defense's own FT-SAM step (`FTSAM.train_step`: two forward/backward passes, BN frozen in the
   second, SAM with each backend) against a plain SGD step, PreAct-ResNet18, CIFAR-size batch, bf16 autocast;
   plan rebuilds and steps whose grads had moved counted (target: none moved, the grads are zeroed in place).
Exit status 1 when a correctness check fails (speed targets are reported, not enforced). Uses only APIs of
torch 2.1+ / Triton 3.x (the GPU image has torch 2.11, Triton 3.6).
"""

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # the interpreter must be chosen before any @triton.jit function is decorated
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from gpu_timing import time_cuda  # noqa: E402
from gpu_timing import time_host  # noqa: E402
from gpu_timing import time_wall  # noqa: E402

from ftsam_plugin import kernels  # noqa: E402
from ftsam_plugin.kernels.reference import preact_resnet18_shapes  # noqa: E402
from ftsam_plugin.models import create_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("triton", "foreach", "loop")
RTOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # results rounded to these dtypes
NORM_RTOL = 1e-5  # fp32 accumulation of up to 11.2M terms, in some order, against fp64
TINY = [(0,), (3, 0, 2), (1,), (7,), (3, 4, 3, 3)]
SMOKE_SHAPES = [(5,), (4, 3, 3, 3), (0,), (9, 4)]


# ---- the fp64 oracle ----
def fp64_reference(params, rho, adaptive, eta, weights_only):
    """(norm, [e]) in float64 from the formula: T = |w| + eta where scaled, e = rho T^2 g / (||T g|| + 1e-12)."""
    ts = [(p.detach().double().abs() + eta) if adaptive and (not weights_only or p.ndim > 1) else 1.0
          for p in params]
    tg = [t * p.grad.double() for t, p in zip(ts, params)]
    norm = torch.sqrt(sum((x * x).sum() for x in tg)) if params else torch.zeros((), dtype=torch.float64)
    return norm, [rho * t * x / (norm + 1e-12) for t, x in zip(ts, tg)]


# ---- parameter sets ----
def make(shapes, device, dtype=torch.float32, grad_dtype=None, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        fmt = torch.channels_last if channels_last and len(s) == 4 else torch.contiguous_format
        p = torch.randn(s, generator=g).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
        if grad_dtype not in (None, dtype) and hasattr(p, "grad_dtype"):
            p.grad_dtype = None
        p.grad = torch.randn(s, generator=g).to(device, grad_dtype or dtype).contiguous(memory_format=fmt)
        ps.append(p)
    return ps


def unaligned(shapes, device):
    """Views at a 4-byte offset into one buffer, as grads in a DDP bucket can be: the masked path."""
    n = sum(math.prod(s) for s in shapes)
    g = torch.Generator().manual_seed(1)
    ws, gs = (torch.randn(n + 1, generator=g).to(device) for _ in range(2))
    ps, at = [], 1
    for s in shapes:
        k = math.prod(s)
        p = ws[at:at + k].view(s).requires_grad_()
        p.grad = gs[at:at + k].view(s)
        ps.append(p)
        at += k
    return ps


def mixed(shapes, device):
    """fp32 and bf16 params in one list: a Triton plan with two groups, two launches per norm."""
    half = len(shapes) // 2
    return make(shapes[:half], device) + make(shapes[half:], device, torch.bfloat16, seed=1)


def real_grads(device, smoke):
    """Factory of a contiguous model's params with the grads a channels_last batch gives them, strides and all
    (cuDNN: channels_last-strided grads for 1x1 convs, which differ from the weight's only in size-1 dims), and
    how many grads have strides other than their param's. One backward, copied per call (cuDNN's weight grads
    need not be bitwise repeatable)."""
    torch.manual_seed(0)
    if smoke:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 8, 1), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 6 * 6, 10))
    else:
        model = create_model("preactresnet18", num_classes=10)
    model = model.to(device)
    x = torch.randn(2 if smoke else 16, 3, 8 if smoke else 32, 8 if smoke else 32, device=device)
    model(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
    pairs = [(p.detach().clone(), p.grad.clone(memory_format=torch.preserve_format)) for p in model.parameters()]
    other = sum(g.stride() != w.stride() for w, g in pairs)

    def factory():
        ps = []
        for w, g in pairs:
            p = w.clone().requires_grad_()
            p.grad = torch.empty_strided(g.shape, g.stride(), dtype=g.dtype, device=device).copy_(g)
            ps.append(p)
        return ps

    return factory, other


def cases(device, smoke):
    """(name, factory of a fresh parameter set (same values every call), adaptive, eta, weights_only)."""
    big = SMOKE_SHAPES if smoke else preact_resnet18_shapes()
    grads_cl, n_other = real_grads(device, smoke)
    out = [("fp32 SAM", lambda: make(big, device), False, 0.0, False),
           ("fp32 ASAM (FT-SAM)", lambda: make(big, device), True, 0.0, False),
           ("fp32 ASAM, channels_last", lambda: make(big, device, channels_last=True), True, 0.0, False),
           ("bf16 ASAM, eta 0.01", lambda: make(big, device, torch.bfloat16), True, 0.01, False),
           ("fp16 SAM", lambda: make(big, device, torch.float16), False, 0.0, False),
           ("fp32 weights-only ASAM, eta 0.01", lambda: make(big, device), True, 0.01, True),
           ("fp32 + bf16 params in one plan (two launches per norm)", lambda: mixed(big, device), True, 0.0,
            False),
           (f"grads from a channels_last batch ({n_other} with other strides than their param)", grads_cl, True,
            0.0, False),
           ("zero-element and tiny tensors", lambda: make(TINY, device), True, 0.0, False),
           ("unaligned views (DDP-bucket-like)", lambda: unaligned(big, device), True, 0.0, False)]
    if hasattr(torch.Tensor, "grad_dtype"):
        out.append(("fp32 weights, bf16 grads", lambda: make(big, device, grad_dtype=torch.bfloat16), True, 0.0,
                    False))
    return out


# ---- 1. correctness ----
def check_backend(factory, backend, adaptive, eta, weights_only, rho=0.5):
    """Problems (list of str) and the measured errors of one backend on one parameter set."""
    ref_norm, ref_e = fp64_reference(factory(), rho, adaptive, eta, weights_only)
    problems, errs = [], {}
    for mode in ("copy", "subtract"):
        ps = factory()
        before = [p.detach().clone(memory_format=torch.preserve_format) for p in ps]
        plan = kernels.create_plan(ps, adaptive, eta, weights_only, restore=mode, backend=backend)
        norm = plan.grad_norm().clone()  # grad_norm returns the plan's own buffer, overwritten by the next call
        errs["norm rel err"] = abs(norm.double().item() - ref_norm.item()) / max(ref_norm.item(), 1e-30)
        if errs["norm rel err"] > NORM_RTOL:
            problems.append(f"norm off by {errs['norm rel err']:.1e}")
        if backend == "triton" and mode == "copy":
            problems += reused_norm_problems(plan, ps, norm)
        plan.perturb(norm, rho)
        worst = errs["perturbation err / tol"] = perturbation_error(ps, before, ref_e)
        if worst > 1:
            problems.append(f"perturbation off by {worst:.2f}x its tolerance")
        if backend == "triton" and mode == "copy":
            after = [p.detach().clone() for p in ps]
            plan.restore()
            plan.perturb(plan.grad_norm(), rho)
            if not all(torch.equal(p.detach(), a) for p, a in zip(ps, after)):
                problems.append("perturbation not bitwise repeatable")
        plan.restore()
        for p, b in zip(ps, before):
            rtol = RTOL[p.dtype]
            ok = torch.equal(p.detach(), b) if mode == "copy" else torch.allclose(p.detach(), b, rtol=rtol, atol=rtol)
            if not ok:
                problems.append(f"{mode}-restore does not give w back")
                break
    return problems, errs


def perturbation_error(ps, before, ref_e):
    """The worst |(w - w before) - e| over its tolerance (the result's dtype: 4 rtol |e| + rtol max |w|)."""
    worst = 0.0
    for p, b, e in zip(ps, before, ref_e):
        if p.numel():
            rtol = RTOL[p.dtype]
            err = ((p.detach().double() - b.double()) - e).abs()
            bound = 4 * rtol * e.abs() + rtol * b.double().abs().max()
            worst = max(worst, (err / bound).max().item())
    return worst


def check_path(backend, device, smoke, rhos=(0.5, 0.25)):
    """Problems and errors of one path step (PAM, optim/path.py: the kernels with d = theta0 - w in place of the
    grads) on `backend` against fp64: two param groups with their own rho and one ||d|| over both; restore exact."""
    from ftsam_plugin.optim.path import PathAnchor

    ps = make(SMOKE_SHAPES if smoke else preact_resnet18_shapes(), device)
    anchor = PathAnchor(ps, backend)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # w away from theta0
        for p in ps:
            p.add_(torch.randn(p.shape, generator=g).to(device), alpha=0.01)
    before = [p.detach().clone() for p in ps]
    d = [a.double() - b.double() for a, b in zip(anchor.anchor, before)]
    ref_norm = torch.sqrt(sum((x * x).sum() for x in d))
    sizes = (len(ps) // 2, len(ps) - len(ps) // 2)
    ref_e = [rho * x / (ref_norm + 1e-12) for x, rho in zip(d, [rhos[0]] * sizes[0] + [rhos[1]] * sizes[1])]
    norm = anchor.perturb(rhos, sizes).double().item()
    errs = {"norm rel err": abs(norm - ref_norm.item()) / ref_norm.item(),
            "perturbation err / tol": perturbation_error(ps, before, ref_e)}
    problems = [f"norm off by {errs['norm rel err']:.1e}"] * (errs["norm rel err"] > NORM_RTOL)
    if errs["perturbation err / tol"] > 1:
        problems.append(f"perturbation off by {errs['perturbation err / tol']:.2f}x its tolerance")
    if anchor.fused != (backend == "triton"):
        problems.append(f"ran on the {'Triton' if anchor.fused else 'foreach'} route")
    anchor.restore()
    if not all(torch.equal(p.detach(), b) for p, b in zip(ps, before)):
        problems.append("restore does not give w back")
    return problems, errs


def reused_norm_problems(plan, ps, norm):
    """The plan's norm, asked again: bitwise repeatable with its result NaN-filled before each call (a norm that is
    never written again, e.g. a ticket counter never reset, stays NaN), and following the grads when they double
    (2x the norm up to rounding; then halved back, exactly)."""
    problems = []
    repeats = []
    for _ in range(3):
        plan.grad_norm().fill_(float("nan"))
        repeats.append(torch.equal(plan.grad_norm(), norm))
    if not all(repeats):
        problems.append("norm not bitwise repeatable")
    for p in ps:
        p.grad.mul_(2)
    doubled = plan.grad_norm().double().item()
    for p in ps:
        p.grad.div_(2)
    if not abs(doubled - 2 * norm.double().item()) <= NORM_RTOL * 2 * norm.double().item():  # NaN fails too
        problems.append(f"norm of a reused plan does not follow its grads (x2 grads: {doubled:.6g}, want "
                        f"{2 * norm.double().item():.6g})")
    return problems


def check_graph_capture(device, smoke, rho=0.5):
    """A Triton plan's norm + perturb captured in a CUDA graph and replayed: equal to eager, bitwise."""
    if device.type != "cuda":
        return ["skipped: no CUDA"], False
    shapes = SMOKE_SHAPES if smoke else preact_resnet18_shapes()
    eager, graphed = make(shapes, device), make(shapes, device)
    plan_e = kernels.create_plan(eager, True, backend="triton")
    plan_g = kernels.create_plan(graphed, True, backend="triton")
    plan_e.perturb(plan_e.grad_norm(), rho)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile) off the capture, then undo
        plan_g.perturb(plan_g.grad_norm(), rho)
        plan_g.restore()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan_g.perturb(plan_g.grad_norm(), rho)
    plan_g._out.fill_(float("nan"))  # the replayed norm must write it again, or the perturbation turns NaN
    graph.replay()
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(eager, graphed))
    return [] if same else ["graph replay differs from eager"], same


def check_stress(device, smoke, rho=0.5):
    """Rows: thousands of norms of a two-launch (fp32 + bf16) Triton plan with its grads doubled and halved back
    between calls, each compared bit for bit with the first of its kind, and CUDA-graph replays of its norm +
    perturb (result NaN-filled before each) and of its restore, compared with the first (counted on the device,
    one sync)."""
    n = 4 if smoke else 2000
    ps = mixed(SMOKE_SHAPES if smoke else preact_resnet18_shapes(), device)
    plan = kernels.create_plan(ps, adaptive=True, backend="triton")

    def scale_grads(factor):
        for p in ps:
            p.grad.mul_(factor)

    first = plan.grad_norm().clone()
    scale_grads(2)
    doubled = plan.grad_norm().clone()
    scale_grads(0.5)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(n):  # grads as at first on even calls, doubled on odd ones: a stale norm cannot pass
        if i % 2:
            scale_grads(2)
        bad += plan.grad_norm() != (doubled if i % 2 else first)
        if i % 2:
            scale_grads(0.5)
    bad = int(bad)
    off = not abs(doubled.double().item() - 2 * first.double().item()) <= NORM_RTOL * 2 * first.double().item()
    result = "; ".join([f"{bad} differ"] * bool(bad) + ["the doubled grads' norm is not 2x"] * off) or "PASS"
    rows = [f"| Stress: {n} norms of the fp32 + bf16 plan (two launches each) with its grads doubled on every "
            f"second call, bitwise equal to the first of each | triton | | | {result} |"]
    bad = bad or off
    name = (f"CUDA graph stress: {n} replays of norm + perturb (norm NaN-filled before each) and of restore, "
            "bitwise equal to the first")
    if device.type != "cuda":
        return rows + [f"| {name} | triton | | | skipped: no CUDA |"], bool(bad)
    before = [p.detach().clone() for p in ps]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture (each launch's first call compiles), then undo
        plan.perturb(plan.grad_norm(), rho)
        plan.restore()
    torch.cuda.current_stream().wait_stream(side)
    perturb_graph, restore_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(perturb_graph):
        plan.perturb(plan.grad_norm(), rho)
    with torch.cuda.graph(restore_graph):
        plan.restore()
    perturb_graph.replay()
    norm, perturbed = plan.grad_norm().clone(), [p.detach().clone() for p in ps]
    restore_graph.replay()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # norms, perturbed w, restored w that differ
    for i in range(n):
        plan._out.fill_(float("nan"))  # the replayed norm must write it again (NaN != norm)
        perturb_graph.replay()
        counts[0] += plan._out != norm
        if i % 10 == 0:  # every 10th: comparing 11M elements per replay would dominate the loop
            counts[1] += sum((p.detach() != q).any() for p, q in zip(ps, perturbed))
        restore_graph.replay()
        if i % 10 == 0:
            counts[2] += sum((p.detach() != q).any() for p, q in zip(ps, before))
    norms, ws, restores = counts.tolist()
    problems = [f"{k} {what} differ" for k, what in ((norms, "norms"), (ws, "perturbed weights"),
                                                     (restores, "restored weights")) if k]
    return rows + [f"| {name} | triton | | | {'; '.join(problems) or 'PASS'} |"], bool(bad or problems)


def table_row(name, backend, check):
    """(row, failed) of one correctness check: check() -> (problems, errs); a crash is a failed check, reported."""
    try:
        problems, errs = check()
    except Exception as exc:
        problems, errs = [f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"], {}
    return (f"| {name} | {backend} | {errs.get('norm rel err', float('nan')):.1e} "
            f"| {errs.get('perturbation err / tol', float('nan')):.2f} | {'; '.join(problems) or 'PASS'} |",
            bool(problems))


def correctness(device, smoke):
    rows, failures = [], 0
    for name, factory, adaptive, eta, weights_only in cases(device, smoke):
        for backend in BACKENDS:
            row, failed = table_row(name, backend,
                                    lambda: check_backend(factory, backend, adaptive, eta, weights_only))
            rows.append(row)
            failures += failed
    for backend in BACKENDS:  # "loop" runs the path step's foreach ops (it has no per-tensor route)
        row, failed = table_row("path step (PAM): d = theta0 - w, two param groups (rho 0.5, 0.25), fp32", backend,
                                lambda: check_path(backend, device, smoke))
        rows.append(row)
        failures += failed
    problems, same = check_graph_capture(device, smoke)
    failures += bool(problems) and problems != ["skipped: no CUDA"]
    stress_rows, stress_failed = check_stress(device, smoke)
    failures += stress_failed
    lines = ["| case | backend | norm rel err vs fp64 | perturbation err / tolerance | result |",
             "|---|---|---|---|---|", *rows,
             f"| CUDA graph: capture + replay of a Triton plan's norm + perturb | triton | | | "
             f"{'; '.join(problems) or 'PASS (bitwise equal to eager)'} |", *stress_rows]
    return "\n".join(lines), failures


# ---- 2. kernel-only timings ----
def routes(ps, backend, rho=1e-6):
    """op -> callable for one backend, plan built beforehand (ASAM, copy-restore)."""
    plan = kernels.create_plan(ps, adaptive=True, restore="copy", backend=backend)
    plain = kernels.create_plan(ps, adaptive=False, restore="copy", backend=backend)
    norm = plan.grad_norm()
    plan.perturb(norm, rho)
    plan.restore()

    def whole():
        plan.perturb(plan.grad_norm(), rho)
        plan.restore()

    def perturb_restore():  # perturb alone would drift w; the pair is timed and restore subtracted below
        plan.perturb(norm, rho)
        plan.restore()

    return {"norm (SAM, reads g)": plain.grad_norm, "norm (ASAM, reads g and w)": plan.grad_norm,
            "perturb + restore": perturb_restore, "restore": plan.restore, "whole SAM extra work": whole}


def kernel_timings(device, smoke, reps):
    shapes = SMOKE_SHAPES if smoke else preact_resnet18_shapes()
    ps = make(shapes, device)
    n = sum(p.numel() for p in ps)
    timer = time_cuda if device.type == "cuda" else time_wall
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    copy_us = timer(lambda: dst.copy_(src), reps)
    sum_us = timer(lambda: src.sum(), reps)
    ref_gbs = {"copy_": 8 * n / copy_us / 1e3, "sum": 4 * n / sum_us / 1e3}
    moved = {"norm (SAM, reads g)": 4 * n, "norm (ASAM, reads g and w)": 8 * n, "perturb": 16 * n,
             "restore": 8 * n, "whole SAM extra work": 32 * n}
    # the norms only read: compared with a read-only reduction, not with copy_ (whose writes cost more)
    ref = {op: "sum" if op.startswith("norm") else "copy_" for op in moved}
    results = {}
    for backend in BACKENDS:
        ops = routes(ps, backend)
        r = {op: timer(fn, reps if backend != "loop" else max(1, reps // 4)) for op, fn in ops.items()}
        r["perturb"] = max(r.pop("perturb + restore") - r["restore"], 1e-3)
        results[backend] = r
    order = ["norm (SAM, reads g)", "norm (ASAM, reads g and w)", "perturb", "restore", "whole SAM extra work"]
    head = "| op (fp32, ASAM) | bytes | reference | " + " | ".join(f"{b} µs / GB/s / of reference" for b in BACKENDS) \
        + " | triton vs foreach |"
    lines = [f"`copy_` of {n:,} fp32 ({4 * n / 1e6:.1f} MB read + written): {copy_us:.1f} µs = "
             f"{ref_gbs['copy_']:.0f} GB/s; `sum` of the same ({4 * n / 1e6:.1f} MB read): {sum_us:.1f} µs = "
             f"{ref_gbs['sum']:.0f} GB/s", "", head, "|" + "---|" * (4 + len(BACKENDS))]
    for op in order:
        cells = []
        for b in BACKENDS:
            us = results[b][op]
            gbs = moved[op] / us / 1e3
            cells.append(f"{us:.1f} / {gbs:.0f} / {100 * gbs / ref_gbs[ref[op]]:.0f}%")
        lines.append(f"| {op} | {moved[op] / 1e6:.1f} MB | `{ref[op]}` | " + " | ".join(cells) +
                     f" | {results['foreach'][op] / results['triton'][op]:.2f}× |")
    t = results["triton"]
    frac = {op: moved[op] / t[op] / 1e3 / ref_gbs[ref[op]] for op in order}
    targets = [("fused ASAM norm >= 80% of the bandwidth of a read-only `sum`",
                frac["norm (ASAM, reads g and w)"] >= 0.8),
               ("perturb >= 80% of copy_ bandwidth", frac["perturb"] >= 0.8),
               ("whole SAM extra <= 1.3x its pure-traffic time", 1 / frac["whole SAM extra work"] <= 1.3),
               ("whole SAM extra >= 2x faster than foreach",
                results["foreach"]["whole SAM extra work"] / t["whole SAM extra work"] >= 2)]
    return "\n".join(lines), targets, ps


def host_costs(ps, smoke):
    """Host µs to queue one SAM extra (norm + perturb + restore) per backend, real launches."""
    lines = ["| route | host µs to queue norm + perturb + restore |", "|---|---|"]
    for backend in BACKENDS:
        plan = kernels.create_plan(ps, adaptive=True, restore="copy", backend=backend)

        def whole():
            plan.perturb(plan.grad_norm(), 1e-6)
            plan.restore()

        lines.append(f"| {backend} | {time_host(whole, 3 if smoke else 100):.0f} |")
    return "\n".join(lines)


# ---- 3. end to end ----
def end_to_end(device, smoke, steps):
    batch, n_steps = (2, 1) if smoke else (128, steps)

    def build():  # the smoke run's interpreter pays per program: a 5-tensor stand-in instead of 54 tensors
        torch.manual_seed(0)
        if smoke:
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(4, 10)).to(device)
        return create_model("preactresnet18", num_classes=10).to(device)

    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = dict(device_type=device.type, dtype=torch.bfloat16)
    rows = []

    def run(step, n):
        for _ in range(2):  # warm-up (cuDNN, Triton compilation, plan build)
            step()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return (time.perf_counter() - start) / n * 1e3

    model = build()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def sgd_step():
        sgd.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = loss_fn(model(x), y)
        loss.backward()
        sgd.step()

    sgd_ms = run(sgd_step, n_steps)
    rows.append(f"| SGD | {sgd_ms:.2f} | 1.00× | |")
    moves = {}
    for backend in ("triton", "foreach"):
        model = build()
        defense = ftsam_defense(device, model, backend)
        ms = run(lambda: defense.train_step(model, x, y), n_steps)
        sam = defense.optimizer
        moves[backend] = sam.grad_moves
        rows.append(f"| FT-SAM ({backend}) | {ms:.2f} | {ms / sgd_ms:.2f}× | {sam.plan_builds} builds, "
                    f"{sam.grad_moves} grad moves over {n_steps + 2} steps |")
    model_name = "a 5-tensor conv/BN/linear stand-in (smoke)" if smoke else "PreAct-ResNet18"
    head = [f"{model_name}, batch {batch} of 3×32×32, bf16 autocast; SGD momentum 0.9, wd 5e-4; FT-SAM = the "
            "defense's own step (`FTSAM.train_step`, cifar10.yaml: ASAM rho 2, SGD momentum 0.9, wd 5e-4, BN "
            f"frozen in pass two, grads zeroed in place) with each SAM backend; mean of {n_steps} steps after 2 "
            "warm-up.", "", "| step | ms / step | vs SGD | SAM plans |", "|---|---|---|---|"]
    kept = all(n == 0 for n in moves.values())
    tail = ["", f"- {'met' if kept else 'MISSED'}: FT-SAM's loop keeps its grads in place (steps whose grads had "
            f"moved: {', '.join(f'{b} {n}' for b, n in moves.items())}; each costs the plans a re-pointing)"]
    return "\n".join(head + rows + tail)


def ftsam_defense(device, model, backend):
    """FT-SAM as the defense trains (ftsam_plugin.defense.ftsam.FTSAM, cifar10.yaml, bf16 autocast) on `model`,
    its SAM on `backend`."""
    from ftsam_plugin.defense.ftsam import FTSAM

    parser = argparse.ArgumentParser()
    FTSAM.add_arguments(parser)
    defense = FTSAM(parser.parse_args(["--yaml_path", "cifar10", "--device", device.type, "--amp", "true",
                                       "--amp_dtype", "bf16"]))
    defense.set_devices()
    defense.setup_training(model)
    defense.optimizer.backend = backend  # read when the first step builds the plans
    defense.optimizer.schedule.set_epoch(1)
    return defense


# ---- report ----
def describe(device):
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return name, (f"Device: {name}; torch {torch.__version__}, Triton {triton.__version__}, commit {commit}"
                  + ("; SMOKE MODE (Triton interpreter on CPU, tiny sizes): timings are meaningless" if SMOKE
                     else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Markdown report (default benchmarks/results/gpu_check_<device>.md)")
    parser.add_argument("--reps", type=int, default=20, help="timed reps per kernel measurement (default 20)")
    parser.add_argument("--steps", type=int, default=20, help="timed end-to-end steps (default 20)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes (for CI)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine, or pass --smoke for the CPU smoke run",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.smoke else "cpu")
    reps = 1 if args.smoke else args.reps
    started = time.perf_counter()
    name, header = describe(device)
    checks, failures = correctness(device, args.smoke)
    timing_table, targets, ps = kernel_timings(device, args.smoke, reps)
    host_table = host_costs(ps, args.smoke)
    e2e_table = end_to_end(device, args.smoke, args.steps)
    target_lines = [f"- {'met' if ok else 'MISSED'}: {what}" for what, ok in targets]
    cmd = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        "# GPU check of the SAM kernels", "", f"Command: `{cmd.strip()}`  ", header + "  ",
        f"Wall time: {time.perf_counter() - started:.0f} s. Correctness failures: {failures}.", "",
        "## 1. Correctness against fp64", "", checks, "",
        "## 2. Kernel-only timings (plan prebuilt, back-to-back launches, L2 flushed, CUDA events)", "",
        timing_table, "", "Targets (triton route):", *target_lines, "",
        "Host time to queue one SAM extra (real launches, the GPU kept busy so nothing waits):", "", host_table, "",
        "## 3. End to end", "", e2e_table, ""])
    out = args.out or str(ROOT / "benchmarks" / "results" /
                          f"gpu_check_{name.lower().replace(' ', '_').replace('/', '_')}.md")
    from ftsam_plugin.io import atomic_write_text

    atomic_write_text(out, text)
    print(text)
    print(f"report: {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
