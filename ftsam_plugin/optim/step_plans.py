"""The SAM optimizer's kernel plans: built once, reused while the params' and grads' storage stays put.

A Triton plan reads raw addresses and element counts from a device table, so a step checks that every param and
grad is still where, and what, it was: one pass over the params (`ftsam_plugin.kernels.plan_guard`, compiled
where the C++ compiler is there; address, device, dtype, shape and strides of each param and grad).
`p.data = p.data[:32]` keeps the address but not the element count: the shape check catches it. When only the
grads moved (set to None and reallocated elsewhere) and each fits its slot, their new addresses are written into
the plans' tables (one small copy per plan). rho is read from the groups at every perturbation (a rho schedule
changes it every step), so a new rho rebuilds nothing. Anything else (a param's storage or layout, a group's
adaptive/eta or size, which groups share a rho, a param gaining or losing its grad, a grad changing dtype or
layout) makes the plans stale, and the optimizer builds new ones.
"""

import torch

from ftsam_plugin import kernels
from ftsam_plugin.kernels import plan_guard

SAME, MOVED, STALE = "same", "moved", "stale"


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
        spans, at = [], 0
        for plan, _ in self.plans:  # each plan's params: a slice of self._params
            spans.append((at, at + len(plan.params)))
            at += len(plan.params)
        self._spans = spans
        alignments = [a for plan, _ in self.plans for a in plan.grad_alignment()]
        self._guard = plan_guard.create_guard(self._params, alignments) if self._params else None

    def refresh(self, param_groups):
        """SAME (nothing moved), MOVED (grads had moved: the plans now point at them) or STALE (build new plans).

        Called every step: the common case is the settings compared and one pass of the guard over the params.
        """
        if _settings(param_groups) != self._settings:
            return STALE
        if self._gradless and any(p.grad is not None for p in self._gradless):
            return STALE
        if self._guard is None:
            return SAME
        code, _ = self._guard.check()
        if code == plan_guard.SAME:
            return SAME
        if code != plan_guard.MOVED:
            return STALE
        ptrs = self._guard.grad_ptrs()
        for (plan, _), (lo, hi) in zip(self.plans, self._spans):
            plan.point_grads(ptrs[lo:hi])
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
