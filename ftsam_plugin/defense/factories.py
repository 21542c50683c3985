"""Base optimizers and lr schedulers by name (`client_optimizer`, `lr_scheduler`), built from a run's config.

`create_scheduler` takes the protocol's recipe: it decides the cosine T_max when --cos_t_max is not given.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["BASE_OPTIMIZERS", "SCHEDULERS", "base_optimizer", "create_scheduler"]


def _sgd(cfg):
    return torch.optim.SGD, dict(lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"])


def _adam(cfg):
    return torch.optim.Adam, dict(lr=cfg["lr"], weight_decay=cfg["wd"], amsgrad=True)


def _adamw(cfg):
    return torch.optim.AdamW, dict(lr=cfg["lr"], weight_decay=cfg["wd"])


# name -> builder(cfg) -> (optimizer class, kwargs)
BASE_OPTIMIZERS = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def _cosine(opt, cfg, recipe):
    t_max = cfg.get("cos_t_max") or recipe.cos_t_max or cfg["epochs"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(t_max))


def _plateau(opt, cfg, recipe):
    kw = {"factor": float(cfg["ReduceLROnPlateau_factor"])} if cfg.get("ReduceLROnPlateau_factor") else {}
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)


def _step(opt, cfg, recipe):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=int(cfg["steplr_stepsize"]), gamma=float(cfg["steplr_gamma"]))


def _multistep(opt, cfg, recipe):
    milestones = cfg.get("steplr_milestones") or []
    if isinstance(milestones, str):
        milestones = [int(m) for m in milestones.replace(",", " ").split()]
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=float(cfg["steplr_gamma"]))


# name -> builder(optimizer, cfg, recipe) -> scheduler (None: a constant lr); matched case-insensitively
SCHEDULERS = {"CosineAnnealingLR": _cosine, "ReduceLROnPlateau": _plateau, "StepLR": _step,
              "MultiStepLR": _multistep, "none": None}


def base_optimizer(cfg: dict):
    """(optimizer class, kwargs) for cfg['client_optimizer'] (a BASE_OPTIMIZERS key, checked by config.validate)."""
    return BASE_OPTIMIZERS[str(cfg["client_optimizer"]).lower()](cfg)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, recipe) -> Optional[object]:
    """The lr scheduler cfg['lr_scheduler'] names, on `optimizer`, or None for 'none'.

    Args:
        optimizer: the optimizer whose lr it schedules (for SAM: its base optimizer; they share param_groups).
        cfg: the validated config.
        recipe: the protocol's `Recipe` (its `cos_t_max` is the cosine T_max unless --cos_t_max is given).
    """
    by_name = {name.lower(): make for name, make in SCHEDULERS.items()}
    make = by_name[str(cfg.get("lr_scheduler") or "none").lower()]
    return make(optimizer, cfg, recipe) if make else None
