"""Training a backdoored model on a poisoned train set, with BackdoorBench's per-epoch metrics.

SGD (momentum, weight decay), cosine learning rate over the epochs (stepped once per epoch), cross-entropy.
Each epoch yields a row with BackdoorBench's attack_df.csv columns.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.metrics import evaluate_backdoor
from ftsam_plugin.signals import ignore_in_worker

__all__ = ["train_backdoored_model"]


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _check_finite(model: nn.Module, losses: List[float], epoch: int) -> None:
    """Stop a diverged run: a record with NaN/inf weights is never written."""
    if not all(math.isfinite(v) for v in losses):
        what = "the training loss"
    elif not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        what = "the weights"
    else:
        return
    raise FtsamError(f"training diverged in epoch {epoch}: {what} became NaN or infinite; lower --lr (no "
                     f"attack_result.pt was written)")


def train_backdoored_model(model: nn.Module, bd_train, clean_test, bd_test, *, epochs: int, batch_size: int = 128,
                           lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, device="cpu",
                           num_workers: int = 0, seed: int = 0, progress: bool = True,
                           on_epoch: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Train `model` in place on `bd_train` (5-tuple items, train transform) and evaluate every epoch.

    Args:
        model: the network (moved to `device`).
        bd_train, clean_test, bd_test: datasets with transforms applied (TransformDataset).
        epochs, batch_size, lr, momentum, weight_decay: SGD + per-epoch cosine schedule (T_max = epochs).
        device: torch device; on CPU the model and inputs use channels-last memory format.
        num_workers: DataLoader workers.
        seed: seeds the train-loader shuffling.
        on_epoch: called with all rows so far after every epoch (e.g. to rewrite attack_df.csv).

    Returns:
        One dict per epoch with BackdoorBench's keys: epoch, batch, train_epoch_loss_avg_over_batch, train_acc,
        train_acc_clean_only, train_asr_bd_only, train_ra_bd_only, clean_test_loss_avg_over_batch,
        bd_test_loss_avg_over_batch, test_acc, test_asr, test_ra.
    """
    device = torch.device(device)
    channels_last = device.type == "cpu"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(epochs), 1))
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(int(seed))
    worker_init = ignore_in_worker if num_workers > 0 else None
    train_loader = DataLoader(bd_train, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                              drop_last=len(bd_train) >= batch_size, generator=generator,
                              pin_memory=device.type == "cuda", worker_init_fn=worker_init)
    test_loaders = {
        name: DataLoader(ds, batch_size=max(batch_size, 256), shuffle=False, num_workers=num_workers,
                         worker_init_fn=worker_init)
        for name, ds in (("clean", clean_test), ("bd", bd_test))
    }
    rows: List[dict] = []
    for epoch in range(int(epochs)):
        model.train()
        losses, preds, labels, flags, origs = [], [], [], [], []
        bar = tqdm(train_loader, desc=f"attack epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for x, y, _index, flag, orig in bar:
            x, y = _to_device(x, device, channels_last), y.to(device)
            out = model(x)
            loss = criterion(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            preds.append(out.argmax(1).cpu())
            labels.append(y.cpu())
            flags.append(flag)
            origs.append(orig)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        scheduler.step()
        _check_finite(model, losses, epoch + 1)
        pred, lab, flag, orig = (torch.cat(t) if t else torch.zeros(0, dtype=torch.long)
                                 for t in (preds, labels, flags, origs))
        bd, clean = flag == 1, flag == 0

        def frac(mask, ref):
            return (pred[mask] == ref[mask]).float().mean().item() if mask.any() else None

        test_m = evaluate_backdoor(model, test_loaders["clean"], test_loaders["bd"], device,
                                   channels_last=channels_last, with_loss=True)
        rows.append({
            "epoch": epoch,
            "batch": len(losses),
            "train_epoch_loss_avg_over_batch": sum(losses) / len(losses) if losses else None,
            "train_acc": frac(torch.ones_like(flag, dtype=torch.bool), lab),
            "train_acc_clean_only": frac(clean, lab),
            "train_asr_bd_only": frac(bd, lab),
            "train_ra_bd_only": frac(bd, orig),
            "clean_test_loss_avg_over_batch": test_m["clean_loss"],
            "bd_test_loss_avg_over_batch": test_m["bd_loss"],
            "test_acc": test_m["acc"],
            "test_asr": test_m["asr"],
            "test_ra": test_m["ra"],
        })
        if on_epoch is not None:
            on_epoch(rows)
    model.to(memory_format=torch.contiguous_format)
    return rows
