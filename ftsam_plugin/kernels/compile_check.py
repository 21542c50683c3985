"""Compile every SAM kernel variant for NVIDIA GPUs without a GPU, and check the generated code.

    python -m ftsam_plugin.kernels.compile_check [--arch 80,90,100] [--jobs N] [--json]

For each variant in `sam_triton.specialisations()` (the ones the plans launch) and each target, this runs
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` (Triton ships ptxas, so no GPU or CUDA
install is needed) with the arguments a launch would have (16-byte aligned pointers, unspecialised integers,
NUM_WARPS) and reads off:
- spills: ptxas' "bytes spill stores/loads" for the kernel (must be 0);
- vectorisation: the PTX loop with the most global loads in it (a loop = a label and a later branch back to it):
  how many of its loads/stores are 128-bit (`ld.global.v4` / `st.global.v4`) and how many are narrower. An
  aligned variant must have a loop whose accesses are all 128-bit; an unaligned one (masked per element) has none.
Targets the installed Triton cannot build are reported as skipped with the reason. Exit status 1 when a variant
fails to compile or a check fails. Needs the real compiler: run without TRITON_INTERPRET.
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import triton
import triton.language as tl

DEFAULT_ARCHS = (80, 90, 100)
_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@triton.jit
def _probe_kernel(x):
    tl.store(x, tl.load(x) + 1.0)


def _name(dtype):
    return str(dtype).replace("torch.", "")


def loops(ptx):
    """Bodies (lists of lines) of the PTX loops: from a label to the last branch back to it."""
    lines = ptx.splitlines()
    labels, bodies = {}, {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
        m = _BRANCH.search(line)
        if m and m.group(1) in labels:  # a branch back to an earlier label closes a loop
            bodies[m.group(1)] = lines[labels[m.group(1)]:i + 1]
    return list(bodies.values())


def access_counts(lines):
    """128-bit and narrower global loads and stores among `lines`."""
    text = "\n".join(lines)
    loads, stores = re.findall(r"\bld\.global\S*", text), re.findall(r"\bst\.global\S*", text)
    return dict(loads_v4=sum(".v4" in x for x in loads), loads_narrow=sum(".v4" not in x for x in loads),
                stores_v4=sum(".v4" in x for x in stores), stores_narrow=sum(".v4" not in x for x in stores))


def main_loop(ptx):
    """Access counts of the loop with the most 128-bit loads (else the most loads); zeros without a loop."""
    counts = [access_counts(body) for body in loops(ptx)]
    if not counts:
        return access_counts([])
    return max(counts, key=lambda c: (c["loads_v4"], c["loads_v4"] + c["loads_narrow"]))


def source(kind, w_dtype, g_dtype, aligned):
    """The ASTSource of one variant as a launch would compile it: the plan's constexprs, integers unspecialised,
    every pointer 16-byte aligned (what the plans pass: tests/test_kernels_launch.py compares the two)."""
    from triton.compiler import ASTSource

    from . import sam_triton as st

    fn = st.KERNELS[kind]
    consts = st.constexprs(kind, w_dtype, g_dtype, aligned)
    types = dict(st.SIGNATURES[kind], **{name: "constexpr" for name in consts})
    signature = {name: types[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if types[name].startswith("*")}
    return ASTSource(fn, signature, constexprs=consts, attrs=attrs)


def compile_variant(kind, w_dtype, g_dtype, aligned, arch):
    """Compile one variant for sm_<arch>; a dict of what was found (or `error`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import sam_triton as st

    row = dict(kind=kind, w_dtype=_name(w_dtype), g_dtype=_name(g_dtype), aligned=bool(aligned), arch=arch)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: ptxas -v output is printed
            kernel = triton.compile(source(kind, w_dtype, g_dtype, aligned), target=GPUTarget("cuda", arch, 32),
                                    options=dict(num_warps=st.NUM_WARPS))
    except Exception as exc:  # a compiler error is a result to report, not a crash of the whole check
        return dict(row, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    row["seconds"] = round(time.perf_counter() - start, 3)
    spills, regs = _SPILLS.search(log.getvalue()), _REGS.search(log.getvalue())
    row["spill_bytes"] = int(spills.group(1)) + int(spills.group(2)) if spills else None
    row["registers"] = int(regs.group(1)) if regs else None
    row.update(main_loop(kernel.asm["ptx"]))
    return row


def problems(row):
    """What is wrong with one compiled variant (empty list: fine)."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["spill_bytes"] is None:
        out.append("no ptxas report found")
    elif row["spill_bytes"]:
        out.append(f"{row['spill_bytes']} bytes of register spills")
    if row["aligned"]:
        if not row["loads_v4"] or row["loads_narrow"]:
            out.append(f"main loop not all 128-bit loads ({row['loads_v4']} v4, {row['loads_narrow']} narrower)")
        if row["stores_narrow"]:
            out.append(f"main loop has {row['stores_narrow']} narrower stores")
    elif row["loads_v4"]:
        out.append("unaligned variant uses 128-bit loads")
    return out


def probe_target(arch):
    """None when the installed Triton builds a trivial kernel for sm_<arch>, else why not (one line)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            triton.compile(ASTSource(_probe_kernel, {"x": "*fp32"}), target=GPUTarget("cuda", arch, 32))
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def run(archs, jobs=None):
    """(rows, skipped): one row per (variant, arch) built; skipped = {arch: reason} for targets the installed
    Triton cannot build at all (a trivial probe kernel fails too)."""
    from . import sam_triton as st

    if st.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted, there is nothing to compile")
    tasks = [(*spec, arch) for arch in archs for spec in st.specialisations()]
    jobs = max(1, jobs or min(len(tasks), os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        probes = dict(zip(archs, pool.map(probe_target, archs)))
        rows = list(pool.map(compile_variant, *zip(*tasks)))
    skipped = {arch: why for arch, why in probes.items() if why}
    return [r for r in rows if r["arch"] not in skipped], skipped


def table(rows, skipped, seconds):
    lines = ["| kernel | param / grad | aligned | sm | main loop loads v4 / narrower | stores v4 / narrower "
             "| registers | spill bytes | compile s | check |", "|" + "---|" * 10]
    for r in rows:
        bad = problems(r)
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['w_dtype']} / {r['g_dtype']} | {r['aligned']} | {r['arch']} "
                         f"| | | | | | error: {r['error']} |")
            continue
        lines.append(f"| {r['kind']} | {r['w_dtype']} / {r['g_dtype']} | {r['aligned']} | {r['arch']} "
                     f"| {r['loads_v4']} / {r['loads_narrow']} | {r['stores_v4']} / {r['stores_narrow']} "
                     f"| {r['registers']} | {r['spill_bytes']} | {r['seconds']} | {'; '.join(bad) or 'ok'} |")
    lines += [f"- sm_{a}: skipped ({why})" for a, why in skipped.items()]
    lines.append(f"{len(rows)} variants compiled in {seconds:.1f} s wall clock")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                        help="comma-separated compute capabilities (default: 80,90,100)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        print(f"error: --arch takes comma-separated integers such as 80,90, got {args.arch!r}", file=sys.stderr)
        return 2
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: every variant really goes through ptxas
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            rows, skipped = run(archs, args.jobs)
        except (ImportError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    seconds = time.perf_counter() - start
    if args.json:
        import triton

        print(json.dumps(dict(triton=triton.__version__, seconds=round(seconds, 2), rows=rows,
                              skipped={str(a): why for a, why in skipped.items()})))
    else:
        print(table(rows, skipped, seconds))
    return 1 if any(problems(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
