"""The path-aware perturbation (PAM; Min et al., NeurIPS 2024): perturb towards the backdoored weights.

Purified models tend to stay on a low-loss "backdoor-connected path" back to the backdoored weights theta0, which is
why fine-tuning's removal can come back. A path step takes its gradient at

    w + rho * d / ||d||_2,    d = theta0 - w  (one global L2 norm over every param of every group),

restores w and steps with that gradient: the update lowers the loss *on the way back to theta0*, pushing the model off
that path. It needs no first forward/backward (the direction is known before the step), so it costs what a plain
fine-tuning step costs. At the first step d = 0 and the step is exactly a plain one (e = 0 * d / (0 + 1e-12) = 0).

rho is absolute (the released PAM code used 0.5), not relative to the weights as ASAM's is. Only params are
perturbed; BatchNorm running statistics are buffers and are updated by the step's one forward pass, as in PAM.

Two routes, chosen once by `backend` (SAM's names): "triton" (and "auto" for CUDA params when Triton imports) runs
the SAM kernels with d read in place of the grads (`kernels.create_plan(..., directions=d)`, adaptive off: their
norm is ||d|| and their perturbation w += rho * d / (||d|| + 1e-12)), one plan per param group, built at the first
step and rebuilt when a param's storage, dtype, shape or strides changed; "foreach" and "loop" run torch._foreach
ops (the path step has no per-tensor variant). d itself is filled by foreach ops on both routes.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence

import torch

from ftsam_plugin import kernels

__all__ = ["PathAnchor", "anchor_digest"]

EPS = 1e-12


def anchor_digest(tensors: Sequence[torch.Tensor]) -> str:
    """sha256 over the anchor's dtypes, shapes and bytes: a resumed run checks it got the same theta0."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _where(params):
    """What a plan's raw addresses rely on, per param (plan_guard's guards also check grads, which a path step,
    taken before its backward, does not have)."""
    return [(p.data_ptr(), p.device, p.dtype, p.shape, p.stride()) for p in params]


class _PathPlans:
    """A kernels plan per non-empty param group with d as its g; one norm over all of them."""

    def __init__(self, params, directions, sizes, backend):
        self.sizes, self.where, self.plans = tuple(sizes), _where(params), []
        start = 0
        for group, size in enumerate(sizes):
            if size:
                span = slice(start, start + size)
                self.plans.append((kernels.create_plan(params[span], backend=backend, directions=directions[span]),
                                   group))
            start += size

    def valid(self, params, sizes):
        return tuple(sizes) == self.sizes and _where(params) == self.where

    def perturb(self, rhos):
        norms = [plan.grad_norm() for plan, _ in self.plans]
        norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        for plan, group in self.plans:
            plan.perturb(norm, rhos[group])
        return norm

    def restore(self):
        for plan, _ in self.plans:
            plan.restore()


class PathAnchor:
    """theta0 (a frozen copy of the params when it was made) and the path step's perturb/restore.

    Args:
        params: the params in the order of the optimizer's groups (the anchor holds a detached copy of each).
        backend: "auto" | "triton" | "foreach" | "loop" (the SAM optimizer passes its own; see the module docstring).
    """

    def __init__(self, params: Sequence[torch.Tensor], backend: str = "auto"):
        self.params = list(params)
        self.anchor = [p.detach().clone() for p in self.params]
        self.digest = anchor_digest(self.anchor)
        self.backend = backend
        self.fused = kernels.resolve_backend(backend, self.params) == "triton"  # ValueError for unknown names
        self.plan_builds = 0  # Triton route: plans built (first step, a param moved)
        self._plans = None
        # persistent param-sized buffers, allocated once: d, and (foreach route; a plan keeps its own) w's copy
        self._diff: List[torch.Tensor] = [torch.empty_like(a) for a in self.anchor]
        self._saved: List[torch.Tensor] = [] if self.fused else [torch.empty_like(a) for a in self.anchor]

    def perturb(self, rhos: Sequence[float], sizes: Sequence[int]) -> torch.Tensor:
        """w += rho_g * (theta0 - w) / ||theta0 - w||: `rhos[g]` for the `sizes[g]` params of group g (in order).
        Returns ||theta0 - w||, a 0-d fp32 tensor (on the Triton route a plan's own, overwritten by the next step)."""
        with torch.no_grad():
            params, diff = self.params, self._diff
            torch._foreach_copy_(diff, self.anchor)
            torch._foreach_sub_(diff, params)
            if self.fused:
                return self._current_plans(sizes).perturb(rhos)
            # .float(): an fp16 norm would round 1e-12 to 0, and d = 0 would give 0 * inf = NaN (fp32: a no-op)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diff))).float()
            torch._foreach_copy_(self._saved, params)
            start = 0
            for rho, size in zip(rhos, sizes):
                group = slice(start, start + size)
                if size:
                    scale = rho / (norm + EPS)
                    torch._foreach_mul_(diff[group], scale)
                    torch._foreach_add_(params[group], diff[group])
                start += size
            return norm

    def _current_plans(self, sizes):
        if self._plans is None or not self._plans.valid(self.params, sizes):
            self._plans = None  # drop the old plans' buffers before the new ones are allocated
            self._plans = _PathPlans(self.params, self._diff, sizes, self.backend)
            self.plan_builds += 1
        return self._plans

    def restore(self) -> None:
        """w back to what it was before `perturb` (an exact copy)."""
        with torch.no_grad():
            if self.fused:
                self._plans.restore()
            else:
                torch._foreach_copy_(self.params, self._saved)
