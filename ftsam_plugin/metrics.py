"""ACC, ASR, RA (one batched no-grad pass each) and BackdoorBench's DER / RIR summary formulas.

All values are fractions in [0, 1], as BackdoorBench logs them.
- ACC: accuracy on the clean test set.
- ASR: accuracy on the backdoor test set against the backdoor labels (item field 1).
- RA:  accuracy on the backdoor test set against the original labels (item field 4 of
       (img, bd_label, original_index, poison_flag, original_label)).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ftsam_plugin.signals import ignore_in_worker

__all__ = ["evaluate", "evaluate_backdoor", "count_correct", "der", "rir"]

DataLike = Union[Dataset, DataLoader]


def _as_loader(data: DataLike, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    try:
        if len(data) == 0:
            raise ValueError("cannot evaluate on an empty dataset")
    except TypeError:  # an IterableDataset without __len__: emptiness is checked after the pass
        pass
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        worker_init_fn=ignore_in_worker if num_workers > 0 else None,  # Ctrl-C / SIGTERM: the main process's
    )


@contextlib.contextmanager
def _own_rng(device: torch.device):
    """Evaluation leaves the global random state as it found it: a DataLoader draws its base seed from torch's global
    generator, which training's augmentations also use, so without this evaluating more often would change the
    trained model. (CPU state always; the device's too on CUDA.)"""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    # Restore each submodule's own flag, not just the root's: frozen-BN setups mix modes.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def count_correct(
    model: nn.Module,
    data: DataLike,
    label_fields: Sequence[int] = (1,),
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 256,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    num_workers: int = 0,
    return_loss: bool = False,
):
    """One no-grad pass: the same predictions compared against several label fields of each item.

    Args:
        model: classifier returning logits (a tuple/list output uses its first element). It is moved to
            `device` (in place, as BackdoorBench's evaluation does) and put in eval mode during the pass;
            each submodule's training flag is restored afterwards.
        data: a Dataset of tuples (image at index 0) or a DataLoader yielding such batches.
        label_fields: item indices holding the labels to compare with.
        device: where to run.
        batch_size, num_workers: used only when `data` is a Dataset.
        amp_dtype: run under torch.autocast with this dtype (e.g. torch.bfloat16); None = full precision.
        channels_last: feed 4-D inputs in channels_last memory format.
        return_loss: also return the cross-entropy against the first label field, averaged over batches
            (each batch's mean, then the mean of those, as BackdoorBench's `*_loss_avg_over_batch`).

    Returns:
        (correct counts, one int per label field; number of samples), plus the mean batch loss (a float) as a
        third element when `return_loss`.

    Raises:
        ValueError: empty data, bad arguments, or a batch without the requested fields.
    """
    device = torch.device(device)
    fields = list(label_fields)
    if not fields or any(not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in fields):
        raise ValueError(f"label_fields must be ints >= 1 (index 0 is the image), got {label_fields!r}")
    loader = _as_loader(data, batch_size, num_workers, device)
    model.to(device)
    correct = torch.zeros(len(fields), dtype=torch.long, device=device)
    total = 0
    loss_sum, batches = torch.zeros((), dtype=torch.float64, device=device), 0
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    with _own_rng(device), _eval_mode(model), torch.no_grad():
        for batch in loader:
            if not isinstance(batch, (list, tuple)) or len(batch) <= max(fields):
                raise ValueError(
                    f"each item must be a tuple with at least {max(fields) + 1} fields (image, label, ...); "
                    f"got a batch of type {type(batch).__name__}"
                    + (f" with {len(batch)} fields" if isinstance(batch, (list, tuple)) else "")
                )
            inputs = batch[0].to(device, non_blocking=True)
            if channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(inputs)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            predictions = logits.argmax(dim=1)
            for slot, field in enumerate(fields):
                labels = torch.as_tensor(batch[field]).to(device, non_blocking=True).view(-1)
                correct[slot] += (predictions == labels).sum()
                if return_loss and slot == 0 and predictions.numel():
                    loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels.long())
                    batches += 1
            total += predictions.numel()
    if total == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if return_loss:
        return [int(c) for c in correct.tolist()], total, float(loss_sum) / batches
    return [int(c) for c in correct.tolist()], total


def evaluate(
    model: nn.Module,
    data: DataLike,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 256,
    label_field: int = 1,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    num_workers: int = 0,
) -> float:
    """Top-1 accuracy (fraction) of `model` on `data` against item field `label_field`. See `count_correct`."""
    (correct,), total = count_correct(
        model, data, (label_field,), device, batch_size, amp_dtype, channels_last, num_workers
    )
    return correct / total


def evaluate_backdoor(
    model: nn.Module,
    clean_test: DataLike,
    bd_test: DataLike,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 256,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    num_workers: int = 0,
    bd_label_field: int = 1,
    orig_label_field: int = 4,
    with_loss: bool = False,
) -> Dict[str, float]:
    """ACC on `clean_test`; ASR and RA from one pass over `bd_test`.

    `bd_test` items are BackdoorBench's (img, bd_label, original_index, poison_flag, original_label) with
    `getitem_all_switch` False (with it True the two label fields are swapped: pass the fields accordingly).

    Returns:
        dict(acc=..., asr=..., ra=...), fractions; with `with_loss` also clean_loss and bd_loss: cross-entropy
        averaged over batches, on `clean_test` and on `bd_test` against the backdoor labels (same passes).
    """
    opts = dict(
        device=device, batch_size=batch_size, amp_dtype=amp_dtype, channels_last=channels_last, num_workers=num_workers
    )
    if not with_loss:
        acc = evaluate(model, clean_test, label_field=1, **opts)
        (asr_correct, ra_correct), total = count_correct(model, bd_test, (bd_label_field, orig_label_field), **opts)
        return {"acc": acc, "asr": asr_correct / total, "ra": ra_correct / total}
    (clean_correct,), clean_total, clean_loss = count_correct(model, clean_test, (1,), return_loss=True, **opts)
    (asr_correct, ra_correct), total, bd_loss = count_correct(
        model, bd_test, (bd_label_field, orig_label_field), return_loss=True, **opts
    )
    return {"acc": clean_correct / clean_total, "asr": asr_correct / total, "ra": ra_correct / total,
            "clean_loss": clean_loss, "bd_loss": bd_loss}


def _check_fractions(**values: float) -> None:
    for name, value in values.items():
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}={value} is not a fraction in [0, 1] (pass 0.9344, not 93.44)")


def der(acc_bd: float, acc_def: float, asr_bd: float, asr_def: float) -> float:
    """Defense effectiveness rate (BackdoorBench's `defense_effectiveness_rate_simplied`), a fraction.

    DER = [max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1] / 2
    """
    _check_fractions(acc_bd=acc_bd, acc_def=acc_def, asr_bd=asr_bd, asr_def=asr_def)
    return (max(0.0, asr_bd - asr_def) - max(0.0, acc_bd - acc_def) + 1.0) / 2.0


def rir(acc_bd: float, acc_def: float, ra_bd: float, ra_def: float) -> float:
    """Robustness improvement rate, a fraction.

    RIR = [max(0, RA_def - RA_bd) - max(0, ACC_bd - ACC_def) + 1] / 2
    """
    _check_fractions(acc_bd=acc_bd, acc_def=acc_def, ra_bd=ra_bd, ra_def=ra_def)
    return (max(0.0, ra_def - ra_bd) - max(0.0, acc_bd - acc_def) + 1.0) / 2.0
