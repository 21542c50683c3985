"""GSAM's gradient decomposition (Zhuang et al., ICLR 2022), as BackdoorBench's SAM applies it with `alpha`.

With g the gradient at w (first pass) and h the gradient at w + e (second pass), both over every param with a
grad, the update direction becomes h - alpha * v, where v = g - (cos(g, h) * ||g|| / ||h||) * h is g's component
orthogonal to h. alpha = 0 (FT-SAM's value) leaves h unchanged. The norms are plain (not |w|-weighted), and a
1e-12 guards each division, as in the reference.
"""

import torch

__all__ = ["EPS", "gradient_decompose"]

EPS = 1e-12


@torch.no_grad()
def gradient_decompose(old_grads, new_grads, alpha, eps=EPS):
    """h -= alpha * (g - cos(g, h) * ||g|| / (||h|| + eps) * h), in place on `new_grads` (the h's).

    Args:
        old_grads: the first-pass gradients g (one tensor per param, same order as `new_grads`).
        new_grads: the second-pass gradients h, changed in place.
        alpha: the GSAM coefficient (0 does nothing).
        eps: added to ||g||·||h|| in the cosine and to ||h|| in the projection.
    """
    old_grads, new_grads = list(old_grads), list(new_grads)
    if alpha == 0 or not new_grads:
        return
    if len(old_grads) != len(new_grads):
        raise ValueError(f"{len(old_grads)} first-pass gradients for {len(new_grads)} second-pass ones")

    def norm(tensors):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32)
                                                     for t in tensors]))

    inner = torch.stack([torch.sum(g.float() * h.float()) for g, h in zip(old_grads, new_grads)]).sum()
    new_norm, old_norm = norm(new_grads), norm(old_grads)
    cosine = inner / (new_norm * old_norm + eps)
    for g, h in zip(old_grads, new_grads):
        vertical = g.float() - cosine * old_norm * h.float() / (new_norm + eps)  # the reference's order of operations
        h.add_(vertical.to(h.dtype), alpha=-alpha)
