"""The path-aware perturbation (PAM; Min et al., NeurIPS 2024): perturb towards the backdoored weights.

Purified models tend to stay on a low-loss "backdoor-connected path" back to the backdoored weights theta0, which is
why fine-tuning's removal can come back. A path step takes its gradient at

    w + rho * d / ||d||_2,    d = theta0 - w  (one global L2 norm over every param of every group),

restores w and steps with that gradient: the update lowers the loss *on the way back to theta0*, pushing the model off
that path. It needs no first forward/backward (the direction is known before the step), so it costs what a plain
fine-tuning step costs. At the first step d = 0 and the step is exactly a plain one (e = 0 * d / (0 + 1e-12) = 0).

rho is absolute (the released PAM code used 0.5), not relative to the weights as ASAM's is. Only params are
perturbed; BatchNorm running statistics are buffers and are updated by the step's one forward pass, as in PAM.
Runs as torch._foreach ops on every device.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence

import torch

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


class PathAnchor:
    """theta0 (a frozen copy of the params when it was made) and the path step's perturb/restore.

    Args:
        params: the params in the order of the optimizer's groups (the anchor holds a detached copy of each).
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.anchor = [p.detach().clone() for p in self.params]
        self.digest = anchor_digest(self.anchor)
        # two persistent param-sized buffers, allocated once: d, then w's copy for restore (no allocation per step)
        self._diff: List[torch.Tensor] = [torch.empty_like(a) for a in self.anchor]
        self._saved: List[torch.Tensor] = [torch.empty_like(a) for a in self.anchor]

    def perturb(self, rhos: Sequence[float], sizes: Sequence[int]) -> None:
        """w += rho_g * (theta0 - w) / ||theta0 - w||: `rhos[g]` for the `sizes[g]` params of group g (in order)."""
        with torch.no_grad():
            params, diff = self.params, self._diff
            torch._foreach_copy_(diff, self.anchor)
            torch._foreach_sub_(diff, params)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diff)))
            torch._foreach_copy_(self._saved, params)
            start = 0
            for rho, size in zip(rhos, sizes):
                group = slice(start, start + size)
                if size:
                    scale = rho / (norm + EPS)
                    torch._foreach_mul_(diff[group], scale)
                    torch._foreach_add_(params[group], diff[group])
                start += size

    def restore(self) -> None:
        """w back to what it was before `perturb` (an exact copy)."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self._saved)
