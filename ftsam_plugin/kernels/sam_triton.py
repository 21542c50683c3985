"""Multi-tensor Triton kernels for SAM: global ||T*g|| (with its finish folded in), fused perturbation, restore.

One launch covers every tensor of a (param dtype, grad dtype, aligned) group. The host side (`triton_plan.py`)
builds, once, an int64 table on the device with one column per tensor and the rows

    G (grad address) | W (param address) | S (`saved` address) | NUMEL | SCALED (1: T = |w| + eta, 0: T = 1)

and a work list mapping each program to (tensor, chunk start); chunks are CHUNK elements, so every program's
start is a multiple of CHUNK. In an ALIGNED group every address is 16-byte aligned (checked on the host), the
kernels tell the compiler so (`tl.multiple_of` on the pointers, CHUNK on the start) and full chunks load and store
unmasked, which compiles to 128-bit accesses (`ld.global.v4`); a tensor's last chunk, and groups that are not
aligned (e.g. views into a DDP bucket), take the masked per-element path. Everything per tensor (SCALED) and per
call (rho, eta, store e or w, copy or subtract) is a runtime argument: a load predicated off by a uniform flag
moves no bytes, so only the dtypes and ALIGNED are compile-time. Every pointer a plan passes is 16-byte aligned
(fresh allocations, and each group's table padded to an even word count: `triton_plan.table_words`), so Triton
specialises them all alike and `specialisations()` lists every variant the plans can launch (the compile test
builds exactly those; tests/test_kernels_launch.py checks the pointers of every launch).

The norm is deterministic and needs no second launch: each program writes its fp32 partial sum, then takes a
ticket from an atomic counter; the program that draws the last ticket sums all partials in index order, writes
sqrt into `out` and resets the counter (so a plan, or a CUDA graph of it, is reusable). Runs compiled on CUDA
and in Triton's interpreter on CPU (TRITON_INTERPRET=1, set before this module is imported).
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
NUM_WARPS = 4
CHUNK = 16384  # elements per program; PreAct-ResNet18 (11.2M) -> ~700 programs
# elements per loop step: 16 per thread at 4 warps, four 128-bit fp32 loads per operand. The interpreter pays
# per call of a @triton.jit helper, not per element, so there a chunk is one step (same code, 8x fewer calls)
BLOCK = CHUNK if INTERPRET else 2048
FINISH_BLOCK = 1024
# rows of the table (see above). The kernels write them as literals (0 G, 1 W, 2 S, 3 NUMEL, 4 SCALED): Triton
# re-checks every module global a kernel reads on each `kernel[grid](...)` launch, a few µs apiece
ROW_G, ROW_W, ROW_S, ROW_NUMEL, ROW_SCALED = range(5)
N_ROWS = 5
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# (param dtype, grad dtype) pairs the kernels take: same dtype, or fp32 master weights with a half-precision grad
DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
               (torch.float32, torch.float16), (torch.float32, torch.bfloat16))
_RUNTIME = dict(do_not_specialize=["n_tensors", "n_work", "pid_offset", "n_total", "eta", "rho", "store_e",
                                   "subtract"])


@triton.jit
def _program(work, n_work, table, n_tensors, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """(tensor, chunk start, elements in this chunk, masked) of this program; unmasked: full chunks if ALIGNED."""
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    start = tl.multiple_of(tl.load(work + n_work + pid), CHUNK)
    count = tl.minimum(tl.load(table + 3 * n_tensors + t) - start, CHUNK).to(tl.int32)  # row 3: NUMEL
    masked = (count < CHUNK) | (not ALIGNED)
    return t, start, count, masked


@triton.jit
def _chunk_ptr(table, row, n_tensors, t, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Address of this program's chunk in the tensor at table[row, t] (offsets below are int32, chunk-local)."""
    ptr = tl.load(table + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # the host checked it: lets the compiler emit 128-bit accesses
    return ptr + start


@triton.jit
def _load2(a_ptr, b_ptr, offs, count, b_live, MASKED: tl.constexpr):
    """a and b at offs (int32, chunk-local); b only where the uniform flag b_live is set: predicated off, a load
    moves no bytes. MASKED: per element, offs < count; else the whole block, unmasked (128-bit when aligned)."""
    if MASKED:
        live = offs < count
        a = tl.load(a_ptr + offs, mask=live, other=0.0)
        b = tl.load(b_ptr + offs, mask=live & b_live, other=0.0)
    else:
        a = tl.load(a_ptr + offs)
        b = tl.load(b_ptr + offs, mask=b_live, other=0.0)
    return a, b


@triton.jit
def _store(ptr, offs, value, count, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=offs < count)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _sumsq_chunk(g_ptr, w_ptr, count, scaled, eta, MASKED: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        g, w = _load2(g_ptr, w_ptr, offs, count, scaled, MASKED)  # w only where T = |w| + eta
        tg = g.to(tl.float32) * tl.where(scaled, tl.abs(w.to(tl.float32)) + eta, 1.0)
        acc += tg * tg
    return tl.sum(acc, axis=0)


@triton.jit(**_RUNTIME)
def _sumsq_kernel(table, work, partials, counter, out, n_tensors, n_work, pid_offset, n_total, eta,
                  G_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr, FINISH_BLOCK: tl.constexpr):
    # partials[pid_offset + pid] = sum over this chunk of (T * g)^2; the last program of all writes sqrt(sum)
    t, start, count, masked = _program(work, n_work, table, n_tensors, CHUNK, ALIGNED)
    g_ptr = _chunk_ptr(table, 0, n_tensors, t, start, G_DTYPE, ALIGNED)  # rows 0, 1, 2: G, W, S addresses
    w_ptr = _chunk_ptr(table, 1, n_tensors, t, start, W_DTYPE, ALIGNED)
    scaled = tl.load(table + 4 * n_tensors + t) != 0  # row 4: SCALED
    if masked:
        total = _sumsq_chunk(g_ptr, w_ptr, count, scaled, eta, True, CHUNK, BLOCK)
    else:
        total = _sumsq_chunk(g_ptr, w_ptr, count, scaled, eta, False, CHUNK, BLOCK)
    tl.store(partials + pid_offset + tl.program_id(0), total)
    tl.debug_barrier()  # every thread's store is issued before the (release) ticket below
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket == n_total - 1:  # the last program: every partial is written; sum them in a fixed order
        acc = tl.zeros([FINISH_BLOCK], dtype=tl.float32)
        for i in range(0, n_total, FINISH_BLOCK):
            offs = i + tl.arange(0, FINISH_BLOCK)
            acc += tl.load(partials + offs, mask=offs < n_total, other=0.0, cache_modifier=".cg")
        tl.store(out, tl.sqrt(tl.sum(acc, axis=0)))
        tl.atomic_xchg(counter, 0)


@triton.jit
def _perturb_chunk(g_ptr, w_ptr, s_ptr, count, scaled, eta, scale, store_e, W_DTYPE: tl.constexpr,
                   MASKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # e = ((T*T) * g) * scale, rounded to the param dtype; saved = e or old w; w += e
    for i in range(0, CHUNK, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        g, w_raw = _load2(g_ptr, w_ptr, offs, count, True, MASKED)
        w = w_raw.to(tl.float32)
        tt = tl.where(scaled, tl.abs(w) + eta, 1.0)
        e = (((tt * tt) * g.to(tl.float32)) * scale).to(W_DTYPE)
        _store(s_ptr, offs, tl.where(store_e, e, w_raw), count, MASKED)
        _store(w_ptr, offs, (w + e.to(tl.float32)).to(W_DTYPE), count, MASKED)


@triton.jit(**_RUNTIME)
def _perturb_kernel(table, work, norm, n_tensors, n_work, rho, eta, store_e,
                    G_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK: tl.constexpr):
    t, start, count, masked = _program(work, n_work, table, n_tensors, CHUNK, ALIGNED)
    g_ptr = _chunk_ptr(table, 0, n_tensors, t, start, G_DTYPE, ALIGNED)
    w_ptr = _chunk_ptr(table, 1, n_tensors, t, start, W_DTYPE, ALIGNED)
    s_ptr = _chunk_ptr(table, 2, n_tensors, t, start, W_DTYPE, ALIGNED)
    scaled = tl.load(table + 4 * n_tensors + t) != 0  # row 4: SCALED
    scale = rho / (tl.load(norm) + 1e-12)
    if masked:
        _perturb_chunk(g_ptr, w_ptr, s_ptr, count, scaled, eta, scale, store_e != 0, W_DTYPE, True, CHUNK, BLOCK)
    else:
        _perturb_chunk(g_ptr, w_ptr, s_ptr, count, scaled, eta, scale, store_e != 0, W_DTYPE, False, CHUNK, BLOCK)


@triton.jit
def _restore_chunk(w_ptr, s_ptr, count, subtract, W_DTYPE: tl.constexpr, MASKED: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # w = saved (copy: w is not even read) or w - e (subtract, in fp32)
    for i in range(0, CHUNK, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        s, w = _load2(s_ptr, w_ptr, offs, count, subtract, MASKED)
        _store(w_ptr, offs, tl.where(subtract, (w.to(tl.float32) - s.to(tl.float32)).to(W_DTYPE), s), count, MASKED)


@triton.jit(**_RUNTIME)
def _restore_kernel(table, work, n_tensors, n_work, subtract,
                    W_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, start, count, masked = _program(work, n_work, table, n_tensors, CHUNK, ALIGNED)
    w_ptr = _chunk_ptr(table, 1, n_tensors, t, start, W_DTYPE, ALIGNED)
    s_ptr = _chunk_ptr(table, 2, n_tensors, t, start, W_DTYPE, ALIGNED)
    if masked:
        _restore_chunk(w_ptr, s_ptr, count, subtract != 0, W_DTYPE, True, CHUNK, BLOCK)
    else:
        _restore_chunk(w_ptr, s_ptr, count, subtract != 0, W_DTYPE, False, CHUNK, BLOCK)


# ---- what the host launches: one place for the constexprs, shared by the plans and the compile test ----
KERNELS = {"sumsq": _sumsq_kernel, "perturb": _perturb_kernel, "restore": _restore_kernel}
# runtime arguments and their Triton types, in the kernels' order ("*" = pointer, all 16-byte aligned)
SIGNATURES = {
    "sumsq": {"table": "*i64", "work": "*i64", "partials": "*fp32", "counter": "*i32", "out": "*fp32",
              "n_tensors": "i32", "n_work": "i32", "pid_offset": "i32", "n_total": "i32", "eta": "fp32"},
    "perturb": {"table": "*i64", "work": "*i64", "norm": "*fp32", "n_tensors": "i32", "n_work": "i32",
                "rho": "fp32", "eta": "fp32", "store_e": "i32"},
    "restore": {"table": "*i64", "work": "*i64", "n_tensors": "i32", "n_work": "i32", "subtract": "i32"},
}


def constexprs(kind, w_dtype, g_dtype, aligned):
    """The compile-time arguments of kernel `kind` for a group of (param dtype, grad dtype, aligned)."""
    shared = dict(W_DTYPE=_TL[w_dtype], ALIGNED=bool(aligned), CHUNK=CHUNK, BLOCK=BLOCK)
    if kind == "restore":
        return shared
    shared["G_DTYPE"] = _TL[g_dtype]
    if kind == "sumsq":
        shared["FINISH_BLOCK"] = FINISH_BLOCK
    return shared


def specialisations():
    """(kind, param dtype, grad dtype, aligned) for every kernel variant a plan can launch."""
    out = []
    for aligned in (True, False):
        out += [(kind, w, g, aligned) for kind in ("sumsq", "perturb") for w, g in DTYPE_PAIRS]
        out += [("restore", w, w, aligned) for w in dict.fromkeys(w for w, _ in DTYPE_PAIRS)]
    return out


def launch_options(kind, w_dtype, g_dtype, aligned):
    """`constexprs` plus the launch options: the keyword arguments of a launch."""
    return dict(constexprs(kind, w_dtype, g_dtype, aligned), num_warps=NUM_WARPS)


FAST_LAUNCH = True  # False: every launch through Triton's kernel[grid](...) (for comparisons)
LAUNCH_ON_CPU = INTERPRET  # whether plans may take CPU tensors: the interpreter, or ftsam_plugin.kernels.null_driver


def _hooks_quiet(runtime):
    """No launch hook set (a profiler such as proton sets one; it is fed by the normal path only)."""
    return (not getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)
            and not getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook))


def _address(value):
    """A tensor argument as the launcher takes it fastest: its address (launchers take an int for a pointer and
    skip the data_ptr() call and the driver's pointer query); other arguments as they are."""
    return value.data_ptr() if isinstance(value, torch.Tensor) else value


class Launch:
    """Kernel `kind` on `grid` with `args` (SIGNATURES order) and `options` (`launch_options`), prepared once.

    Calling it with `values` replaces the arguments at positions `vary` (tensors among them: fp32 and 16-byte
    aligned, as at the first call) and launches on the current stream. The first call goes through
    Triton's `kernel[grid](...)`, which compiles the kernel and returns it; later calls hand its launcher
    (`CompiledKernel.run`, the same call in Triton 3.6 and 3.8) the prepared arguments, tensors as their
    addresses, skipping what that path re-does every time (binding and specialising the arguments, the cache
    key, the globals check): one C call instead of ~30 µs of Python. Under Triton 3.8's NVIDIA launcher
    (`CudaLauncher`, no scratch memory) the call goes one level lower, to its C `launch`, skipping the ~1 µs of
    Python that wraps it (tests/test_kernels_launch.py checks that cuLaunchKernelEx gets what Triton's path gives
    it). The normal path is kept when this Triton has no such launcher (the interpreter included), while a launch
    hook is set, or with FAST_LAUNCH off.
    """

    def __init__(self, kind, grid, args, options, vary=()):
        self.kernel, self.grid, self.options, self.vary = KERNELS[kind], grid, options, tuple(vary)
        self.args = list(args)
        self._addresses = [_address(a) for a in self.args]  # the fast path's arguments
        self._fast = self._hooks = None  # set by the first launch: the fast launch, or False where there is none

    def __call__(self, *values):
        fast = self._fast
        if fast and _hooks_quiet(self._hooks):
            args = self._addresses
            if values:
                args = args.copy()
                for i, v in zip(self.vary, values):
                    args[i] = _address(v)
            fast(args)
            return
        args = self.args
        if values:
            args = args.copy()
            for i, v in zip(self.vary, values):
                args[i] = v
        compiled = self.kernel[self.grid](*args, **self.options)
        if fast is None:
            self._fast, self._hooks = self._prepare(compiled, len(args)) if FAST_LAUNCH else (False, None)

    def _prepare(self, compiled, n_args):
        """(fast launch, Triton's hooks) from the first launch's compiled kernel; (False, None) where this Triton
        has no such launcher."""
        try:
            from triton import knobs
            from triton.runtime import driver

            run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
            device, get_stream = driver.active.get_current_device(), driver.active.get_current_stream
            hooks = knobs.runtime
        except (AttributeError, ImportError):  # another Triton, or the interpreter (no compiled kernel)
            return False, None
        gx, gy, gz = tuple(self.grid) + (1,) * (3 - len(self.grid))
        # the launcher takes every parameter in signature order, constexprs included (it skips those)
        consts = tuple(self.options[name] for name in self.kernel.arg_names[n_args:])
        c_launch = _c_launch(run)
        if c_launch is not None:  # Triton 3.8's CudaLauncher.__call__ without its Python: no scratch to allocate
            coop, pdl, annotations, signature = (run.launch_cooperative_grid, run.launch_pdl, run.arg_annotations,
                                                 run.kernel_signature)

            def fast(args):
                c_launch(gx, gy, gz, get_stream(device), function, coop, pdl, metadata, None, None, None, None, None,
                         annotations, signature, (*args, *consts))

            return fast, hooks

        def fast(args):  # what kernel[grid](...) ends in, with no launch metadata and no (empty) hooks
            run(gx, gy, gz, get_stream(device), function, metadata, None, None, None, *args, *consts)

        return fast, hooks


def _c_launch(run):
    """The C launch under Triton 3.8's CudaLauncher when calling it directly is what its __call__ does (no global
    or profile scratch memory, no sanitizer); else None (another Triton or backend: the launcher is called)."""
    if type(run).__name__ != "CudaLauncher" or not triton.__version__.startswith("3.8."):
        return None
    needed = ("launch", "launch_cooperative_grid", "launch_pdl", "arg_annotations", "kernel_signature")
    if not all(hasattr(run, name) for name in needed):
        return None
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1) or \
            getattr(run, "gsan_enabled", True):
        return None
    return run.launch


__all__ = ["BLOCK", "CHUNK", "DTYPE_PAIRS", "FAST_LAUNCH", "INTERPRET", "KERNELS", "LAUNCH_ON_CPU", "Launch",
           "N_ROWS", "NUM_WARPS", "SIGNATURES", "constexprs", "launch_options", "specialisations"]
