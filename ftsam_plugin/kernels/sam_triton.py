"""Multi-tensor Triton kernels for SAM: global ||T*g||, fused perturbation, fused restore.

All tensors of one dtype group go through ONE launch: a per-call int64 table on the device holds the addresses
(cast with `.to(tl.pointer_type(dtype))`), numels and "scaled" flags; a cached work list maps each program to a
(tensor, chunk start). The norm is deterministic: per-program fp32 partials, then `_finish_norm_kernel` sums them
and takes the sqrt on the device (no host sync). Runs compiled on CUDA and in Triton's interpreter on CPU
(TRITON_INTERPRET=1, set before this module is imported).
"""

import os

import torch
import triton
import triton.language as tl

from .reference import EPS, scaled_flags, with_grad

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 1024
CHUNK = 16 * BLOCK  # elements per program; PreAct-ResNet18 -> ~700 programs
FINISH_BLOCK = 1024
ALIGN = 128  # element alignment of tensors inside a flat `saved` buffer
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}
_WORK_CACHE = {}


@triton.jit
def _sumsq_kernel(table, work, partials, n_tensors, n_work, eta,
                  G_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # partials[pid] = sum over this chunk of (T * g)^2, T = |w| + eta if scaled else 1
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    start = tl.load(work + n_work + pid)
    g_ptr = tl.load(table + t).to(tl.pointer_type(G_DTYPE))
    w_ptr = tl.load(table + n_tensors + t).to(tl.pointer_type(W_DTYPE))
    numel = tl.load(table + 3 * n_tensors + t)
    scaled = tl.load(table + 4 * n_tensors + t) != 0
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ADAPTIVE:
            w = tl.load(w_ptr + offs, mask=mask & scaled, other=0.0).to(tl.float32)
            g = g * tl.where(scaled, tl.abs(w) + eta, 1.0)
        acc += g * g
    tl.store(partials + pid, tl.sum(acc, axis=0))


@triton.jit
def _finish_norm_kernel(partials, n, out, BLOCK: tl.constexpr):
    # out = sqrt(sum(partials)), fixed order -> deterministic
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sqrt(tl.sum(acc, axis=0)))


@triton.jit
def _perturb_kernel(table, work, norm_ptr, n_tensors, n_work, rho, eta,
                    G_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr, STORE_E: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # e = ((T*T) * g) * rho / (norm + eps) ; saved = e or old w ; w += e
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    start = tl.load(work + n_work + pid)
    g_ptr = tl.load(table + t).to(tl.pointer_type(G_DTYPE))
    w_ptr = tl.load(table + n_tensors + t).to(tl.pointer_type(W_DTYPE))
    s_ptr = tl.load(table + 2 * n_tensors + t).to(tl.pointer_type(W_DTYPE))
    numel = tl.load(table + 3 * n_tensors + t)
    scaled = tl.load(table + 4 * n_tensors + t) != 0
    scale = rho / (tl.load(norm_ptr) + 1e-12)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w_raw = tl.load(w_ptr + offs, mask=mask, other=0.0)
        w = w_raw.to(tl.float32)
        if ADAPTIVE:
            tt = tl.where(scaled, tl.abs(w) + eta, 1.0)
            g = (tt * tt) * g
        e = (g * scale).to(W_DTYPE)
        if STORE_E:
            tl.store(s_ptr + offs, e, mask=mask)
        else:
            tl.store(s_ptr + offs, w_raw, mask=mask)
        tl.store(w_ptr + offs, (w + e.to(tl.float32)).to(W_DTYPE), mask=mask)


@triton.jit
def _restore_kernel(table, work, n_tensors, n_work,
                    W_DTYPE: tl.constexpr, SUBTRACT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # w = saved (copy) or w - e (subtract)
    pid = tl.program_id(0)
    t = tl.load(work + pid)
    start = tl.load(work + n_work + pid)
    w_ptr = tl.load(table + t).to(tl.pointer_type(W_DTYPE))
    s_ptr = tl.load(table + n_tensors + t).to(tl.pointer_type(W_DTYPE))
    numel = tl.load(table + 2 * n_tensors + t)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        s = tl.load(s_ptr + offs, mask=mask, other=0.0)
        if SUBTRACT:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            s = (w.to(tl.float32) - s.to(tl.float32)).to(W_DTYPE)
        tl.store(w_ptr + offs, s, mask=mask)


# ---- host side ----
def _check_device(device):
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); use backend='auto'")


def _dense(t):
    return t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _check_layout(p, need_same_strides=True):
    if p.dtype not in _TL or p.grad.dtype not in _TL:
        raise ValueError(f"backend='triton' supports float16/bfloat16/float32/float64, got {p.dtype}")
    if not (_dense(p) and _dense(p.grad)) or (need_same_strides and p.grad.stride() != p.stride()):
        raise ValueError("backend='triton' needs dense params and grads with equal strides; use backend='foreach'")


def _work(numels, device):
    """Cached int64 [2, n_work] tensor: row 0 tensor index, row 1 chunk start."""
    key = (numels, str(device))
    work = _WORK_CACHE.get(key)
    if work is None:
        pairs = [(i, s) for i, n in enumerate(numels) for s in range(0, n, CHUNK)]
        work = torch.tensor([[i for i, _ in pairs], [s for _, s in pairs]], dtype=torch.int64).to(device)
        if len(_WORK_CACHE) > 64:
            _WORK_CACHE.clear()
        _WORK_CACHE[key] = work
    return work


def _table(rows, device):
    """int64 [len(rows), n] table on `device`; pinned + non_blocking on CUDA so the host never waits."""
    host = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _groups(ps, key):
    out = {}
    for i, p in enumerate(ps):
        out.setdefault(key(p), []).append(i)
    return out


def grad_norm_triton(params, adaptive=False, eta=0.0, weights_only=False):
    ps = with_grad(params)
    device = ps[0].device if ps else (params[0].device if params else torch.device("cpu"))
    _check_device(device)
    out = torch.zeros((), dtype=torch.float32, device=device)
    if not ps:
        return out
    flags = scaled_flags(ps, adaptive, weights_only)
    launches, total = [], 0
    for (wdt, gdt), idx in _groups(ps, lambda p: (p.dtype, p.grad.dtype)).items():
        for i in idx:
            _check_layout(ps[i], need_same_strides=flags[i])
        numels = tuple(ps[i].numel() for i in idx)
        work = _work(numels, device)
        table = _table([[ps[i].grad.data_ptr() for i in idx], [ps[i].data_ptr() for i in idx], [0] * len(idx),
                        list(numels), [int(flags[i]) for i in idx]], device)
        launches.append((wdt, gdt, idx, work, table, total))
        total += work.shape[1]
    partials = torch.empty(total, dtype=torch.float32, device=device)
    for wdt, gdt, idx, work, table, offset in launches:
        n_work = work.shape[1]
        _sumsq_kernel[(n_work,)](table, work, partials[offset:], len(idx), n_work, float(eta),
                                 G_DTYPE=_TL[gdt], W_DTYPE=_TL[wdt], ADAPTIVE=any(flags[i] for i in idx),
                                 CHUNK=CHUNK, BLOCK=BLOCK)
    _finish_norm_kernel[(1,)](partials, total, out, BLOCK=FINISH_BLOCK)
    return out


def _flat_like(tensors):
    """One allocation holding a tensor shaped/strided like each input (ALIGN-element aligned)."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() // ALIGN) * ALIGN
    flat = torch.empty(total, dtype=tensors[0].dtype, device=tensors[0].device)
    return [flat.as_strided(t.shape, t.stride(), o) for t, o in zip(tensors, offsets)]


@torch.no_grad()
def perturb_triton(params, norm, rho, adaptive=False, eta=0.0, store="w", weights_only=False):
    ps = with_grad(params)
    if not ps:
        return []
    device = ps[0].device
    _check_device(device)
    norm = norm.to(device=device, dtype=torch.float32)
    flags = scaled_flags(ps, adaptive, weights_only)
    saved = [None] * len(ps)
    for (wdt, gdt), idx in _groups(ps, lambda p: (p.dtype, p.grad.dtype)).items():
        for i in idx:
            _check_layout(ps[i])
        views = _flat_like([ps[i] for i in idx])
        numels = tuple(ps[i].numel() for i in idx)
        work = _work(numels, device)
        table = _table([[ps[i].grad.data_ptr() for i in idx], [ps[i].data_ptr() for i in idx],
                        [v.data_ptr() for v in views], list(numels), [int(flags[i]) for i in idx]], device)
        n_work = work.shape[1]
        _perturb_kernel[(n_work,)](table, work, norm, len(idx), n_work, float(rho), float(eta),
                                   G_DTYPE=_TL[gdt], W_DTYPE=_TL[wdt], ADAPTIVE=any(flags[i] for i in idx),
                                   STORE_E=store == "e", CHUNK=CHUNK, BLOCK=BLOCK)
        for i, v in zip(idx, views):
            saved[i] = v
    return saved


@torch.no_grad()
def restore_triton(params, saved, mode="copy"):
    if not saved:
        return
    device = params[0].device
    _check_device(device)
    for wdt, idx in _groups(params, lambda p: p.dtype).items():
        for i in idx:
            if saved[i].dtype != wdt or saved[i].stride() != params[i].stride() or not _dense(params[i]):
                raise ValueError("restore: saved tensors must match their params (use the list perturb returned)")
        numels = tuple(params[i].numel() for i in idx)
        work = _work(numels, device)
        table = _table([[params[i].data_ptr() for i in idx], [saved[i].data_ptr() for i in idx], list(numels)],
                       device)
        n_work = work.shape[1]
        _restore_kernel[(n_work,)](table, work, len(idx), n_work, W_DTYPE=_TL[wdt], SUBTRACT=mode == "subtract",
                                   CHUNK=CHUNK, BLOCK=BLOCK)


__all__ = ["grad_norm_triton", "perturb_triton", "restore_triton", "EPS"]
