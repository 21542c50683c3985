"""The SAM optimizer's kernel plans: built once, reused while the params' and grads' storage stays put.

Checking that costs a few microseconds per step: one list of grads and one C++ comparison of data pointers
(`torch._C._tensors_data_ptrs_at_indices_equal`, what CUDA-graph trees use; a Python comparison where a torch
lacks it). When only the grads moved (set to None and reallocated elsewhere), their new addresses are written
into the plans' tables (one small copy per plan). rho is read from the groups at every perturbation (a rho
schedule changes it every step), so a new rho rebuilds nothing. Anything else (a param's storage, a group's
adaptive/eta or size, which groups share a rho, a param gaining or losing its grad, a grad changing dtype or
layout) makes the plans stale, and the optimizer builds new ones.
"""

import torch

from ftsam_plugin import kernels

SAME, MOVED, STALE = "same", "moved", "stale"
_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


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
        self._ptrs = [p.data_ptr() for p in self._params] + [p.grad.data_ptr() for p in self._params]
        self._index, self._first = list(range(2 * n)), list(range(n))

    def refresh(self, param_groups):
        """SAME (nothing moved), MOVED (grads had moved: the plans now point at them) or STALE (build new plans).

        Called every step: the common case is one comparison of all params' and grads' data pointers.
        """
        if _settings(param_groups) != self._settings:
            return STALE
        if self._gradless and any(p.grad is not None for p in self._gradless):
            return STALE
        grads = [p.grad for p in self._params]
        try:
            if _ptrs_equal(self._params + grads, self._ptrs, self._index):
                return SAME
            if not _ptrs_equal(self._params, self._ptrs, self._first):
                return STALE
        except (RuntimeError, TypeError, AttributeError):  # a grad went away (None is not a tensor)
            return STALE
        if not all(plan.update_grads() for plan, _ in self.plans):
            return STALE
        self._ptrs[len(grads):] = [g.data_ptr() for g in grads]
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
