"""The SAM optimizer's kernel plans: built once, reused while the params' and grads' storage stays put.

A Triton plan reads raw addresses and element counts from a device table, so a step checks that every param and
grad is still where, and what, it was: two C++ calls over the params and grads, one comparing their data
pointers (`torch._C._tensors_data_ptrs_at_indices_equal`, what CUDA-graph trees use) and one their dtype,
shape and strides (`TensorGuards`, what torch.compile's guards use), each with a Python fallback where a torch
lacks it. `p.data = p.data[:32]` keeps the address but not the element count: the second call catches it.
When only the grads moved (set to None and reallocated elsewhere), their new addresses are written into the
plans' tables (one small copy per plan). rho is read from the groups at every perturbation (a rho schedule
changes it every step), so a new rho rebuilds nothing. Anything else (a param's storage or layout, a group's
adaptive/eta or size, which groups share a rho, a param gaining or losing its grad, a grad changing dtype or
layout) makes the plans stale, and the optimizer builds new ones.
"""

import torch

from ftsam_plugin import kernels

SAME, MOVED, STALE = "same", "moved", "stale"
_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # a torch without dynamo's guards: the Python comparison below
    _TensorGuards = None


def _ptrs_equal(tensors, ptrs, index):
    """Whether tensors[i].data_ptr() == ptrs[i] for all i; raises (RuntimeError, or AttributeError in the
    Python version) when an entry is None."""
    if _PTRS_EQUAL is not None:
        return _PTRS_EQUAL(tensors, ptrs, index)
    return [t.data_ptr() for t in tensors] == ptrs


def _rho_owners(param_groups):
    """Per group, the index of the first group with the same rho (the groups that share one perturbation)."""
    rhos = [g["rho"] for g in param_groups]
    return [rhos.index(r) for r in rhos]


def _key(t):
    return t.dtype, t.shape, t.stride()


class _Layouts:
    """The dtype, shape and strides of a list of tensors, to compare a later list with (False on any change)."""

    def __init__(self, tensors):
        self._keys = [_key(t) for t in tensors]
        self._guard = None
        if _TensorGuards is not None:
            try:  # also compares device, requires_grad and dispatch keys: stricter, so a mismatch is re-checked
                self._guard = _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                            dynamic_dims_strides=[list(t.stride()) for t in tensors])
            except (TypeError, RuntimeError, ValueError, SystemError):  # another signature in this torch
                self._guard = None

    def quick(self, tensors):
        """True only if nothing changed (one C++ call); False may be a false alarm: ask `same`."""
        if self._guard is None:
            return self.same(tensors)
        return self._guard.check(*tensors)

    def same(self, tensors):
        """Whether nothing changed (the quick check first, then a Python comparison of the three)."""
        return (self._guard is not None and self._guard.check(*tensors)) or [_key(t) for t in tensors] == self._keys


def _settings(param_groups):
    return [(owner, bool(g["adaptive"]), g["eta"], len(g["params"]))
            for owner, g in zip(_rho_owners(param_groups), param_groups)]


class StepPlans:
    """A kernels plan per (rho, adaptive, eta) bucket of the params with a grad (the usual single group: one)."""

    def __init__(self, param_groups, weights_only, restore, backend):
        self._settings = _settings(param_groups)
        buckets, self._gradless = {}, []
        for owner, group in zip(_rho_owners(param_groups), param_groups):
            for p in group["params"]:
                if p.grad is None:
                    self._gradless.append(p)
                else:
                    buckets.setdefault((owner, bool(group["adaptive"]), group["eta"]), []).append(p)
        # (plan, index of the group whose rho it perturbs with)
        self.plans = [(kernels.create_plan(ps, adaptive, eta, weights_only, restore, backend), owner)
                      for (owner, adaptive, eta), ps in buckets.items()]
        self._params = [p for ps in buckets.values() for p in ps]
        n = len(self._params)
        tensors = self._params + [p.grad for p in self._params]
        self._ptrs = [t.data_ptr() for t in tensors]
        self._index, self._first = list(range(2 * n)), list(range(n))
        self._layouts, self._param_layouts = _Layouts(tensors), _Layouts(self._params)

    def refresh(self, param_groups):
        """SAME (nothing moved), MOVED (grads had moved: the plans now point at them) or STALE (build new plans).

        Called every step: the common case is one comparison of all params' and grads' data pointers and one
        of their dtypes, shapes and strides.
        """
        if _settings(param_groups) != self._settings:
            return STALE
        if self._gradless and any(p.grad is not None for p in self._gradless):
            return STALE
        tensors = self._params + [p.grad for p in self._params]
        try:
            if _ptrs_equal(tensors, self._ptrs, self._index) and self._layouts.quick(tensors):
                return SAME
        except (RuntimeError, TypeError, AttributeError):  # a grad went away (None is not a tensor)
            return STALE
        return self._recheck(tensors)

    def _recheck(self, tensors):
        """Something differs: STALE unless the params are as they were and only the grads moved or took another
        (compatible) layout, in which case every plan is re-pointed at them."""
        n = len(self._params)
        params, grads = tensors[:n], tensors[n:]
        if not (_ptrs_equal(params, self._ptrs, self._first) and self._param_layouts.same(params)):
            return STALE
        same_layouts = self._layouts.same(tensors)
        if same_layouts and _ptrs_equal(grads, self._ptrs[n:], self._first):
            return SAME  # the quick check's false alarm (e.g. a step under autocast: other dispatch keys)
        if not all(plan.update_grads() for plan, _ in self.plans):
            return STALE
        self._ptrs[n:] = [g.data_ptr() for g in grads]
        if not same_layouts:  # grads with other strides in size-1 dims only (update_grads took them)
            self._layouts = _Layouts(tensors)
        return MOVED

    def grad_norm(self):
        """||T * g|| over every bucket (one 0-d fp32 tensor); None without any grad."""
        if not self.plans:
            return None
        norms = [plan.grad_norm() for plan, _ in self.plans]
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))

    def perturb(self, norm, param_groups):
        """w += e with each bucket's rho as its groups say now."""
        for plan, owner in self.plans:
            plan.perturb(norm, param_groups[owner]["rho"])

    def restore(self):
        for plan, _ in self.plans:
            plan.restore()


__all__ = ["MOVED", "SAME", "STALE", "StepPlans"]
