"""SAM kernels with one interface and three backends.

    norm = grad_norm(params, adaptive, eta, backend, weights_only)          # 0-d fp32 ||T*g||_2 on the params' device
    saved = perturb(params, norm, rho, adaptive, eta, store="w"|"e", ...)  # w += e; keeps old w ("w") or e ("e")
    restore(with_grad(params), saved, mode="copy"|"subtract", ...)         # w = old w, or w -= e

T = |w| + eta if adaptive (and ndim > 1 when weights_only) else 1; e = rho * T^2 * g / (norm + 1e-12).
Only params with a grad take part; `saved` follows `with_grad(params)` order. Nothing syncs with the host.

Backends: "triton" (multi-tensor Triton kernels, CUDA or TRITON_INTERPRET=1; fails loudly if unavailable),
"foreach" (torch._foreach_*, the CPU path), "loop" (per tensor, like davda54/sam), "auto" (triton for CUDA
params when Triton imports, else foreach).
"""

import functools

from .reference import grad_norm_foreach
from .reference import grad_norm_loop
from .reference import perturb_foreach
from .reference import perturb_loop
from .reference import restore_foreach
from .reference import restore_loop
from .reference import with_grad

BACKENDS = ("auto", "triton", "foreach", "loop")
STORES = ("w", "e")
RESTORE_MODES = ("copy", "subtract")


@functools.lru_cache(maxsize=None)
def _triton_ops():
    from . import sam_triton  # lazy: importing triton is slow and optional

    return sam_triton.grad_norm_triton, sam_triton.perturb_triton, sam_triton.restore_triton


@functools.lru_cache(maxsize=None)
def triton_available():
    try:
        _triton_ops()
        return True
    except Exception:  # ImportError, or a Triton driver that cannot initialise
        return False


def resolve_backend(backend, params):
    """The concrete backend ("triton" | "foreach" | "loop") for `params`; ValueError for unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    on_cuda = any(p.is_cuda for p in params)
    return "triton" if on_cuda and triton_available() else "foreach"


# backend name -> () -> (grad_norm, perturb, restore); triton's import is deferred to the first use
_BACKEND_OPS = {
    "triton": _triton_ops,  # explicit "triton": an ImportError propagates
    "foreach": lambda: (grad_norm_foreach, perturb_foreach, restore_foreach),
    "loop": lambda: (grad_norm_loop, perturb_loop, restore_loop),
}


def _ops(backend, params):
    return _BACKEND_OPS[resolve_backend(backend, params)]()


def grad_norm(params, adaptive=False, eta=0.0, backend="auto", weights_only=False):
    """||T * g||_2 over all `params` with a grad, fp32 accumulation; a 0-d fp32 tensor on their device."""
    params = list(params)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _ops(backend, params)[0](params, adaptive=adaptive, eta=eta, weights_only=weights_only)


def perturb(params, norm, rho, adaptive=False, eta=0.0, store="w", backend="auto", weights_only=False):
    """w += rho * T^2 * g / (norm + 1e-12) in place; returns old w copies (store="w") or e (store="e")."""
    if store not in STORES:
        raise ValueError(f"store must be 'w' or 'e', got {store!r}")
    params = list(params)
    return _ops(backend, params)[1](params, norm, rho, adaptive=adaptive, eta=eta, store=store,
                                    weights_only=weights_only)


def restore(params, saved, mode="copy", backend="auto"):
    """Undo `perturb`: w = saved (mode="copy", exact) or w -= saved (mode="subtract"); params aligned with saved."""
    if mode not in RESTORE_MODES:
        raise ValueError(f"mode must be 'copy' or 'subtract', got {mode!r}")
    params, saved = list(params), list(saved)
    if len(params) != len(saved):
        raise ValueError(f"restore got {len(params)} params for {len(saved)} saved tensors")
    _ops(backend, params)[2](params, saved, mode=mode)


__all__ = ["BACKENDS", "grad_norm", "perturb", "restore", "resolve_backend", "triton_available", "with_grad"]
