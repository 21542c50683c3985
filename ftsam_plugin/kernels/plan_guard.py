"""Whether a kernel plan's parameters and grads are still where, and what, they were: one pass per step.

    guard = create_guard(params, alignments)  # each param with a grad; alignments: what each grad's address must
                                              # be a multiple of (16 in an aligned Triton group, else 1)
    code, index = guard.check()               # every step
    ptrs = guard.grad_ptrs()                  # after MOVED: the grads' addresses (int64 CPU tensor, params order)

check() returns (SAME, -1): nothing moved; (MOVED, -1): only grads moved (or took strides that differ only in
size-1 dims) and each still fits its slot, so a plan re-pointed at `grad_ptrs()` is valid, and the guard compares
with where they are now from then on; (code >= 2, i): stale, REASONS[code - 2] is what changed at params[i] (the
first found): build a new plan. The rule, per param in order: address and device, dtype, shape, strides as at
the snapshot; a grad; its dtype as then; the grad where it was with the strides it had, or else laid out like its
param (`same_layout`) at an address that is a multiple of its alignment.

Two implementations of that one rule, chosen in one place (`create_guard`, or $FTSAM_PLAN_GUARD):
"compiled": plan_guard.cpp, built once with the system C++ compiler against this torch (native_build; ~2 µs for
PreAct-ResNet18's 54 params, against ~20 µs for "python": torch's own C++ pointer and layout checks for the
common case, the rule in Python otherwise); "auto" (default): compiled where it builds, else python (logged
once). "compiled" asked for by name raises when it cannot be built. tests/test_kernels_plan_guard.py holds both
to the same answer on every failure case.
"""

import functools
import importlib.util
import logging
import os
import sysconfig
from pathlib import Path

import torch

from .native_build import BuildError
from .native_build import shared_library

SAME, MOVED = 0, 1
REASONS = ("param storage moved", "param dtype changed", "param shape changed", "param strides changed",
           "grad is None", "grad dtype changed", "grad laid out unlike its param", "grad address misaligned")
(PARAM_STORAGE, PARAM_DTYPE, PARAM_SHAPE, PARAM_STRIDES, NO_GRAD, GRAD_DTYPE, GRAD_LAYOUT,
 GRAD_ALIGNMENT) = range(2, 2 + len(REASONS))
IMPLS = ("auto", "compiled", "python")
ENV = "FTSAM_PLAN_GUARD"
SOURCE = Path(__file__).with_name("plan_guard.cpp")
logger = logging.getLogger("ftsam_plugin.kernels")
_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # a torch without dynamo's guards: the rule in Python every step
    _TensorGuards = None


def same_layout(shape, stride, other_shape, other_stride):
    """Whether two tensors put every element at the same offset: equal shapes, and equal strides wherever the
    size is > 1 (PyTorch's own rule: a size-1 dimension's stride is never used, and an empty tensor has none)."""
    if shape != other_shape:
        return False
    return stride == other_stride or 0 in shape or all(a == b for n, a, b in zip(shape, stride, other_stride)
                                                         if n > 1)


# ---- python: the rule written out, behind torch's own C++ checks for the common case ----
class _Entry:
    __slots__ = ("ptr", "device", "dtype", "shape", "stride", "grad_ptr", "grad_dtype", "grad_stride", "align")

    def __init__(self, p, align):
        g = p.grad
        if g is None or g.ndim != p.ndim or align < 1:
            raise ValueError("each param needs a grad and an alignment >= 1")
        self.ptr, self.device, self.dtype, self.shape = p.data_ptr(), p.device, p.dtype, p.shape
        self.stride = p.stride()
        self.grad_ptr, self.grad_dtype, self.grad_stride, self.align = g.data_ptr(), g.dtype, g.stride(), int(align)


class _Quick:
    """True only when every param and grad has the address, dtype, device, shape and strides it had (two C++
    calls from torch: what CUDA-graph trees and torch.compile's guards use); False may be a false alarm."""

    def __init__(self, params):
        tensors = list(params) + [p.grad for p in params]
        self._ptrs, self._index = [t.data_ptr() for t in tensors], list(range(len(tensors)))
        self._guard = None
        if _PTRS_EQUAL is not None and _TensorGuards is not None:
            try:
                self._guard = _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                            dynamic_dims_strides=[list(t.stride()) for t in tensors])
            except (TypeError, RuntimeError, ValueError, SystemError):  # another signature in this torch
                self._guard = None

    def same(self, params):
        if self._guard is None:
            return False
        tensors = params + [p.grad for p in params]
        try:
            return _PTRS_EQUAL(tensors, self._ptrs, self._index) and self._guard.check(*tensors)
        except (RuntimeError, TypeError, AttributeError):  # a grad is None
            return False


class PythonGuard:
    """The rule in Python (see the module docstring); the reference the compiled guard is held to."""

    def __init__(self, params, alignments):
        self._params, alignments = list(params), list(alignments)
        if len(alignments) != len(self._params):
            raise ValueError(f"{len(self._params)} params but {len(alignments)} alignments")
        self._ref = [_Entry(p, a) for p, a in zip(self._params, alignments)]
        self._quick = _Quick(self._params)

    def check(self):
        if self._quick.same(self._params):
            return SAME, -1
        moved = False
        for i, (p, r) in enumerate(zip(self._params, self._ref)):
            if p.data_ptr() != r.ptr or p.device != r.device:
                return PARAM_STORAGE, i
            if p.dtype != r.dtype:
                return PARAM_DTYPE, i
            if p.shape != r.shape:
                return PARAM_SHAPE, i
            if p.stride() != r.stride:
                return PARAM_STRIDES, i
            g = p.grad
            if g is None:
                return NO_GRAD, i
            if g.dtype != r.grad_dtype:
                return GRAD_DTYPE, i
            if g.shape != p.shape:
                return GRAD_LAYOUT, i
            ptr, stride = g.data_ptr(), g.stride()
            if ptr != r.grad_ptr or stride != r.grad_stride:
                if not same_layout(g.shape, stride, r.shape, r.stride):
                    return GRAD_LAYOUT, i
                if ptr % r.align:
                    return GRAD_ALIGNMENT, i
                moved = True
        if not moved:
            return SAME, -1  # the quick check's false alarm (e.g. under autocast: other dispatch keys)
        for p, r in zip(self._params, self._ref):
            r.grad_ptr, r.grad_stride = p.grad.data_ptr(), p.grad.stride()
        self._quick = _Quick(self._params)
        return MOVED, -1

    def grad_ptrs(self):
        return torch.tensor([0 if p.grad is None else p.grad.data_ptr() for p in self._params], dtype=torch.int64)


# ---- compiled: plan_guard.cpp ----
class CompiledGuard:
    """The same rule in one compiled pass over the params (plan_guard.cpp)."""

    def __init__(self, params, alignments):
        self._mod = compiled_module()
        self._params = list(params)
        alignments = [int(a) for a in alignments]
        if len(alignments) != len(self._params):
            raise ValueError(f"{len(self._params)} params but {len(alignments)} alignments")
        self._ref = self._mod.snapshot(self._params, alignments)

    def check(self):
        return self._mod.check(self._params, self._ref)

    def grad_ptrs(self):
        return torch.frombuffer(self._mod.grad_ptrs(self._params), dtype=torch.int64)  # no per-int conversion


def build_flags():
    """Compiler flags for plan_guard.cpp against the running torch and Python (they key the build cache)."""
    root = Path(torch.__file__).resolve().parent
    lib = root / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-O2", "-shared", "-fPIC", "-std=c++20", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-DFTSAM_TORCH_VERSION=\"{torch.__version__}\"", f"-I{root / 'include'}",
            f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
            f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch_python", "-ltorch", "-ltorch_cpu", "-lc10"]


@functools.lru_cache(maxsize=None)
def compiled_module():
    """plan_guard.cpp built (once per source, torch and Python; cached on disk) and imported; raises BuildError,
    ImportError or OSError where that fails."""
    path = shared_library("plan_guard", SOURCE, build_flags(), suffix=sysconfig.get_config_var("EXT_SUFFIX"))
    spec = importlib.util.spec_from_file_location("plan_guard", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_IMPLS = {"compiled": CompiledGuard, "python": PythonGuard}


@functools.lru_cache(maxsize=None)
def _auto():
    try:
        compiled_module()
        return "compiled"
    except (BuildError, ImportError, OSError) as exc:
        logger.warning("SAM plan guard: the compiled check could not be built (%s); using the Python one "
                       "(~20 µs more host time per step)", str(exc).splitlines()[0])
        return "python"


def resolve_impl(impl=None):
    """"compiled" or "python" for `impl` (default: $FTSAM_PLAN_GUARD, else "auto"); ValueError for other names."""
    impl = impl or os.environ.get(ENV) or "auto"
    if impl not in IMPLS:
        raise ValueError(f"unknown plan guard {impl!r} (from ${ENV} or the caller); choose one of {', '.join(IMPLS)}")
    return _auto() if impl == "auto" else impl


def create_guard(params, alignments, impl=None):
    """A guard (`check`, `grad_ptrs`) for `params` (each with a grad) as they are now; see the module docstring."""
    return _IMPLS[resolve_impl(impl)](params, alignments)


__all__ = ["GRAD_ALIGNMENT", "GRAD_DTYPE", "GRAD_LAYOUT", "IMPLS", "MOVED", "NO_GRAD", "PARAM_DTYPE",
           "PARAM_SHAPE", "PARAM_STORAGE", "PARAM_STRIDES", "REASONS", "SAME", "CompiledGuard", "PythonGuard",
           "build_flags", "compiled_module", "create_guard", "resolve_impl", "same_layout"]
