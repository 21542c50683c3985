"""Training losses of the defenses, by name (a protocol names its loss; `label_smoothing` is its parameter)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["smooth_crossentropy", "LOSSES", "create_loss"]


def smooth_crossentropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """BackdoorBench's label-smoothed loss, batch mean: KL(q || softmax(logits)), q = 1-eps on the true class and
    eps/(C-1) on each other class (torch's `label_smoothing` puts eps/C everywhere instead). eps = 0: cross-entropy."""
    num_classes = logits.size(1)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # at least fp32 (AMP logits), float64 stays
    q = torch.full_like(logits, smoothing / max(num_classes - 1, 1), dtype=dtype)
    q.scatter_(1, target.unsqueeze(1), 1.0 - smoothing)
    log_p = F.log_softmax(logits.to(dtype), dim=1)
    return F.kl_div(log_p, q, reduction="none").sum(-1).mean()


# name -> loss(logits, target, smoothing) -> batch mean
LOSSES = {"smooth_crossentropy": smooth_crossentropy}


def create_loss(name: str, smoothing: float):
    """`loss_fn(logits, target)` for the registered loss `name` with label smoothing `smoothing`."""
    loss = LOSSES[name]
    return lambda logits, target: loss(logits, target, smoothing)
