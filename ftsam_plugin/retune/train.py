"""The retuning attack in-process: plain SGD on the retuning set, ACC/ASR/RA before and after.

`retune_model` runs one retuning on a copy of the model (the caller's model is left alone); `measure_pasr` runs the
attack and its control and returns O-ASR, P-ASR and the control's ASR (what `ftsam demo` can print).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ftsam_plugin.defense.finetune import CSV_COLUMNS
from ftsam_plugin.errors import FtsamError

from .data import RetuneSet, build_retune_set
from .settings import RetuneSettings

__all__ = ["RetuneResult", "retune_model", "evaluate_row", "measure_pasr", "CSV_COLUMNS"]

logger = logging.getLogger("ftsam_plugin.retune")


@dataclass
class RetuneResult:
    """A finished retuning: the retuned model (eval mode), the per-epoch rows (BackdoorBench's columns; epoch 0 is
    the model before retuning when it was evaluated), and ACC/ASR/RA before (or None) and after."""

    model: nn.Module
    history: List[dict]
    before: Optional[Dict[str, float]]
    after: Dict[str, float]
    retune_set: RetuneSet = field(repr=False)
    seconds: float = 0.0


def evaluate_row(model: nn.Module, record: dict, device, batch_size: int = 256, num_workers: int = 0) -> dict:
    """ACC on the record's clean test set, ASR/RA on its backdoor test set, and the two losses, as CSV columns."""
    from ftsam_plugin.metrics import evaluate_backdoor

    m = evaluate_backdoor(model, record["clean_test"], record["bd_test"], device=device, batch_size=batch_size,
                          num_workers=num_workers, with_loss=True)
    return {"clean_test_loss_avg_over_batch": float(m["clean_loss"]),
            "bd_test_loss_avg_over_batch": float(m["bd_loss"]),
            "test_acc": float(m["acc"]), "test_asr": float(m["asr"]), "test_ra": float(m["ra"])}


def _metrics(row: dict) -> Dict[str, float]:
    return {"acc": row["test_acc"], "asr": row["test_asr"], "ra": row["test_ra"]}


def retune_model(model: nn.Module, record: dict, settings: RetuneSettings, device="cpu",
                 retune_set: Optional[RetuneSet] = None, evaluate_before: bool = True, eval_every: int = 1,
                 eval_batch_size: int = 256, num_workers: int = 0,
                 on_epoch: Optional[Callable[[List[dict]], None]] = None) -> RetuneResult:
    """Retune a copy of `model` on the record's retuning set (SGD, cross-entropy, constant lr, BatchNorm in train
    mode), evaluating before (epoch 0), every `eval_every` epochs and after the last.

    Args:
        model: the model to attack (not modified).
        record: a `load_attack_result` dict (clean_train, clean_test, bd_train, bd_test).
        settings: the attack's settings.
        device: where to train and evaluate.
        retune_set: a prepared `build_retune_set(record, settings)` (built here when None).
        evaluate_before: evaluate the model before retuning (the CSV's epoch-0 row, O-ACC/O-ASR).
        eval_every: evaluate every k epochs (the last epoch always).
        eval_batch_size, num_workers: for the test-set passes.
        on_epoch: called with the rows so far after each epoch (the CLI rewrites its CSV there).

    Returns:
        RetuneResult. Raises FtsamError on a non-finite loss or a bad `eval_every`.
    """
    if eval_every < 1:
        raise FtsamError(f"--eval_every {eval_every} must be >= 1")
    start = time.perf_counter()
    device = torch.device(device)
    data = retune_set if retune_set is not None else build_retune_set(record, settings)
    model = copy.deepcopy(model).to(device)
    history: List[dict] = []
    if evaluate_before:
        history.append({**dict.fromkeys(CSV_COLUMNS), "epoch": 0,
                        **evaluate_row(model, record, device, eval_batch_size, num_workers)})
        logger.info("before retuning: %s", _metrics(history[-1]))
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.sgd_momentum,
                                weight_decay=settings.wd)
    loader = DataLoader(data.dataset(), batch_size=settings.batch_size, shuffle=True, drop_last=False,
                        generator=torch.Generator().manual_seed(settings.random_seed))
    for epoch in range(1, settings.epochs + 1):
        loss, acc = _train_epoch(model, loader, optimizer, device, epoch)
        row = {**dict.fromkeys(CSV_COLUMNS), "epoch": epoch, "train_epoch_loss_avg_over_batch": loss,
               "train_acc": acc, "lr": settings.lr}
        if epoch % eval_every == 0 or epoch == settings.epochs:
            row.update(evaluate_row(model, record, device, eval_batch_size, num_workers))
        history.append(row)
        logger.info("epoch %d: %s", epoch, {k: v for k, v in row.items() if v is not None})
        if on_epoch is not None:
            on_epoch(history)
    model.eval()
    before = _metrics(history[0]) if evaluate_before else None
    return RetuneResult(model, history, before, _metrics(history[-1]), data, time.perf_counter() - start)


def _train_epoch(model, loader, optimizer, device, epoch: int):
    """One pass; returns (mean of the batch losses, train accuracy)."""
    model.train()
    loss_sum, correct, seen, batches = 0.0, 0, 0, 0
    for step, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FtsamError(f"non-finite retuning loss at epoch {epoch} step {step}; lower --lr")
        loss_sum += value
        correct += int((logits.argmax(1) == y).sum())
        seen += y.numel()
        batches += 1
    return loss_sum / batches, correct / seen


def measure_pasr(model: nn.Module, record: dict, settings: Optional[RetuneSettings] = None, device="cpu",
                 control: bool = True, evaluate_before: bool = True, eval_batch_size: int = 256,
                 num_workers: int = 0) -> Dict[str, float]:
    """O-ASR, P-ASR and the control's ASR of `model` in-process (no files written; `model` is not modified).

    Args:
        model: the (defended or backdoored) model.
        record: the `load_attack_result` dict of its attack record.
        settings: the attack's settings (default: the reference's, RetuneSettings()).
        device: where to run.
        control: also run the `poison_num` 0 control on the same clean data.
        evaluate_before: also evaluate `model` itself (O-ACC/O-ASR/O-RA; skip it when they are known).

    Returns:
        {o_acc, o_asr, o_ra (before, when `evaluate_before`), p_acc, p_asr, p_ra (after the attack), c_acc, c_asr,
        c_ra (after the control, when `control`), seconds}; fractions. Only the before and final models are
        evaluated.
    """
    settings = settings or RetuneSettings()
    start = time.perf_counter()
    attacked = retune_model(model, record, settings, device, evaluate_before=evaluate_before,
                            eval_every=settings.epochs, eval_batch_size=eval_batch_size, num_workers=num_workers)
    out = {f"o_{k}": v for k, v in (attacked.before or {}).items()}
    out.update({f"p_{k}": v for k, v in attacked.after.items()})
    if control:
        clean = retune_model(model, record, settings.control(), device, evaluate_before=False,
                             eval_every=settings.epochs, eval_batch_size=eval_batch_size, num_workers=num_workers)
        out.update({f"c_{k}": v for k, v in clean.after.items()})
    out["seconds"] = time.perf_counter() - start
    return out
