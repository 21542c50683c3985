"""Vanilla fine-tuning on a clean subset: the pipeline FT-SAM shares (BackdoorBench's defense interface).

`FineTune` owns everything (config, record, subset, loaders, schedule, evaluation, checkpoints, outputs);
`FTSAM` (in `ftsam.py`) overrides only `create_optimizer` and `train_step`, so the two differ only in the optimizer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import signal
import sys
import threading
import time
from pprint import pformat
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.settings import seed_everything

from . import ddp
from .checkpoint import plain, rng_state, set_rng_state
from .config import add_arguments as _add_arguments
from .config import load_yaml, merge_config, validate

__all__ = ["FineTune", "Interrupted", "smooth_crossentropy", "class_balanced_subset", "read_index_file"]

logger = logging.getLogger("ftsam_plugin.defense")

CHECKPOINT_FORMAT = "ftsam-defense-checkpoint"
# settings a resumed run must share with the run that wrote the checkpoint
# (everything that changes the weights or the CSV; num_workers too: it decides which RNG seeds the augmentations,
# the main process's or the DataLoader workers'). device, pin_memory, non_blocking and paths may change.
RESUME_KEYS = ("epochs", "batch_size", "lr", "lr_scheduler", "client_optimizer", "sgd_momentum", "wd", "random_seed",
               "ratio", "index", "protocol", "label_smoothing", "rho", "adaptive", "eta", "alpha", "restore",
               "cos_t_max", "steplr_stepsize", "steplr_gamma", "steplr_milestones", "ReduceLROnPlateau_factor",
               "amp", "amp_dtype", "eval_every", "num_workers")
CSV_COLUMNS = ("epoch", "train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
               "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra", "lr")


def smooth_crossentropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """BackdoorBench's label-smoothed loss, batch mean: KL(q || softmax(logits)), q = 1-eps on the true class and
    eps/(C-1) on each other class (torch's `label_smoothing` puts eps/C everywhere instead)."""
    num_classes = logits.size(1)
    q = torch.full_like(logits, smoothing / max(num_classes - 1, 1), dtype=torch.float32)
    q.scatter_(1, target.unsqueeze(1), 1.0 - smoothing)
    log_p = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_p, q, reduction="none").sum(-1).mean()


def _labels(dataset) -> List[int]:
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return [int(t) for t in targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # slow path: reads every item


def class_balanced_subset(labels: Sequence[int], num_classes: int, ratio: float, seed: int,
                          protocol: str = "fixed") -> List[int]:
    """int(N*ratio/num_classes) indices per class, drawn without replacement, classes in order.

    protocol 'backdoorbench' reproduces `choose_by_class` after `np.random.seed(seed)` (legacy global-RNG draws);
    'fixed' draws with `np.random.default_rng(seed)` and sorts each class's indices.
    """
    labels = np.asarray(labels, dtype=np.int64)
    per_class = int(len(labels) * ratio / num_classes)
    if per_class < 1:
        raise FtsamError(f"ratio {ratio} gives int({len(labels)}*{ratio}/{num_classes}) = 0 samples per class; "
                         f"raise --ratio")
    legacy = protocol == "backdoorbench"
    rng = np.random.RandomState(seed) if legacy else np.random.default_rng(seed)
    chosen: List[int] = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise FtsamError(f"class {c} has {len(pool)} training samples, fewer than the {per_class} a "
                             f"class-balanced subset needs; lower --ratio or pass --index")
        picked = rng.choice(pool, per_class, replace=False)
        chosen += (picked.tolist() if legacy else sorted(picked.tolist()))
    return [int(i) for i in chosen]


def read_index_file(path: str, n: int) -> List[int]:
    """Indices (one integer per line) from an --index file, checked against the dataset size `n`."""
    try:
        idx = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except OSError:
        raise FtsamError(f"index file {path} not found; fix --index") from None
    except ValueError:
        raise FtsamError(f"index file {path} must hold one integer per line; fix --index") from None
    if idx.size == 0:
        raise FtsamError(f"index file {path} is empty; fix --index")
    if idx.min() < 0 or idx.max() >= n:
        raise FtsamError(f"index file {path} holds indices outside 0..{n - 1}; it belongs to another dataset")
    return [int(i) for i in idx]


def _sgd(cfg):
    return torch.optim.SGD, dict(lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"])


def _adam(cfg):
    return torch.optim.Adam, dict(lr=cfg["lr"], weight_decay=cfg["wd"], amsgrad=True)


def _adamw(cfg):
    return torch.optim.AdamW, dict(lr=cfg["lr"], weight_decay=cfg["wd"])


# name -> builder(cfg) -> (optimizer class, kwargs); names as in config.OPTIMIZER_NAMES (validated there)
BASE_OPTIMIZERS = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}


def _cosine(opt, cfg):
    # backdoorbench protocol: argparser_opt_scheduler's T_max = 100 (steps for ftsam, epochs for ft-baseline)
    t_max = cfg.get("cos_t_max") or (100 if cfg.get("protocol") == "backdoorbench" else cfg["epochs"])
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(t_max))


def _plateau(opt, cfg):
    kw = {"factor": float(cfg["ReduceLROnPlateau_factor"])} if cfg.get("ReduceLROnPlateau_factor") else {}
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)


def _step(opt, cfg):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=int(cfg["steplr_stepsize"]), gamma=float(cfg["steplr_gamma"]))


def _multistep(opt, cfg):
    milestones = cfg.get("steplr_milestones") or []
    if isinstance(milestones, str):
        milestones = [int(m) for m in milestones.replace(",", " ").split()]
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=float(cfg["steplr_gamma"]))


# names as in config.SCHEDULER_NAMES (validated there; matched case-insensitively)
SCHEDULERS = {"CosineAnnealingLR": _cosine, "ReduceLROnPlateau": _plateau, "StepLR": _step,
              "MultiStepLR": _multistep, "none": None}


class FineTune:
    """Vanilla fine-tuning of a backdoored model on a class-balanced clean subset (BackdoorBench interface).

    Args:
        args: an argparse.Namespace from a parser prepared with `add_arguments` (every unset value None). The YAML
            at `args.yaml_path` (default: the packaged config of the dataset) gives the values; flags given on the
            command line override it.

    Use: `FineTune(args).defense(result_file)` -> {'model': nn.Module}; outputs go to
    `record/<result_file>/defense/<name>/` (or `<record folder>/defense/<name>/`).
    """

    name = "ft-baseline"
    config_folder = "ftsam"  # shared YAMLs; SAM keys are ignored here
    uses_sam = False

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """BackdoorBench's defense flags plus the FT-SAM ones, all defaulting to None."""
        return _add_arguments(parser)

    def __init__(self, args: argparse.Namespace):
        cli = dict(vars(args))
        dataset = cli.get("dataset")
        if cli.get("yaml_path") is None and dataset is None and cli.get("result_file"):
            dataset = _peek_record_dataset(cli["result_file"])
        yaml_cfg = load_yaml(cli.get("yaml_path"), dataset, self.config_folder)
        cfg = merge_config(yaml_cfg, cli)
        if cfg.get("dataset") is None:
            cfg["dataset"] = dataset
        cfg = validate(cfg, self.uses_sam, given={k for k, v in cli.items() if v is not None})
        cfg["terminal_info"] = list(sys.argv)
        self.cli_dataset_path = cli.get("dataset_path")  # BackdoorBench ignores the YAML's dataset_path too
        self.args = argparse.Namespace(**cfg)
        self.result = None
        self._record_dir = None
        self._handlers: List[logging.Handler] = []
        self.dist = ddp.DistInfo()
        ddp.resolve_device(self.args.device, int(os.environ.get("LOCAL_RANK", "0")))  # fail before loading data
        if self.args.result_file is not None:
            self.set_result(self.args.result_file)

    # ------------------------------------------------------------------ BackdoorBench interface
    def set_result(self, result_file: str) -> None:
        """Find the record (a name under ./record/ or a record folder), set save_path/checkpoint/log, load it."""
        record_dir = _resolve_record(result_file)
        args = self.args
        args.result_file = result_file
        save_path = os.path.join(record_dir, "defense", self.name) + os.sep
        if getattr(args, "save_path", None) != save_path or args.checkpoint_save is None:
            args.save_path = save_path
            args.checkpoint_save = args.checkpoint_save or os.path.join(save_path, "checkpoint") + os.sep
            args.log = args.log or os.path.join(save_path, "log") + os.sep
        if self.result is None or self._record_dir != record_dir:  # BackdoorBench loads it twice; once is enough
            from ftsam_plugin.data.records import load_attack_result

            self.result = load_attack_result(record_dir, dataset_path=self._data_path())
            self._record_dir = record_dir
            self._adopt_record()
            self.choose_subset()  # an impossible subset fails here, before anything is written
        for folder in (args.save_path, args.checkpoint_save, args.log):  # only once the inputs are known good
            _make_output_folder(folder)

    def set_logger(self) -> None:
        """Log to `<log>/<YYYY_mm_dd_HH_MM_SS>.log` and the console (handlers removed when `defense` ends)."""
        self._close_logger()
        pkg_logger = logging.getLogger("ftsam_plugin")
        pkg_logger.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s [%(levelname)-8s] [%(filename)s:%(lineno)d] %(message)s",
                                datefmt="%Y-%m-%d:%H:%M:%S")
        handlers: List[logging.Handler] = [logging.StreamHandler()]
        if self.dist.is_main:
            stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.localtime())
            path = os.path.join(self.args.log, f"{stamp}.log")
            try:
                handlers.append(logging.FileHandler(path))
            except OSError as exc:
                raise FtsamError(f"cannot write log file {path}: {exc.strerror}; fix the folder's permissions or "
                                 f"pass --log elsewhere") from None
        for handler in handlers:
            handler.setFormatter(fmt)
            pkg_logger.addHandler(handler)
        self._handlers = handlers
        logger.info("%s defense, config:\n%s", self.name, pformat(vars(self.args)))
        overrides = getattr(self.args, "protocol_overrides", None)
        if overrides:
            logger.info("protocol backdoorbench: using the reference's effective %s (the config said %s; pass the "
                        "flag to choose)", ", ".join(f"{k}={v[1]}" for k, v in overrides.items()),
                        ", ".join(f"{k}={v[0]}" for k, v in overrides.items()))

    def set_devices(self) -> None:
        """Check --device and join the torchrun process group if there is one."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = ddp.resolve_device(self.args.device, local_rank)
        self.dist = ddp.setup_distributed(self.device)

    def defense(self, result_file: Optional[str] = None) -> Dict[str, torch.nn.Module]:
        """set_result, set_logger, mitigation (BackdoorBench's order); returns {'model': the fine-tuned model}."""
        self.set_result(result_file or self.args.result_file)
        self.set_devices()
        try:
            self.set_logger()
            return self.mitigation()
        finally:
            self._close_logger()

    # ------------------------------------------------------------------ pipeline
    def mitigation(self) -> Dict[str, torch.nn.Module]:
        """Fine-tune on the clean subset with per-epoch evaluation and checkpoints; save defense_result.pt."""
        from ftsam_plugin.data.records import save_defense_result, write_metrics_summary_csv

        if self.result is None:
            raise FtsamError("no attack record loaded; pass --result_file")
        if not hasattr(self, "device"):
            self.set_devices()
        args, cfg, dev = self.args, vars(self.args), self.device
        seed_everything(args.random_seed + self.dist.rank)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = False

        model = self.result["model"].to(dev)
        indices = self.choose_subset()
        train_set = self.build_train_set(indices)
        self.setup_training(model)
        history: List[dict] = []
        start = 1
        ckpt_path = os.path.join(args.checkpoint_save, "last.pt")
        if args.resume and os.path.isfile(ckpt_path):
            start, history = self._load_checkpoint(ckpt_path, model, indices)
        elif args.resume:
            logger.warning("--resume: no checkpoint at %s yet; starting from epoch 1", ckpt_path)
        elif os.path.isfile(ckpt_path) and self.dist.is_main:
            logger.warning("checkpoint %s from an earlier run will be overwritten (starting from epoch 1; pass "
                           "--resume to continue that run instead)", ckpt_path)
        if self.dist.is_main:
            from ftsam_plugin.io import atomic_write_text

            atomic_write_text(os.path.join(args.log, "index.txt"), "".join(f"{i}\n" for i in indices))
            logger.info("clean subset: %d samples (%s); %d epochs from epoch %d", len(indices),
                        f"--index {args.index}" if args.index else f"ratio {args.ratio}, class-balanced",
                        args.epochs, start)
        if self.dist.is_distributed:
            ids = [dev.index] if dev.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        csv_path = os.path.join(args.save_path, f"{self.name}_df.csv")
        epochs = range(start, args.epochs + 1)
        bar = _tqdm(epochs, desc=self.name, disable=not self.dist.is_main)
        self._last_checkpoint = start - 1
        with _StopOnSigint() as self._stop:
            try:
                self._train_epochs(model, train_set, bar, indices, history, ckpt_path, csv_path)
            finally:
                bar.close()  # before any error message is printed
        ddp.broadcast_buffers(model, self.dist)  # BN stats of the last (no_sync) pass are rank-local: take rank 0's
        if self.dist.is_main:
            write_metrics_summary_csv(os.path.join(args.save_path, f"{self.name}_df_summary.csv"), history)
            out = save_defense_result(self.result["model_name"], self.result["num_classes"], ddp.unwrap(model),
                                      args.save_path)
            logger.info("saved %s", out)
        ddp.barrier(self.dist)
        self.history = history
        return {"model": ddp.unwrap(model)}

    def _train_epochs(self, model, train_set, bar, indices, history, ckpt_path, csv_path) -> None:
        from ftsam_plugin.data.records import write_metrics_csv

        args = self.args
        for epoch in bar:
            _test_pause(epoch, 0, self._stop)
            lr_used = self.optimizer.param_groups[0]["lr"]  # per-batch stepping: the epoch's first step's lr
            loss, acc = self.train_epoch(model, train_set, epoch)
            self._check_weights(model, epoch)
            if self.scheduler is not None and not self.step_per_batch:
                self.scheduler.step(loss) if self.plateau else self.scheduler.step()
            row = dict.fromkeys(CSV_COLUMNS)
            row.update(epoch=epoch, train_epoch_loss_avg_over_batch=loss, train_acc=acc, lr=lr_used)
            row.update(self.extra_metrics())
            if self.dist.is_main and (epoch % args.eval_every == 0 or epoch == args.epochs):
                row.update(self.evaluate(ddp.unwrap(model)))
            history.append(row)
            rngs = ddp.all_gather_objects(rng_state(), self.dist)  # every rank's RNG state (a collective)
            if self.dist.is_main:
                logger.info("epoch %d: %s", epoch, {k: v for k, v in row.items() if v is not None})
                write_metrics_csv(csv_path, history)
                self._plot(history)
                self._save_checkpoint(ckpt_path, epoch, model, indices, history, rngs=rngs)
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("test_acc", "test_asr", "test_ra")
                                 if row[k] is not None})
            ddp.barrier(self.dist)
            self._last_checkpoint = epoch
            self._after_epoch(epoch)
            # a SIGINT (on any rank) during this epoch: stop now that its checkpoint and CSV row are written
            # (after the last epoch there is nothing left to save: the run finishes normally)
            if epoch < args.epochs and self._stop_requested():
                raise Interrupted(f"stopped after epoch {epoch} of {args.epochs}; its checkpoint is {ckpt_path}; "
                                  f"continue with the same command plus --resume")

    def _stop_requested(self) -> bool:
        """Whether a SIGINT arrived on any rank."""
        flag = torch.tensor([1.0 if self._stop.requested else 0.0])
        return ddp.all_reduce_sum(flag, self.dist).item() > 0

    def _check_weights(self, model, epoch: int) -> None:
        """Refuse to checkpoint non-finite weights (the loss of the last step is computed before its update)."""
        params = [p.detach() for p in model.parameters()]
        bad = torch.tensor([0.0 if all(bool(torch.isfinite(p).all()) for p in params) else 1.0])
        if ddp.all_reduce_sum(bad, self.dist).item() > 0:
            raise FtsamError(f"non-finite weights at epoch {epoch} step {self._last_step} (its last); stopped, "
                             f"{self._kept_checkpoint()}; lower --lr or --rho (or --amp false) and rerun without "
                             f"--resume")

    def _kept_checkpoint(self) -> str:
        done = getattr(self, "_last_checkpoint", 0)
        if done >= 1:
            return f"the last good checkpoint (epoch {done}) is kept in {self.args.checkpoint_save}"
        return "no checkpoint was written (no good epoch yet)"

    def setup_training(self, model: torch.nn.Module) -> None:
        """Loss, AMP (dtype, GradScaler for fp16), optimizer and lr scheduler for `model` (maybe DDP-wrapped)."""
        args = self.args
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp_dtype] if args.amp else None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        smoothing = float(args.label_smoothing)
        self.loss_fn = lambda logits, y: smooth_crossentropy(logits, y, smoothing)
        self.optimizer = self.create_optimizer(model)
        # backdoorbench protocol: ft-sam stepped its scheduler per batch, ft (PureCleanModelTrainer) per epoch
        per_batch = args.protocol == "backdoorbench" and self.uses_sam
        by_name = {name.lower(): make for name, make in SCHEDULERS.items()}
        make = by_name[str(args.lr_scheduler or "none").lower()]  # checked by config.validate
        # schedule the base optimizer (SAM shares its param_groups; SAM.step itself is never called)
        target = getattr(self.optimizer, "base_optimizer", self.optimizer)
        self.scheduler = make(target, vars(args)) if make else None
        self.plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.step_per_batch = per_batch and not self.plateau

    # ------------------------------------------------------------------ hooks FT-SAM overrides
    def create_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The base optimizer (SGD by default) over the trainable parameters."""
        cls, kwargs = self._base_optimizer()
        return cls([p for p in model.parameters() if p.requires_grad], **kwargs)

    def train_step(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
        """One plain step: forward, (scaled) backward, optimizer step. Returns (loss, logits), both detached."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        with self.autocast():
            logits = model(x)
            loss = self.loss_fn(logits, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss.detach(), logits.detach()

    def extra_metrics(self) -> dict:
        """Extra per-epoch CSV columns (FT-SAM adds rho)."""
        return {}

    def _after_epoch(self, epoch: int) -> None:
        """Called after each epoch's checkpoint is written (tests interrupt runs here)."""

    # ------------------------------------------------------------------ pieces
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _base_optimizer(self):
        return BASE_OPTIMIZERS[str(self.args.client_optimizer).lower()](vars(self.args))  # checked by validate

    def choose_subset(self) -> List[int]:
        """Indices of the clean training samples to fine-tune on (--index file, else class-balanced --ratio)."""
        raw = _raw(self.result["clean_train"])
        if self.args.index:
            return read_index_file(self.args.index, len(raw))
        return class_balanced_subset(_labels(raw), int(self.result["num_classes"]), self.args.ratio,
                                     self.args.random_seed, self.args.protocol)

    def build_train_set(self, indices: Sequence[int]):
        """The subset with the dataset's train transform, yielding (image tensor, label)."""
        from ftsam_plugin.data.backdoor import TransformDataset
        from ftsam_plugin.data.transforms import get_transform

        raw = _raw(self.result["clean_train"])
        transform = get_transform(self.result["clean_data"], train=True, img_size=self.result.get("img_size"))
        return TransformDataset(Subset(raw, list(indices)), transform)

    def _loader(self, train_set, epoch: int) -> DataLoader:
        args, info = self.args, self.dist
        gen = torch.Generator()
        gen.manual_seed(args.random_seed + epoch)  # same order on resume, whatever ran before
        batch = args.batch_size
        sampler = None
        if info.is_distributed:
            batch = max(1, args.batch_size // info.world_size)
            sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                                                          shuffle=True, seed=args.random_seed)
            sampler.set_epoch(epoch)
        return DataLoader(train_set, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                          num_workers=args.num_workers, generator=gen, drop_last=False,
                          worker_init_fn=_ignore_sigint if args.num_workers > 0 else None,
                          pin_memory=bool(args.pin_memory) and self.device.type == "cuda",
                          persistent_workers=False)

    def train_epoch(self, model, train_set, epoch: int):
        """One pass over the subset; returns (mean of the batch losses, train accuracy) over all ranks' batches."""
        args, dev = self.args, self.device
        loader = self._loader(train_set, epoch)
        model.train()
        totals = torch.zeros(4, dtype=torch.float64)  # sum of batch losses, correct, n, batches
        nb = bool(args.non_blocking)
        steps = _tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not self.dist.is_main)
        try:
            for step, batch in enumerate(steps, start=1):
                x = batch[0].to(dev, non_blocking=nb)
                y = torch.as_tensor(batch[1]).to(dev, non_blocking=nb).long()
                loss, logits = self.train_step(model, x, y)
                value = float(loss)
                stop = getattr(self, "_stop", None)
                _test_pause(epoch, step, stop)
                # a collective, so every rank stops at the same step (SIGINT is checked once the epoch is done)
                flags = torch.tensor([0.0 if math.isfinite(value) else 1.0])
                ddp.all_reduce_sum(flags, self.dist)
                if flags[0].item() > 0:
                    raise FtsamError(f"non-finite loss at epoch {epoch} step {step}; stopped, "
                                     f"{self._kept_checkpoint()}; lower --lr or --rho (or --amp false) and rerun "
                                     f"without --resume")
                self._last_step = step
                n = y.numel()
                totals += torch.tensor([value, float((logits.argmax(1) == y).sum()), n, 1.0], dtype=torch.float64)
                if self.step_per_batch:
                    self.scheduler.step()
                if step % 10 == 0 or step == len(loader):
                    steps.set_postfix(loss=f"{value:.4f}")
        finally:
            steps.close()
        ddp.all_reduce_sum(totals, self.dist)
        return float(totals[0] / totals[3]), float(totals[1] / totals[2])

    def evaluate(self, model) -> dict:
        """ACC on the clean test set; ASR (backdoor labels) and RA (original labels) on the backdoor test set."""
        from ftsam_plugin.metrics import evaluate_backdoor

        m = evaluate_backdoor(model, self.result["clean_test"], self.result["bd_test"], device=self.device,
                              batch_size=self.args.batch_size, amp_dtype=self.amp_dtype,
                              num_workers=self.args.num_workers, with_loss=True)
        # the losses as BackdoorBench's trainer logs them: plain cross-entropy, mean over batches (bd: vs bd labels)
        return {"clean_test_loss_avg_over_batch": float(m["clean_loss"]),
                "bd_test_loss_avg_over_batch": float(m["bd_loss"]),
                "test_acc": float(m["acc"]), "test_asr": float(m["asr"]), "test_ra": float(m["ra"])}

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, path, epoch, model, indices, history, rngs=None) -> None:
        """Write `last.pt`. `rngs`: every rank's `rng_state()` in rank order (default: this process's only);
        resume restores each rank's own state (a fresh run seeds rank r with random_seed + r)."""
        from ftsam_plugin.data.records import cpu_state_dict
        from ftsam_plugin.io import atomic_save

        state = {
            "format": CHECKPOINT_FORMAT, "version": 1, "defense": self.name, "epoch": int(epoch),
            "model": cpu_state_dict(ddp.unwrap(model)),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),  # rank 0's (what single-process checkpoints always had)
            "rng_ranks": rngs if rngs is not None else [rng_state()],
            "subset": torch.tensor(list(indices), dtype=torch.int64),
            "history": plain(history),
            "config": self._resume_config(),
        }
        atomic_save(state, path)

    def _resume_config(self) -> dict:
        """The RESUME_KEYS settings as stored in (and compared with) a checkpoint."""
        cfg = dict(vars(self.args))
        if not cfg.get("amp"):
            cfg["amp_dtype"] = None  # unused without AMP
        if not self.uses_sam:
            for key in ("rho", "adaptive", "eta", "alpha", "restore"):  # unused by the baseline
                cfg[key] = None
        return plain({k: cfg.get(k) for k in RESUME_KEYS})

    def _load_checkpoint(self, path, model, indices):
        from ftsam_plugin.io import safe_load

        if not os.path.isfile(path):
            raise FtsamError(f"no checkpoint at {path} to resume from; run without --resume")
        state = safe_load(path, what="defense checkpoint")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise FtsamError(f"{path} is not a {self.name} checkpoint; delete it or run without --resume")
        if state.get("defense") != self.name:
            raise FtsamError(f"{path} was written by '{state.get('defense')}', not '{self.name}'; run without --resume")
        now = self._resume_config()
        try:
            for key, old in state["config"].items():
                if now.get(key) != old:
                    raise FtsamError(f"checkpoint {path} was made with {key}={old!r}, now {now.get(key)!r}; "
                                     f"use the same settings or run without --resume")
            if state["subset"].tolist() != list(indices):
                raise FtsamError(f"checkpoint {path} used another clean subset; use the same data or run without "
                                 f"--resume")
            epoch = int(state["epoch"])
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state["scheduler"] is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            rngs = state.get("rng_ranks") or [state["rng"]]
            if len(rngs) != self.dist.world_size:
                raise FtsamError(f"checkpoint {path} was made by {len(rngs)} process(es), now "
                                 f"{self.dist.world_size}; resume with the same number of processes or run "
                                 f"without --resume")
            set_rng_state(rngs[self.dist.rank])  # each rank continues its own random stream
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise FtsamError(f"checkpoint {path} does not fit this model or run ({detail}); delete it or run without "
                             f"--resume") from None
        logger.info("resumed from %s after epoch %d", path, epoch)
        return epoch + 1, list(state["history"])

    # ------------------------------------------------------------------ outputs
    def _plot(self, history) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from ftsam_plugin.io import atomic_write_bytes

        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        drawn = False
        for key, label in (("test_acc", "ACC"), ("test_asr", "ASR"), ("test_ra", "RA")):
            pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
                drawn = True
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{self.name}: ACC / ASR / RA")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(os.path.join(self.args.save_path, "acc_like_metric_plots.png"), buf.getvalue())

    # ------------------------------------------------------------------ helpers
    def _data_path(self) -> Optional[str]:
        path = self.cli_dataset_path
        if path is None:
            return None
        sub = os.path.join(path, str(self.args.dataset)) if self.args.dataset else None
        return sub if sub and os.path.isdir(sub) else path

    def _adopt_record(self) -> None:
        """The record decides dataset and model; warn where the config said otherwise."""
        args, res = self.args, self.result
        for key, value in (("dataset", res["clean_data"]), ("model", res["model_name"])):
            mine = getattr(args, key, None)
            if mine is not None and str(mine).lower() != str(value).lower():
                logger.warning("config says %s=%s but the record was made with %s; using %s", key, mine, value, value)
            setattr(args, key, value)
        args.num_classes = int(res["num_classes"])
        args.img_size = tuple(int(v) for v in res["img_size"])

    def _close_logger(self) -> None:
        pkg_logger = logging.getLogger("ftsam_plugin")
        for handler in self._handlers:
            pkg_logger.removeHandler(handler)
            handler.close()
        self._handlers = []


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT after an epoch's checkpoint; the message names it and `--resume` (exit code 130)."""


class _StopOnSigint:
    """While active, the first SIGINT only sets `requested`: the run finishes the current epoch (training, its
    evaluation if due, CSV row, checkpoint) and then stops; a second SIGINT interrupts at once (the last written
    checkpoint stays). A no-op outside the main thread; only the process that installed it prints (forked
    DataLoader workers inherit the handler)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if os.getpid() == self._pid:
            logger.warning("SIGINT: stopping after this epoch's checkpoint (press Ctrl-C again to abort at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _test_pause(epoch: int, step: int, stop) -> None:
    """TEST-ONLY hook: with FTSAM_TEST_PAUSE="EPOCH:STEP:MARKER", the run creates the file MARKER and waits (until
    killed, or until a SIGINT makes it stop) after step STEP of epoch EPOCH (STEP 0: at the epoch's start, after
    the previous epoch's checkpoint). Lets tests kill a run at an exact point; not meant for users."""
    spec = os.environ.get("FTSAM_TEST_PAUSE")
    if not spec:
        return
    want_epoch, want_step, marker = spec.split(":", 2)
    if (int(want_epoch), int(want_step)) != (epoch, step):
        return
    with open(marker, "w"):
        pass
    while not (stop is not None and stop.requested):
        time.sleep(0.02)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C goes to the whole process group; only the main process handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _tqdm(iterable, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kw)


def _raw(dataset):
    """The raw (PIL, label) dataset under a transform wrapper."""
    return getattr(dataset, "wrapped_dataset", dataset) if hasattr(dataset, "wrap_img_transform") else dataset


def _resolve_record(result_file) -> str:
    """A record folder: `result_file` itself if it holds attack_result.pt, else ./record/<result_file>."""
    if result_file is None:
        raise FtsamError("no record given; pass --result_file <name under ./record/ or a record folder>")
    text = str(result_file)
    if text.endswith("attack_result.pt") and os.path.isfile(text):
        return os.path.dirname(os.path.abspath(text)) or "."
    candidates = [text] if os.path.isabs(text) else [text, os.path.join("record", text)]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "attack_result.pt")):
            return os.path.normpath(candidate)
    folders = [c for c in candidates if os.path.isdir(c)]
    if folders:
        raise FtsamError(f"no attack_result.pt in record folder '{folders[0]}' (did the attack finish?); pass the "
                         f"folder of a finished attack, or re-create it with `ftsam attack`")
    raise FtsamError(f"no attack_result.pt: record folder {' or '.join(repr(c) for c in candidates)} does not exist; "
                     f"pass --result_file <record name under ./record/ or a record folder> (make one with "
                     f"`ftsam attack`)")


def _make_output_folder(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise FtsamError(f"cannot create output folder {folder}: {reason}; free that path or fix its permissions"
                         ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FtsamError(f"output folder {folder} is not writable; fix its permissions")


def _peek_record_dataset(result_file) -> Optional[str]:
    """The dataset a record was made on (for choosing the packaged YAML), without loading its data."""
    from ftsam_plugin.io import safe_load

    raw = safe_load(os.path.join(_resolve_record(result_file), "attack_result.pt"), what="attack result")
    return raw.get("clean_data") if isinstance(raw, dict) else None
