"""`--rho auto`: choose FT-SAM's rho from the clean subset alone.

A defender never knows the trigger, so the attack success rate cannot choose rho. The rule uses only the clean
data the defense already has:

1. hold out `holdout` of the clean subset (class-balanced, drawn with the run's seed); the rest is the probe's
   training data;
2. for each rho of the grid, in increasing order: fine-tune a copy of the backdoored model for `probe_epochs`
   epochs with the run's own settings (cosine over the probe) on the probe's training data, and measure its
   accuracy on the held-out slice;
3. the first (smallest) rho is the reference: fine-tuning itself costs clean accuracy, whatever rho, so the
   budget is measured against the probe that fine-tunes almost as plain FT does, not against the undefended
   model (both are logged);
4. choose the largest rho whose held-out accuracy is at most `budget` points below the reference's. Accuracy
   falls as rho grows, so the search stops at the first rho over the budget.

Larger rho shrinks large-norm (backdoor-related) weights harder; the rule takes the most the clean data says the
model can stand. The probes leave no trace: the model, the run's settings and every RNG are restored afterwards,
so a run that chose rho = 4 continues exactly as a run given `--rho 4`. The table goes to the log
(lines starting "rho auto").
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from ftsam_plugin.errors import FtsamError

__all__ = ["Probe", "AutoRhoSettings", "split_holdout", "eval_set", "choose_rho", "DEFAULT_GRID"]

logger = logging.getLogger("ftsam_plugin.defense")

DEFAULT_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class AutoRhoSettings:
    budget: float = 2.0  # points of held-out clean accuracy below the smallest rho's probe
    grid: Tuple[float, ...] = DEFAULT_GRID
    probe_epochs: int = 3
    holdout: float = 0.2  # fraction of the clean subset held out

    def check(self) -> "AutoRhoSettings":
        if not (self.budget >= 0 and self.budget <= 100):
            raise FtsamError(f"rho_auto_budget must be in [0, 100] accuracy points, got {self.budget}; "
                             f"fix --rho_auto_budget")
        if len(self.grid) < 2 or any(not (r > 0 and r < float("inf")) for r in self.grid):
            raise FtsamError(f"rho_auto_grid must hold two or more positive finite numbers, got {list(self.grid)}; "
                             f"fix --rho_auto_grid (e.g. 1,2,4,8)")
        if self.probe_epochs < 1:
            raise FtsamError(f"rho_auto_epochs must be >= 1, got {self.probe_epochs}; fix --rho_auto_epochs")
        if not 0.0 < self.holdout < 1.0:
            raise FtsamError(f"rho_auto_holdout must be in (0, 1), got {self.holdout}; fix --rho_auto_holdout")
        return AutoRhoSettings(self.budget, tuple(sorted(set(float(r) for r in self.grid))), self.probe_epochs,
                               self.holdout)


@dataclass(frozen=True)
class Probe:
    rho: float
    holdout_acc: float
    within_budget: bool
    seconds: float


def split_holdout(indices: Sequence[int], labels: Sequence[int], fraction: float,
                  seed: int) -> Tuple[List[int], List[int]]:
    """(probe-train, held-out) indices: `fraction` of each class's indices held out (at least one per class
    where the class has two or more), drawn with `seed`; both lists keep the subset's order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = set()
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        k = int(round(len(pos) * fraction))
        k = min(max(k, 1 if len(pos) > 1 else 0), len(pos) - 1)
        held.update(rng.choice(pos, k, replace=False).tolist())
    if not held:
        raise FtsamError(f"the clean subset ({len(indices)} samples) is too small to hold out data for --rho auto; "
                         f"raise --ratio or pass a number as --rho")
    train = [int(indices[i]) for i in range(len(indices)) if i not in held]
    hold = [int(indices[i]) for i in range(len(indices)) if i in held]
    return train, hold


def eval_set(defense, indices: Sequence[int]):
    """Clean training samples `indices` with the dataset's test transform, yielding (image tensor, label)."""
    from torch.utils.data import Subset

    from ftsam_plugin.data.backdoor import TransformDataset
    from ftsam_plugin.data.transforms import get_transform

    from .subsets import raw_dataset

    raw = raw_dataset(defense.result["clean_train"])
    transform = get_transform(defense.result["clean_data"], train=False, img_size=defense.result.get("img_size"))
    return TransformDataset(Subset(raw, list(indices)), transform)


def choose_rho(defense, model, indices: Sequence[int], labels: Sequence[int],
               settings: AutoRhoSettings) -> Tuple[float, List[Probe], float]:
    """Run the probes on `defense` (an FTSAM object set up up to `setup_training`); returns (rho, probes, the
    undefended model's held-out accuracy). `model`, `defense.args` and every RNG are left as they were."""
    from ftsam_plugin.metrics import evaluate

    from .checkpoint import rng_state, set_rng_state

    args = defense.args
    train_idx, hold_idx = split_holdout(indices, labels, settings.holdout, args.random_seed)
    hold_set = eval_set(defense, hold_idx)
    train_set = defense.build_train_set(train_idx)

    def accuracy() -> float:
        return 100.0 * evaluate(model, hold_set, device=defense.device, batch_size=args.batch_size,
                                num_workers=args.num_workers)

    rngs, initial = rng_state(), copy.deepcopy(model.state_dict())
    saved = {k: getattr(args, k) for k in ("rho", "epochs", "cos_t_max")}
    base = accuracy()
    logger.info("rho auto: %d probe-training / %d held-out clean samples, %d epochs per probe; the undefended model's "
                "held-out accuracy %.2f%%; budget %.2f points below the smallest rho's probe", len(train_idx),
                len(hold_idx), settings.probe_epochs, base, settings.budget)
    probes: List[Probe] = []
    try:
        for rho in settings.grid:
            start = time.perf_counter()
            model.load_state_dict(initial)
            args.rho, args.epochs, args.cos_t_max = rho, settings.probe_epochs, None
            defense.setup_training(model)
            for epoch in range(1, settings.probe_epochs + 1):
                loss, _ = defense.train_epoch(model, train_set, epoch)
                defense.end_epoch_schedule(loss)
            acc = accuracy()
            reference = probes[0].holdout_acc if probes else acc
            probe = Probe(rho, acc, acc >= reference - settings.budget, time.perf_counter() - start)
            probes.append(probe)
            logger.info("rho auto: rho %g -> held-out accuracy %.2f%% (%+.2f points vs the smallest rho, %+.2f vs the "
                        "undefended model) %s, %.0f s", rho, acc, acc - reference, acc - base,
                        "within budget" if probe.within_budget else "over budget", probe.seconds)
            if not probe.within_budget:
                break
    finally:
        model.load_state_dict(initial)
        for key, value in saved.items():
            setattr(args, key, value)
        set_rng_state(rngs)
    chosen = max(p.rho for p in probes if p.within_budget)
    logger.info("rho auto: chose rho %g (the largest within %.2f points of the smallest rho's held-out accuracy)",
                chosen, settings.budget)
    return chosen, probes, base
