"""Vanilla fine-tuning on a clean subset: the pipeline FT-SAM shares (BackdoorBench's defense interface).

`FineTune` runs the pipeline (config, record, subset, loaders, schedule, evaluation, checkpoints, outputs) and asks
the protocol's recipe (`protocols.py`) for every choice that differs between protocols; `FTSAM` (in `ftsam.py`)
overrides only `create_optimizer` and `train_step`, so the two differ only in the optimizer. The pieces live by
concern: losses.py, subsets.py, factories.py (optimizers, schedulers), checkpoint.py, plotting.py, signals.py,
locations.py (record and output folders).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from pprint import pformat
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.lock import FolderLocks
from ftsam_plugin.logfile import LogFile
from ftsam_plugin.purify import RunClock, time_to_purify
from ftsam_plugin.settings import quote, seed_everything

from . import ddp
from .checkpoint import (drop_checkpoint, finished_without_checkpoint, load_checkpoint, resume_config, rng_state,
                         save_checkpoint, unfinished_run)
from .config import add_arguments as _add_arguments
from .config import load_yaml, merge_config, validate
from .factories import base_optimizer, create_scheduler
from .locations import make_output_folder, peek_record_dataset, resolve_record
from .losses import create_loss, smooth_crossentropy
from .plotting import plot_acc_like_metrics
from .protocols import get_recipe
from .signals import Interrupted, StopOnSigint, ignore_sigint, test_pause
from .subsets import SUBSET_DRAWS, class_balanced_subset, fixed_eval_subsets, raw_dataset, read_index_file

# smooth_crossentropy, class_balanced_subset, read_index_file, Interrupted: re-exported for existing importers
__all__ = ["FineTune", "Interrupted", "smooth_crossentropy", "class_balanced_subset", "read_index_file"]

logger = logging.getLogger("ftsam_plugin.defense")

_StopOnSigint = StopOnSigint  # the name it had here before signals.py
CSV_COLUMNS = ("epoch", "train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
               "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra", "lr")
SUBSET_COLUMNS = ("subset_test_acc", "subset_test_asr", "subset_test_ra")  # --eval_subset's evaluations


class FineTune:
    """Vanilla fine-tuning of a backdoored model on a clean subset (BackdoorBench interface).

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

    @classmethod
    def launch(cls, args: argparse.Namespace) -> int:
        """`cls(args).defense(...)` as BackdoorBench's patched launchers (defense/plugin.py, defense/ftsam.py) run
        it, with `ftsam defend`'s error contract: one `error:` line and exit 2, the traceback with `args.debug`.
        Returns the exit status."""
        from ftsam_plugin.cli import run_reporting_errors

        def run(ns: argparse.Namespace) -> int:
            opts = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k != "debug"})
            cls(opts).defense(opts.result_file)
            return 0

        return run_reporting_errors(run, args)

    def __init__(self, args: argparse.Namespace):
        cli = dict(vars(args))
        dataset = cli.get("dataset")
        # the record decides the dataset (as `_adopt_record` does later): the protocol's per-dataset values (epochs,
        # scheduler) follow it even when the YAML names none (`--yaml_path cpu`) or another one
        recorded = _record_dataset(cli["result_file"], needed=cli.get("yaml_path") is None and dataset is None) \
            if cli.get("result_file") else None
        yaml_cfg = load_yaml(cli.get("yaml_path"), dataset or recorded, self.config_folder)
        cfg = merge_config(yaml_cfg, cli)
        if recorded is not None:
            _warn_record_differs("dataset", cfg.get("dataset"), recorded)
            cfg["dataset"] = recorded
        elif cfg.get("dataset") is None:
            cfg["dataset"] = dataset
        cfg = validate(cfg, self.uses_sam, given={k for k, v in cli.items() if v is not None})
        cfg["terminal_info"] = list(sys.argv)
        self.cli_dataset_path = cli.get("dataset_path")  # BackdoorBench ignores the YAML's dataset_path too
        self.args = argparse.Namespace(**cfg)
        self.recipe = get_recipe(self.args.protocol, self.uses_sam)  # the protocol, chosen once
        self.result = None
        self._eval_subsets = None  # --eval_subset's (clean, poisoned) test indices, chosen at the first use
        self._record_dir = None
        self._lock: Optional[FolderLocks] = None  # of every output folder: one writer per folder
        self._started = time.time()
        self._image_digests: Dict[str, str] = {}  # of the clean subset's files, from the pre-flight image check
        self._data: Optional[dict] = None  # the fingerprint of the data this run trains on (checked on --resume)
        self._handlers: List[logging.Handler] = []
        self._start_from: Optional[str] = None  # --checkpoint_path: the defense_result.pt the run starts from
        self._start_model: Optional[torch.nn.Module] = None
        self.unlearner = None  # --unlearn's (setup_training); None in --rho auto's probes, which run before it
        self.dist = ddp.DistInfo()
        ddp.resolve_device(self.args.device, int(os.environ.get("LOCAL_RANK", "0")))  # fail before loading data
        if self.args.result_file is not None:
            self.set_result(self.args.result_file)

    # ------------------------------------------------------------------ BackdoorBench interface
    def set_result(self, result_file: str) -> None:
        """Find the record (a name under ./record/ or a record folder), set save_path/checkpoint/log, load it."""
        record_dir = resolve_record(result_file)
        args = self.args
        args.result_file = result_file
        save_path = os.path.join(record_dir, "defense", self.name) + os.sep
        if getattr(args, "save_path", None) != save_path or args.checkpoint_save is None:
            args.save_path = save_path
            args.checkpoint_save = args.checkpoint_save or os.path.join(save_path, "checkpoint") + os.sep
            args.log = args.log or os.path.join(save_path, "log") + os.sep
        locks = FolderLocks({args.save_path: "defense folder", args.checkpoint_save: "checkpoint folder",
                             args.log: "log folder"})  # flags may put the last two anywhere, even in another run's
        if self._lock is None or self._lock.folders != locks.folders:
            self._lock = locks
        if _holds_output_lock():
            self._lock.check()  # another run writing to any of them: fail at once, before loading anything
        if self.result is None or self._record_dir != record_dir:  # BackdoorBench loads it twice; once is enough
            from ftsam_plugin.data.image_check import check_record_images
            from ftsam_plugin.data.records import load_attack_result

            self.result = load_attack_result(record_dir, dataset_path=self._data_path())
            self._record_dir = record_dir
            self._adopt_record()
            self._load_start_model()  # --checkpoint_path: a bad file fails here, before anything is written
            subset = self.choose_subset()  # an impossible subset fails here, before anything is written
            self._image_digests = check_record_images(self.result, subset)  # so does an unreadable image
            self._keep_unfinished_checkpoint()
        for folder in (args.save_path, args.checkpoint_save, args.log):  # only once the inputs are known good
            make_output_folder(folder)

    def _keep_unfinished_checkpoint(self) -> None:
        """A run without --resume would overwrite a checkpoint that holds an unfinished run: refuse unless --force.
        A --resume of a finished run (its checkpoint removed) has nothing to resume: refused too."""
        args = self.args
        path = os.path.join(args.checkpoint_save, "last.pt")
        if args.resume and _holds_output_lock() and finished_without_checkpoint(path, args.save_path,
                                                                                 self._result_files()):
            raise FtsamError(f"--resume: {args.save_path} holds a finished run, whose checkpoint was removed when it "
                             f"finished (--keep_checkpoint true keeps it); nothing to resume: run without --resume "
                             f"to run it again")
        if args.resume or getattr(args, "force", None) or not _holds_output_lock():
            return
        unfinished = unfinished_run(path)
        if unfinished is not None:
            raise FtsamError(f"checkpoint {path} holds an unfinished run ({unfinished}); continue it with --resume, or "
                             f"pass --force to start over (the checkpoint is then overwritten)")

    def set_logger(self) -> None:
        """Log to `<log>/<YYYY_mm_dd_HH_MM_SS>.log` and the console (handlers removed when `defense` ends)."""
        removed = self._claim_output()
        self._close_logger()
        pkg_logger = logging.getLogger("ftsam_plugin")
        pkg_logger.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s [%(levelname)-8s] [%(filename)s:%(lineno)d] %(message)s",
                                datefmt="%Y-%m-%d:%H:%M:%S")
        handlers: List[logging.Handler] = [logging.StreamHandler()]
        if self.dist.is_main:
            stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.localtime())
            path = os.path.join(self.args.log, f"{stamp}.log")
            handlers.append(LogFile(path, fix="fix the folder's permissions or pass --log elsewhere"))
        for handler in handlers:
            handler.setFormatter(fmt)
            pkg_logger.addHandler(handler)
        self._handlers = handlers
        if _root_prints_to_console():  # e.g. logging's default handler, which BackdoorBench's loader's first
            pkg_logger.propagate = False  # root-logger call installs: print each line once (ours), not twice
            self._stopped_propagation = True
        logger.info("%s defense, config:\n%s", self.name, pformat(vars(self.args)))
        for path in removed:
            logger.info("removed %s, a temp file left by a killed run", path)
        overrides = getattr(self.args, "protocol_overrides", None)
        if overrides:
            logger.info("protocol %s: using %s (the config said %s; pass the flag to choose)", self.args.protocol,
                        ", ".join(f"{k}={v[1]}" for k, v in overrides.items()),
                        ", ".join(f"{k}={v[0]}" for k, v in overrides.items()))
        for note in getattr(self.args, "protocol_notes", None) or ():
            logger.warning("protocol %s: %s", self.args.protocol, note)
        if self._start_from is not None:
            logger.info("starting from the defense result %s (--checkpoint_path), not the attack's model",
                        self._start_from)

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
            self._release_output()

    # ------------------------------------------------------------------ pipeline
    def mitigation(self) -> Dict[str, torch.nn.Module]:
        """Fine-tune on the clean subset with per-epoch evaluation and checkpoints; save defense_result.pt (holding
        the defense folder's lock meanwhile)."""
        if self.result is None:
            raise FtsamError("no attack record loaded; pass --result_file")
        if not hasattr(self, "device"):
            self.set_devices()
        self._claim_output()
        try:
            return self._mitigate()
        finally:
            self._release_output()

    def _mitigate(self) -> Dict[str, torch.nn.Module]:
        """`mitigation`'s body, run while the defense folder is held."""
        from ftsam_plugin.data.completion import mark_complete, mark_running
        from ftsam_plugin.data.identity import data_identity, weights_digest
        from ftsam_plugin.data.records import save_defense_result, write_metrics_summary_csv

        args, dev = self.args, self.device
        seed_everything(args.random_seed + self.dist.rank)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = False

        model = (self._start_model if self._start_model is not None else self.result["model"]).to(dev)
        indices = self.choose_subset()
        self._data = data_identity(self.result, indices, self._image_digests, model=weights_digest(model))
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
        scan_seconds = 0.0  # training work before the first epoch: --unlearn's scan
        if self.unlearner is not None and self.unlearner.delta is None:  # a resumed run keeps its own UAP
            scan_started = time.perf_counter()
            self.unlearner.scan(model, *self._scan_pool(indices))
            # every rank takes rank 0's suspect and UAP (a GPU's scan need not be bit-identical across ranks)
            self.unlearner.load_state_dict(ddp.all_gather_objects(self.unlearner.state_dict(), self.dist)[0])
            scan_seconds = time.perf_counter() - scan_started
        if self.dist.is_main:
            from ftsam_plugin.io import atomic_write_text

            atomic_write_text(os.path.join(args.log, "index.txt"), "".join(f"{i}\n" for i in indices))
            logger.info("clean subset: %d samples (%s); %d epochs from epoch %d", len(indices),
                        f"--index {args.index}" if args.index else f"ratio {args.ratio}, {self.recipe.subset} draw",
                        args.epochs, start)
        if self.dist.is_distributed:
            ids = [dev.index] if dev.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        csv_path = os.path.join(args.save_path, f"{self.name}_df.csv")
        epochs = range(start, args.epochs + 1)
        bar = _tqdm(epochs, desc=self.name, disable=not self.dist.is_main)
        self._last_checkpoint = start - 1
        if self.dist.is_main:
            mark_running(args.save_path)  # from its first write there to its last, the folder is not a finished run
        with StopOnSigint() as self._stop:
            try:
                self._train_epochs(model, train_set, bar, indices, history, ckpt_path, csv_path, scan_seconds)
            finally:
                bar.close()  # before any error message is printed
        ddp.broadcast_buffers(model, self.dist)  # BN stats of the last (no_sync) pass are rank-local: take rank 0's
        if self.dist.is_main:  # the result, its summary, then the marker saying both belong to this finished run
            purify = time_to_purify(history)
            logger.info("%s", purify.describe())
            out = save_defense_result(self.result["model_name"], self.result["num_classes"], ddp.unwrap(model),
                                      args.save_path)
            summary = self._result_files()[1]
            write_metrics_summary_csv(os.path.join(args.save_path, summary), history,
                                      extra={**purify.summary_columns(), "protocol": args.protocol})
            mark_complete(args.save_path, [os.path.basename(out), summary, os.path.basename(csv_path)])
            logger.info("saved %s", out)
            if not args.keep_checkpoint and drop_checkpoint(ckpt_path):  # only an unfinished run needs it
                logger.info("removed the checkpoint %s: the run finished (--keep_checkpoint true keeps it)", ckpt_path)
        ddp.barrier(self.dist)
        self.history = history
        return {"model": ddp.unwrap(model)}

    def _train_epochs(self, model, train_set, bar, indices, history, ckpt_path, csv_path,
                      scan_seconds: float = 0.0) -> None:
        from ftsam_plugin.data.records import write_metrics_csv

        args = self.args
        clock = RunClock(history)  # the time columns, continued from a resumed run's history
        clock.add(scan_seconds)  # the scan is training work: in the totals from epoch 1 on
        for epoch in bar:
            test_pause(epoch, 0, self._stop)
            lr_used = self.optimizer.param_groups[0]["lr"]  # per-batch stepping: the epoch's first step's lr
            first_step = self.epoch_start_metrics()  # likewise (FT-SAM's rho)
            started = time.perf_counter()
            loss, acc = self.train_epoch(model, train_set, epoch)
            train_seconds = time.perf_counter() - started
            self._check_weights(model, epoch)
            self.end_epoch_schedule(loss)
            row = dict.fromkeys(CSV_COLUMNS)
            row.update(epoch=epoch, train_epoch_loss_avg_over_batch=loss, train_acc=acc, lr=lr_used)
            row.update(first_step)
            row.update(self.extra_metrics())
            if self.unlearner is not None:
                row.update(self.unlearner.epoch_metrics())
            measured = {}
            if self.dist.is_main and (epoch % args.eval_every == 0 or epoch == args.epochs):
                measured = self.evaluate(ddp.unwrap(model), whole=epoch == args.epochs)
            subset = {k: measured.pop(k) for k in SUBSET_COLUMNS if k in measured}
            row.update(measured)
            row.update(clock.columns(train_seconds))  # after these: the existing columns keep their order
            row.update(subset)
            history.append(row)
            rngs = ddp.all_gather_objects(rng_state(), self.dist)  # every rank's RNG state (a collective)
            if self.dist.is_main:
                logger.info("epoch %d: %s", epoch, {k: v for k, v in row.items() if v is not None})
                write_metrics_csv(csv_path, history)
                plot_acc_like_metrics(history, f"{self.name}: ACC / ASR / RA",
                                      os.path.join(args.save_path, "acc_like_metric_plots.png"))
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
                                  f"continue with the same command plus --resume", self._stop.signum)

    def end_epoch_schedule(self, train_loss: float) -> None:
        """The lr scheduler's once-per-epoch step (ReduceLROnPlateau: with the epoch's train loss), unless the
        protocol steps it per batch."""
        if self.scheduler is not None and not self.step_per_batch:
            self.scheduler.step(train_loss) if self.plateau else self.scheduler.step()
            self.lr_changed()

    def lr_changed(self) -> None:
        """Called after every lr scheduler step and once the optimizer is built (FT-SAM moves rho with the lr)."""

    def _stop_requested(self) -> bool:
        """Whether a SIGINT or SIGTERM arrived on any rank."""
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
        self.loss_fn = create_loss(self.recipe.loss, float(args.label_smoothing))
        self.optimizer = self.create_optimizer(model)
        # schedule the base optimizer (SAM shares its param_groups; SAM.step itself is never called)
        target = getattr(self.optimizer, "base_optimizer", self.optimizer)
        self.scheduler = create_scheduler(target, vars(args), self.recipe)
        self.plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.step_per_batch = self.recipe.step_per_batch and not self.plateau
        self.lr_changed()
        self.unlearner = self._create_unlearner()

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

    def epoch_start_metrics(self) -> dict:
        """Extra per-epoch CSV columns read before the epoch's first step, as `lr` (FT-SAM adds rho)."""
        return {}

    def extra_metrics(self) -> dict:
        """Extra per-epoch CSV columns read after the epoch (FT-SAM adds sam_steps)."""
        return {}

    def _after_epoch(self, epoch: int) -> None:
        """Called after each epoch's checkpoint is written (tests interrupt runs here)."""

    # ------------------------------------------------------------------ pieces
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _base_optimizer(self):
        return base_optimizer(vars(self.args))

    def choose_subset(self) -> List[int]:
        """Indices of the clean training samples to fine-tune on (--index file, else the protocol's --ratio draw)."""
        raw = raw_dataset(self.result["clean_train"])
        if self.args.index:
            return read_index_file(self.args.index, len(raw))
        draw = SUBSET_DRAWS[self.recipe.subset]
        return draw(raw, int(self.result["num_classes"]), self.args.ratio, self.args.random_seed)

    def _create_unlearner(self):
        """--unlearn's unlearner (unlearn.py), or None."""
        from ftsam_plugin.data.datasets import get_dataset_info

        from .unlearn import create_unlearner

        args = self.args
        if args.unlearn == "none":
            return None
        info = get_dataset_info(self.result["clean_data"])
        return create_unlearner(args.unlearn, eps=float(args.unlearn_eps), frac=float(args.unlearn_frac),
                                num_classes=int(self.result["num_classes"]), mean=info.mean, std=info.std,
                                seed=int(args.random_seed))

    def _scan_pool(self, indices: Sequence[int]):
        """The unlearner's scan images: the clean subset's first SCAN_IMAGES, with the test transform, on device."""
        from ftsam_plugin.data.transforms import get_transform

        from .unlearn import SCAN_IMAGES

        raw = raw_dataset(self.result["clean_train"])
        transform = get_transform(self.result["clean_data"], train=False, img_size=self.result.get("img_size"))
        items = [raw[i] for i in list(indices)[:SCAN_IMAGES]]
        images = torch.stack([transform(img) for img, _ in items]).to(self.device)
        return images, torch.tensor([int(label) for _, label in items], device=self.device)

    def build_train_set(self, indices: Sequence[int]):
        """The subset with the dataset's train transform, yielding (image tensor, label)."""
        from ftsam_plugin.data.backdoor import TransformDataset
        from ftsam_plugin.data.transforms import get_transform

        raw = raw_dataset(self.result["clean_train"])
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
                          worker_init_fn=ignore_sigint if args.num_workers > 0 else None,
                          pin_memory=bool(args.pin_memory) and self.device.type == "cuda",
                          persistent_workers=False)

    def train_epoch(self, model, train_set, epoch: int):
        """One pass over the subset; returns (train loss, train accuracy) over all ranks' batches. The loss is the
        mean over samples, or of the batch losses where the protocol's recipe says so (BackdoorBench's ft)."""
        args, dev = self.args, self.device
        loader = self._loader(train_set, epoch)
        model.train()
        totals = torch.zeros(5, dtype=torch.float64)  # sum of batch losses, correct, n, batches, sum of loss * n
        nb = bool(args.non_blocking)
        steps = _tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not self.dist.is_main)
        try:
            for step, batch in enumerate(steps, start=1):
                x = batch[0].to(dev, non_blocking=nb)
                y = torch.as_tensor(batch[1]).to(dev, non_blocking=nb).long()
                if self.unlearner is not None:  # --unlearn: the batch plus its images carrying the inverted trigger
                    x, y = self.unlearner.augment(model, x, y, self.dist)
                loss, logits = self.train_step(model, x, y)
                value = float(loss)
                stop = getattr(self, "_stop", None)
                test_pause(epoch, step, stop)
                # a collective, so every rank stops at the same step (SIGINT is checked once the epoch is done)
                flags = torch.tensor([0.0 if math.isfinite(value) else 1.0])
                ddp.all_reduce_sum(flags, self.dist)
                if flags[0].item() > 0:
                    raise FtsamError(f"non-finite loss at epoch {epoch} step {step}; stopped, "
                                     f"{self._kept_checkpoint()}; lower --lr or --rho (or --amp false) and rerun "
                                     f"without --resume")
                self._last_step = step
                n = y.numel()
                totals += torch.tensor([value, float((logits.argmax(1) == y).sum()), n, 1.0, value * n],
                                       dtype=torch.float64)
                if self.step_per_batch:
                    self.scheduler.step()
                    self.lr_changed()
                if step % 10 == 0 or step == len(loader):
                    steps.set_postfix(loss=f"{value:.4f}")
        finally:
            steps.close()
        ddp.all_reduce_sum(totals, self.dist)
        loss = totals[4] / totals[2] if self.recipe.train_loss_per_sample else totals[0] / totals[3]
        return float(loss), float(totals[1] / totals[2])

    def evaluate(self, model, whole: bool = True) -> dict:
        """ACC on the clean test set; ASR (backdoor labels) and RA (original labels) on the backdoor test set.
        Always in fp32 (as BackdoorBench evaluates), whatever --amp says for training. With --eval_subset N and
        `whole` false, ACC / ASR / RA on its fixed test subsets instead, under their own SUBSET_COLUMNS (so that
        BackdoorBench's test_* columns, their summary's valid_max and the time to purify hold whole-set values
        only)."""
        from ftsam_plugin.metrics import evaluate_backdoor

        clean, bd = self.result["clean_test"], self.result["bd_test"]
        subset = getattr(self.args, "eval_subset", None)
        on_subsets = subset is not None and not whole
        if on_subsets:
            if self._eval_subsets is None:
                self._eval_subsets = fixed_eval_subsets(clean, bd, int(subset))
            clean, bd = Subset(clean, self._eval_subsets[0]), Subset(bd, self._eval_subsets[1])
        m = evaluate_backdoor(model, clean, bd, device=self.device,
                              batch_size=self.args.batch_size, amp_dtype=None,
                              num_workers=self.args.num_workers, with_loss=not on_subsets)
        if on_subsets:
            return dict(zip(SUBSET_COLUMNS, (float(m["acc"]), float(m["asr"]), float(m["ra"]))))
        # the losses as BackdoorBench's trainer logs them: plain cross-entropy, mean over batches (bd: vs bd labels)
        return {"clean_test_loss_avg_over_batch": float(m["clean_loss"]),
                "bd_test_loss_avg_over_batch": float(m["bd_loss"]),
                "test_acc": float(m["acc"]), "test_asr": float(m["asr"]), "test_ra": float(m["ra"])}

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, path, epoch, model, indices, history, rngs=None) -> None:
        """Write `last.pt` (see checkpoint.save_checkpoint; `rngs`: every rank's RNG state in rank order)."""
        from ftsam_plugin.data.records import cpu_state_dict

        save_checkpoint(path, defense=self.name, epoch=epoch, model_state=cpu_state_dict(ddp.unwrap(model)),
                        optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, indices=indices,
                        history=history, config=self._resume_config(), rngs=rngs, data=self._data,
                        extra=self._extra_state())

    def _resume_config(self) -> dict:
        """The settings a checkpoint stores and a resumed run must share (checkpoint.RESUME_KEYS)."""
        return resume_config(vars(self.args), self.uses_sam)

    def _load_checkpoint(self, path, model, indices):
        return load_checkpoint(path, defense=self.name, model=model, optimizer=self.optimizer,
                               scheduler=self.scheduler, scaler=self.scaler, indices=indices,
                               config=self._resume_config(), world_size=self.dist.world_size, rank=self.dist.rank,
                               data=self._data, extra=self._extra_state())

    def _extra_state(self) -> dict:
        """What a checkpoint keeps besides the model and optimizer: the unlearner's UAP (--unlearn)."""
        return {"unlearn": self.unlearner} if self.unlearner is not None else {}

    # ------------------------------------------------------------------ helpers
    def _result_files(self) -> List[str]:
        """The files a finished run's completion marker lists: the result and its summary."""
        return ["defense_result.pt", f"{self.name}_df_summary.csv"]

    def _claim_output(self) -> List[str]:
        """Hold the locks of the defense, checkpoint and log folders for this run (the main process of a torchrun job
        only) and remove the temp files that killed runs left in them; returns what was removed."""
        if self._lock is None or self._lock.held or not _holds_output_lock():
            return []
        from ftsam_plugin.io import remove_stale_temp_files

        self._lock.acquire()
        args = self.args
        return [p for folder in dict.fromkeys((args.save_path, args.checkpoint_save, args.log))
                for p in remove_stale_temp_files(folder, before=self._started)]

    def _release_output(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _load_start_model(self) -> None:
        """--checkpoint_path: build the model of that defense result (BackdoorBench's ft-sam.py starts from
        `record/<checkpoint_path>/defense_result.pt`); the attack's model otherwise."""
        if not self.args.checkpoint_path:
            return
        from ftsam_plugin.data.records import load_defense_model
        from ftsam_plugin.io import safe_load

        from .locations import resolve_defense_result

        path = self._start_from = resolve_defense_result(self.args.checkpoint_path)
        raw = safe_load(path, what="defense result")
        if isinstance(raw, dict):
            mine = (raw.get("model_name"), raw.get("num_classes"))
            theirs = (self.result["model_name"], int(self.result["num_classes"]))
            if None not in mine and (str(mine[0]), int(mine[1])) != theirs:
                raise FtsamError(f"--checkpoint_path {path} holds a {mine[0]} with {mine[1]} classes, the record a "
                                 f"{theirs[0]} with {theirs[1]}; pass a defense result of this record")
        try:
            self._start_model = load_defense_model(path, self.result)
        except FtsamError as exc:
            raise FtsamError(f"--checkpoint_path {path}: {exc}") from None

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
            _warn_record_differs(key, getattr(args, key, None), value)
            setattr(args, key, value)
        args.num_classes = int(res["num_classes"])
        args.img_size = tuple(int(v) for v in res["img_size"])

    def _close_logger(self) -> None:
        pkg_logger = logging.getLogger("ftsam_plugin")
        for handler in self._handlers:
            pkg_logger.removeHandler(handler)
            handler.close()
        self._handlers = []
        if getattr(self, "_stopped_propagation", False):
            pkg_logger.propagate, self._stopped_propagation = True, False


def _record_dataset(result_file, needed: bool) -> Optional[str]:
    """The record's dataset; None if it cannot be read and is not `needed` (then `set_result` names the problem,
    after the config's own errors)."""
    try:
        return peek_record_dataset(result_file)
    except FtsamError:
        if needed:
            raise
        return None


def _warn_record_differs(key: str, mine, recorded) -> None:
    if mine is not None and str(mine).lower() != str(recorded).lower():
        logger.warning("config says %s=%s but the record was made with %s; using %s", key, quote(mine), recorded,
                       recorded)


def _root_prints_to_console() -> bool:
    """Whether the root logger has a plain console handler (writing to stderr or stdout)."""
    consoles = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)}
    return any(type(h) is logging.StreamHandler and id(getattr(h, "stream", None)) in consoles
               for h in logging.getLogger().handlers)


def _holds_output_lock() -> bool:
    """Whether this process owns the defense folder's lock: the main process of a torchrun job (its rank 0) or a
    single process. The other ranks neither take nor check it: they follow rank 0, and checking would see rank 0
    of this same job still finishing its previous run in that folder."""
    return int(os.environ.get("RANK", "0")) == 0


def _tqdm(iterable, **kw):
    """A progress bar on a terminal only: piped into a log file, bars are noise (the log has a line per epoch)."""
    from tqdm.auto import tqdm

    kw["disable"] = bool(kw.get("disable")) or not sys.stderr.isatty()
    return tqdm(iterable, dynamic_ncols=True, **kw)
