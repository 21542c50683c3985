"""How FT-SAM's rho moves during a run (`--rho_schedule`), as one registered rule per name.

- `constant`: rho throughout.
- `proportional`: rho follows the learning rate, from `rho` (at the configured lr) down to `rho_min` (at lr 0):
  rho_t = rho_min + (rho - rho_min) * lr_t / lr. This is BackdoorBench's `ProportionScheduler` as its
  defense/ft-sam.py builds it (max_lr = the configured lr, min_lr = 0, max_value = rho_max, min_value = rho_min):
  with rho 8, rho_min 2 and a cosine lr, rho is 8 at the start and 5 halfway through a cosine period.

The rule is applied to every param group after each lr change (`apply_rho_schedule`), so each SAM step perturbs
with the rho of the lr it steps with, as in the reference.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["RHO_SCHEDULES", "rho_at", "apply_rho_schedule"]


def _constant(rho: float, rho_min: float, lr: float, max_lr: float) -> float:
    return rho


def _proportional(rho: float, rho_min: float, lr: float, max_lr: float) -> float:
    # the reference's expression, min_lr = 0: min_value + (max_value - min_value) * (lr - min_lr) / (max_lr - min_lr)
    return rho_min + (rho - rho_min) * lr / max_lr


# name -> rule(rho, rho_min, lr, max_lr) -> the rho to perturb with at that lr
RHO_SCHEDULES = {"constant": _constant, "proportional": _proportional}


def rho_at(name: str, rho: float, rho_min: Optional[float], lr: float, max_lr: float) -> float:
    """The rho schedule `name` gives at learning rate `lr` (rho_min None: the same as rho)."""
    return RHO_SCHEDULES[name](float(rho), float(rho if rho_min is None else rho_min), float(lr), float(max_lr))


def apply_rho_schedule(param_groups, name: str, rho: float, rho_min: Optional[float], max_lr: float) -> float:
    """Set every group's rho for its current lr; returns the first group's."""
    for group in param_groups:
        group["rho"] = rho_at(name, rho, rho_min, group["lr"], max_lr)
    return param_groups[0]["rho"]
