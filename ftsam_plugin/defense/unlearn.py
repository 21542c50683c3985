"""`--unlearn uap|uap-l2`: unlearn an inverted trigger found on the clean subset alone, all through fine-tuning.

A backdoored model has a shortcut to its target class: a small universal perturbation (UAP) sends most images there.
Before the first step, `UapUnlearning.scan` looks for that shortcut with the clean subset and the weights only: for
every class c it fits a targeted UAP (radius --unlearn_eps in pixels; L-inf for uap, L2 over the image for uap-l2,
which can concentrate on a patch) on half of a fixed pool of clean-subset images and measures on the other half how
many images of the other classes it sends to c. The class it reaches most easily is the suspect; its UAP is the
inverted trigger. The defender never sees the trigger or the target.

Then every training step (`augment`) adds --unlearn_frac of the batch again, carrying the inverted trigger, at the
images' true labels, so the step unlearns the shortcut; before that, one gradient step moves the UAP towards
the suspect class on those images (BatchNorm in eval mode, the weights' gradients untouched), so the adversary
follows the backdoor if fine-tuning brings it back. The share of those images the model still sends to the suspect
class is logged per epoch (`unlearn_success`, a clean-data signal of the backdoor returning).

Cost: the step's batch grows by --unlearn_frac, plus one forward/backward on those images for the UAP step (and,
under DDP, one broadcast of the BatchNorm buffers); the scan, once, is SCAN_STEPS forward/backwards of SCAN_BATCH
images per class plus a forward of the SCAN_IMAGES / 2 measuring images per class
(benchmarks/results/unlearn_cost.md). Single-target (all-to-one) backdoors only: an
all-to-all backdoor has no one class to find. Where no backdoor exists, the scan still picks the easiest class, and
the run becomes adversarial fine-tuning against that class's UAP (a little clean accuracy).
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import ddp

logger = logging.getLogger("ftsam_plugin.defense")

__all__ = ["UapUnlearning", "L2UapUnlearning", "UNLEARNERS", "create_unlearner", "SCAN_IMAGES", "SCAN_STEPS",
           "SCAN_BATCH"]

SCAN_IMAGES = 1000  # the pool: the clean subset's first images (test transform), half to fit, half to measure
SCAN_STEPS = 20  # gradient steps per class's targeted UAP
SCAN_BATCH = 250  # images per scan step, drawn from the fitting half by a generator seeded with --random_seed
SCAN_STEP_SIZE = 0.25  # of the radius, per scan step
TRAIN_STEP_SIZE = 0.1  # of the radius, per training step's UAP update


class UapUnlearning:
    """Find the class a targeted UAP reaches most easily (`scan`), then unlearn that UAP in every step (`augment`).
    This class bounds the UAP in L-inf (signed-gradient steps); `L2UapUnlearning` in L2.

    Args:
        eps: radius of the UAP in pixel units (0..1; L-inf here).
        frac: share of each batch added again with the UAP, at the true labels.
        num_classes: the classifier's classes.
        mean, std: the dataset's normalisation (the transforms normalise; the UAP lives in pixel space).
        seed: seeds the scan's draws.
    """

    name = "uap"  # its --unlearn name
    DEFAULT_EPS = 10.0  # in pixel levels out of 255 (--unlearn_eps's unit): 10/255 per pixel

    def __init__(self, eps: float, frac: float, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 seed: int = 0):
        self.eps, self.frac, self.num_classes, self.seed = float(eps), float(frac), int(num_classes), int(seed)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.delta: Optional[torch.Tensor] = None  # the inverted trigger (1, C, H, W), pixels
        self.target: Optional[int] = None  # the suspect class
        self.success: list = []  # the scan's per-class success on the measuring half, %
        self._hits = self._seen = 0  # this epoch's UAP images sent to the suspect class / all

    # ------------------------------------------------------------------ the perturbation
    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Normalised images `x` with `delta` added in pixel space, clipped to valid pixels."""
        if self.mean.device != x.device or self.mean.dtype != x.dtype:  # moved once, not in every step
            self.mean, self.std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        mean, std = self.mean, self.std
        return ((x * std + mean + delta).clamp(0.0, 1.0) - mean) / std

    def _targeted_step(self, net: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor, target: int,
                       size: float, dist=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """delta moved one gradient step of `size` x the radius towards `target` on `x`, projected to the radius;
        and the logits of `x` carrying delta before the step."""
        delta = delta.detach().requires_grad_(True)
        logits = net(self.apply(x, delta))
        loss = F.cross_entropy(logits, torch.full((len(x),), target, dtype=torch.long, device=x.device))
        (grad,) = torch.autograd.grad(loss, delta)
        if dist is not None:
            ddp.all_reduce_sum(grad, dist)  # every rank takes the same step: the UAP stays identical
        return self._project(delta.detach() - size * self.eps * self._direction(grad)), logits.detach()

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The step's unit direction (L-inf: the sign)."""
        return grad.sign()

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        """delta back inside the radius (L-inf: clipped per pixel)."""
        return delta.clamp(-self.eps, self.eps)

    # ------------------------------------------------------------------ the scan
    @torch.no_grad()
    def _predict(self, net, x, delta) -> torch.Tensor:
        return torch.cat([net(self.apply(x[i:i + SCAN_BATCH], delta)).argmax(1) for i in range(0, len(x), SCAN_BATCH)])

    def scan(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
        """Fit a targeted UAP per class on the even images, measure on the odd ones; keep the easiest class's.

        Args:
            model: the model to defend (left in the mode it was in; its weights and grads untouched).
            images: normalised clean images (N, C, H, W) on the model's device; labels: (N,).
        Returns the suspect class."""
        net = ddp.unwrap(model)
        was_training = net.training
        net.eval()
        fit_x, measure_x, measure_y = images[0::2], images[1::2], labels[1::2]
        gen = torch.Generator().manual_seed(self.seed)
        shape = (1,) + tuple(images.shape[1:])
        deltas, success = [], []
        try:
            for c in range(self.num_classes):
                delta = torch.zeros(shape, device=images.device)
                for _ in range(SCAN_STEPS):
                    idx = torch.randint(0, len(fit_x), (min(SCAN_BATCH, len(fit_x)),), generator=gen)
                    delta, _ = self._targeted_step(net, fit_x[idx.to(images.device)], delta, c, SCAN_STEP_SIZE)
                pred = self._predict(net, measure_x, delta)
                others = measure_y != c
                success.append(float((pred[others] == c).float().mean()) * 100 if others.any() else 0.0)
                deltas.append(delta)
        finally:
            net.train(was_training)
        self.target = int(max(range(self.num_classes), key=lambda k: success[k]))
        self.delta, self.success = deltas[self.target], [round(s, 2) for s in success]
        logger.info("unlearn %s: targeted-UAP success per class (radius %.4f, %d measuring images): %s; suspect "
                    "class %d", self.name, self.eps, len(measure_x), ", ".join(f"{s:.1f}" for s in self.success), self.target)
        return self.target

    # ------------------------------------------------------------------ training
    def augment(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dist=None):
        """The batch with its first ceil(frac * n) images added again carrying the UAP, at their true labels; the
        UAP first takes one step towards the suspect class on them (eval mode, fp32)."""
        if self.delta is None:
            raise RuntimeError("UapUnlearning.augment before scan (or load_state_dict)")
        k = max(1, math.ceil(self.frac * len(x)))
        xs, ys = x[:k], y[:k]
        distributed = dist if dist is not None and dist.is_distributed else None
        if distributed is not None:  # the eval-mode step reads BatchNorm's running statistics, which the last
            ddp.broadcast_buffers(model, distributed)  # step left rank-local: rank 0's everywhere, as after a resume
        net = ddp.unwrap(model)
        was_training = net.training
        net.eval()
        try:
            self.delta, logits = self._targeted_step(net, xs, self.delta.to(x.device), self.target,
                                                     TRAIN_STEP_SIZE, distributed)
            others = ys != self.target  # the signal, from the step's own forward (the UAP before the step)
            self._hits += int((logits.argmax(1)[others] == self.target).sum())
            self._seen += int(others.sum())
            with torch.no_grad():
                xa = self.apply(xs, self.delta)
        finally:
            net.train(was_training)
        return torch.cat([x, xa.to(x.dtype)]), torch.cat([y, ys])

    def epoch_metrics(self) -> Dict[str, float]:
        """The epoch's share of UAP images (not of the suspect class) sent to it, %, then reset (each step counts
        its images with the UAP it started from: no forward pass of its own)."""
        rate = 100.0 * self._hits / self._seen if self._seen else float("nan")
        self._hits = self._seen = 0
        return {"unlearn_class": self.target, "unlearn_success": rate}

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"delta": None if self.delta is None else self.delta.detach().cpu().clone(), "target": self.target,
                "success": list(self.success)}

    def load_state_dict(self, state: dict) -> None:
        self.delta = None if state.get("delta") is None else state["delta"].clone()
        self.target = None if state.get("target") is None else int(state["target"])
        self.success = list(state.get("success") or [])


class L2UapUnlearning(UapUnlearning):
    """The same with the UAP bounded in L2 over the whole image: it can concentrate on a few pixels, as a patch
    trigger does (an L-inf UAP spreads thinly over all of them)."""

    name = "uap-l2"
    DEFAULT_EPS = 510.0  # in pixel levels out of 255: an L2 radius of 2.0 on the 0..1 scale

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / (grad.norm() + 1e-12)

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        norm = float(delta.norm())
        return delta * (self.eps / norm) if norm > self.eps else delta


UNLEARNERS = {"none": None, **{cls.name: cls for cls in (UapUnlearning, L2UapUnlearning)}}


def create_unlearner(name: str, *, eps: Optional[float], frac: float, num_classes: int, mean, std, seed: int):
    """The `--unlearn` choice: None for 'none', else the unlearner. `eps` in pixel levels out of 255 (None: the
    unlearner's DEFAULT_EPS)."""
    cls = UNLEARNERS[name]
    if cls is None:
        return None
    return cls((cls.DEFAULT_EPS if eps is None else float(eps)) / 255.0, frac, num_classes, mean, std, seed)
