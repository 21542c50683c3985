"""FT-SAM (Zhu et al., ICCV 2023): fine-tuning with ASAM, as a BackdoorBench defense.

Entry points (setup.cfg, group `backdoorbench.defenses`): `ftsam` -> FTSAM, `ft-baseline` -> FineTune.
Run standalone: `python -m ftsam_plugin.defense.ftsam --result_file <record> [--defense ft-baseline] ...`.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from . import ddp
from .config import RHO_AUTO
from .finetune import FineTune
from .rho_schedule import apply_rho_schedule
from .registry import DEFENSES

logger = logging.getLogger("ftsam_plugin.defense")

__all__ = ["FTSAM", "FineTune", "DEFENSES"]


class FTSAM(FineTune):
    """FT-SAM: FineTune's pipeline with ASAM (e = rho * w^2 * g / || |w| * g ||, eta 0) and BN frozen in pass two.

    Args:
        args: argparse.Namespace from a parser prepared with `FTSAM.add_arguments` (see FineTune).

    Each step: forward/backward at w (under DDP's `no_sync`, forward included: each rank perturbs with its local
    gradient), w += e, forward/backward at w + e with BatchNorm running statistics frozen (the gradient all-reduce
    happens here), restore w, base-optimizer step with that gradient (GSAM-decomposed when --alpha is not 0).
    rho follows --rho_schedule (rho_schedule.py) after every lr change. With a cheaper schedule (--sam_every,
    --sam_prob, --sam_epochs; `ftsam_plugin.optim.SamSchedule`) the other steps are FT's plain steps.
    """

    name = "ftsam"
    uses_sam = True

    def create_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        from ftsam_plugin.optim import SAM, SamSchedule

        args = self.args
        restore = args.restore
        if self.dist.is_distributed and restore == "subtract":
            # w + e - e rounds differently on each rank (e is local): ranks would drift apart
            restore = "copy"
        cls, kwargs = self._base_optimizer()
        # the same counter-based rule on every rank: the same steps are SAM steps everywhere
        schedule = SamSchedule(every=int(args.sam_every), prob=float(args.sam_prob), seed=int(args.random_seed),
                               epochs=tuple(args.sam_epochs) if args.sam_epochs is not None else None)
        # built before any checkpoint is loaded: the params are the starting weights, theta0 of a path perturbation
        return SAM([p for p in model.parameters() if p.requires_grad], cls, rho=args.rho, adaptive=args.adaptive,
                   eta=args.eta, restore=restore, schedule=schedule, alpha=float(args.alpha),
                   perturbation=args.perturbation, path_rho=float(args.path_rho), **kwargs)

    def lr_changed(self) -> None:
        """Set rho for the lr the next steps use (--rho_schedule; constant: rho throughout)."""
        args = self.args
        apply_rho_schedule(self.optimizer.param_groups, args.rho_schedule, args.rho, args.rho_min, args.lr)

    def choose_subset(self):
        self._subset = super().choose_subset()
        return self._subset

    def setup_training(self, model: torch.nn.Module) -> None:
        if self.args.rho == RHO_AUTO:  # `--rho auto`: choose it from the clean subset first (rho_auto.py)
            self.args.rho = self._auto_rho(model)
        super().setup_training(model)

    def _auto_rho(self, model: torch.nn.Module) -> float:
        from ftsam_plugin.io import safe_load

        from .checkpoint import FIX as CHECKPOINT_FIX
        from .rho_auto import choose_rho
        from .subsets import dataset_labels, raw_dataset

        ckpt = os.path.join(self.args.checkpoint_save, "last.pt")
        if self.args.resume and os.path.isfile(ckpt):  # keep the run's choice (the probes are not bit-exact on CPU)
            state = safe_load(ckpt, what="defense checkpoint", fix=CHECKPOINT_FIX)
            rho = (state.get("config") or {}).get("rho") if isinstance(state, dict) else None
            if isinstance(rho, (int, float)):
                logger.info("rho auto: resuming with rho %g, chosen by the run being resumed", rho)
                return float(rho)
        labels = dataset_labels(raw_dataset(self.result["clean_train"]))
        subset = getattr(self, "_subset", None) or self.choose_subset()
        rho, self.rho_probes, _ = choose_rho(self, model, subset, [labels[i] for i in subset],
                                             self.args.rho_auto_settings)
        return float(ddp.all_gather_objects(rho, self.dist)[0])  # every rank takes rank 0's choice

    def train_epoch(self, model, train_set, epoch: int):
        self.optimizer.schedule.set_epoch(epoch)  # for --sam_epochs
        return super().train_epoch(model, train_set, epoch)

    def train_step(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
        from ftsam_plugin.optim import freeze_bn

        sam, scaler = self.optimizer, self.scaler
        kind = sam.step_kind()
        if kind != "gradient":
            return self._one_pass_step(model, x, y, path=kind == "path")
        # grads zeroed in place, never freed: they keep their storage, so SAM's kernel plans stay valid every step
        sam.zero_grad(set_to_none=False)
        with ddp.no_sync(model):
            with self.autocast():
                logits = model(x)
                loss = self.loss_fn(logits, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        sam.first_step(grad_scaler=scaler)
        sam.zero_grad(set_to_none=False)
        with freeze_bn(model):
            with self.autocast():
                loss2 = self.loss_fn(model(x), y)
            (scaler.scale(loss2) if scaler is not None else loss2).backward()
        sam.second_step(grad_scaler=scaler)
        return loss.detach(), logits.detach()

    def _one_pass_step(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, path: bool):
        """A step with one forward/backward (gradient all-reduced under DDP): FT's plain step, or a path step taken
        at w + rho * (theta0 - w) / ||theta0 - w|| (BatchNorm statistics update in its one pass, as in a plain step).
        The loss and logits returned are those at the point the gradient was taken."""
        sam, scaler = self.optimizer, self.scaler
        sam.zero_grad(set_to_none=False)  # in place, as in train_step
        if path:
            sam.perturb_path()
        with self.autocast():
            logits = model(x)
            loss = self.loss_fn(logits, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if path:
            sam.second_step(grad_scaler=scaler)
        else:
            sam.plain_step(grad_scaler=scaler)
        return loss.detach(), logits.detach()

    def epoch_start_metrics(self) -> dict:
        return {"rho": float(self.optimizer.param_groups[0]["rho"])}  # the epoch's first step's (--rho_schedule)

    def extra_metrics(self) -> dict:
        sam = self.optimizer  # sam_steps: SAM steps so far (all of them without a cheaper schedule)
        extra = {"sam_steps": sam.schedule.sam_steps}
        if sam.path_rho > 0:  # path steps taken in place of plain ones
            extra["path_steps"] = sam.path_steps
        return extra


if __name__ == "__main__":
    from ftsam_plugin.defense.cli import main  # the script; the CLI sits above this module, never imported by it

    sys.exit(main())
