"""SAM kernels: one interface, three backends, and plans that keep what a parameter list needs between steps.

    plan = create_plan(params, adaptive, eta, weights_only, restore="copy"|"subtract", backend, directions=None)
    norm = plan.grad_norm()          # 0-d fp32 ||T*g||_2 on the params' device
    saved = plan.perturb(norm, rho)  # w += e; keeps old w (restore="copy") or e ("subtract")
    plan.restore()                   # w = old w, or w -= e

T = |w| + eta if adaptive (and ndim > 1 when weights_only) else 1; e = rho * T^2 * g / (norm + 1e-12).
`params` must all have a grad (the functional forms below drop the ones without), unless `directions` is given: a
list of tensors shaped like the params, read as g in place of their grads (the path-aware step's d = theta0 - w,
ftsam_plugin.optim.path; with adaptive=False that step is exactly norm + perturb). Nothing syncs with the host.
A plan holds on to its tensors: the Triton plan keeps device addresses, so build a new one when params, grads or
`saved` move (ftsam_plugin.optim.SAM does). The functional forms build a plan per call:

    norm = grad_norm(params, adaptive, eta, backend, weights_only)
    saved = perturb(params, norm, rho, adaptive, eta, store="w"|"e", backend, weights_only)   # saved follows
    restore(with_grad(params), saved, mode="copy"|"subtract", backend)                        # with_grad order

Backends: "triton" (multi-tensor Triton kernels, CUDA or TRITON_INTERPRET=1; fails loudly if unavailable),
"foreach" (torch._foreach_*, the CPU path), "loop" (per tensor, like davda54/sam), "auto" (triton for CUDA
params when Triton imports, falling back to foreach with a one-time warning where the kernels cannot take a
dtype pair or layout; else foreach). Every backend takes float32/float16/bfloat16 params on one device, all
computed with fp32 arithmetic; float64 and mixed devices are refused (ValueError).
"""

import functools
import warnings

import torch

from .reference import FOREACH
from .reference import LOOP
from .reference import TorchPlan
from .reference import with_grad
from .reference import zero_norm

BACKENDS = ("auto", "triton", "foreach", "loop")
STORES = ("w", "e")
RESTORE_MODES = ("copy", "subtract")
_RESTORE_FOR_STORE = {"w": "copy", "e": "subtract"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_SET = frozenset(DTYPES)
AUTO_TRITON_DEVICES = ("cuda",)  # device types on which "auto" tries Triton
_warned_fallback = []


@functools.lru_cache(maxsize=None)
def _triton_plan_class():
    from .triton_plan import TritonPlan  # lazy: importing triton is slow and optional

    return TritonPlan


@functools.lru_cache(maxsize=None)
def triton_available():
    try:
        _triton_plan_class()
        return True
    except Exception:  # ImportError, or a Triton driver that cannot initialise
        return False


# backend name -> plan factory (params, adaptive, eta, weights_only, restore, saved, directions)
_PLANS = {
    "triton": lambda *a: _triton_plan_class()(*a),  # explicit "triton": an ImportError propagates
    "foreach": functools.partial(TorchPlan, FOREACH),
    "loop": functools.partial(TorchPlan, LOOP),
}


def check_params(params, saved=None, directions=None):
    """ValueError unless every param (and grad, or direction if given, and saved tensor) is float32/float16/bfloat16
    on one device."""
    grads = [p.grad for p in params] if directions is None else directions
    tensors = [t for t in (*params, *grads) if t is not None] + list(saved or [])
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"SAM kernels: parameters and grads are on several devices "
                         f"({', '.join(sorted(map(str, devices)))}); put the whole model on one device")
    bad = {t.dtype for t in tensors} - _DTYPE_SET
    if bad:
        raise ValueError(f"SAM kernels take float32/float16/bfloat16 parameters and grads, got "
                         f"{', '.join(sorted(map(str, bad)))}; train in float32 (model.float()), with bf16/fp16 "
                         "autocast if wanted")


def resolve_backend(backend, params):
    """The concrete backend ("triton" | "foreach" | "loop") for `params`; ValueError for unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    on_device = bool(params) and params[0].device.type in AUTO_TRITON_DEVICES
    return "triton" if on_device and triton_available() else "foreach"


def create_plan(params, adaptive=False, eta=0.0, weights_only=False, restore="copy", backend="auto", saved=None,
                directions=None):
    """A plan (grad_norm / perturb / restore) for `params`, each with a grad unless only `saved` is restored or
    `directions` (one tensor shaped like each param) stands in for the grads."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if restore not in RESTORE_MODES:
        raise ValueError(f"restore must be 'copy' or 'subtract', got {restore!r}")
    params = list(params)
    if not params:
        raise ValueError("create_plan needs at least one parameter (the one-call forms accept empty lists)")
    directions = None if directions is None else list(directions)
    check_params(params, saved, directions)
    name = resolve_backend(backend, params)
    args = (params, adaptive, eta, weights_only, restore, saved, directions)
    if backend != "auto" or name != "triton":
        return _PLANS[name](*args)
    from .triton_plan import LayoutError

    try:
        return _PLANS["triton"](*args)
    except LayoutError as exc:
        if not _warned_fallback:
            _warned_fallback.append(str(exc))
            warnings.warn(f"backend='auto' uses foreach for these parameters: {exc}", RuntimeWarning,
                          stacklevel=2)
        return _PLANS["foreach"](*args)


def grad_norm(params, adaptive=False, eta=0.0, backend="auto", weights_only=False):
    """||T * g||_2 over all `params` with a grad, fp32 accumulation; a 0-d fp32 tensor on their device."""
    params = list(params)
    ps = with_grad(params)
    if not ps:
        check_params(params)
        resolve_backend(backend, params)
        return zero_norm(params)
    return create_plan(ps, adaptive, eta, weights_only, backend=backend).grad_norm()


def perturb(params, norm, rho, adaptive=False, eta=0.0, store="w", backend="auto", weights_only=False):
    """w += rho * T^2 * g / (norm + 1e-12) in place; returns old w copies (store="w") or e (store="e")."""
    if store not in STORES:
        raise ValueError(f"store must be 'w' or 'e', got {store!r}")
    ps = with_grad(params)
    if not ps:
        return []
    return create_plan(ps, adaptive, eta, weights_only, _RESTORE_FOR_STORE[store], backend).perturb(norm, rho)


def restore(params, saved, mode="copy", backend="auto"):
    """Undo `perturb`: w = saved (mode="copy", exact) or w -= saved (mode="subtract"); params aligned with saved."""
    if mode not in RESTORE_MODES:
        raise ValueError(f"mode must be 'copy' or 'subtract', got {mode!r}")
    params, saved = list(params), list(saved)
    if len(params) != len(saved):
        raise ValueError(f"restore got {len(params)} params for {len(saved)} saved tensors")
    for i, (p, s) in enumerate(zip(params, saved)):
        if s.shape != p.shape or s.dtype != p.dtype:
            raise ValueError(f"restore: saved[{i}] is {s.dtype} {tuple(s.shape)} but its parameter is {p.dtype} "
                             f"{tuple(p.shape)}; pass the list perturb returned, in with_grad(params) order")
    if saved:
        create_plan(params, restore=mode, backend=backend, saved=saved).restore()


__all__ = ["BACKENDS", "DTYPES", "RESTORE_MODES", "STORES", "TorchPlan", "check_params", "create_plan", "grad_norm",
           "perturb", "resolve_backend", "restore", "triton_available", "with_grad"]
