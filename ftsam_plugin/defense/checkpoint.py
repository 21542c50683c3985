"""Per-epoch checkpoints that load with `ftsam_plugin.io.safe_load` (tensors, numbers, strings, lists, dicts only).

`save_checkpoint` writes `last.pt` (weights, optimizer, scheduler, GradScaler, every rank's RNG states, the clean
subset, the CSV history, the settings of `RESUME_KEYS`, the fingerprint of the backdoored model and of the data,
`data.identity`, and a sha256 of all of it); `load_checkpoint` restores them after checking that the checkpoint is
sound (its checksum, an epoch of this run, finite weights) and that the run is the same (settings, record, subset,
data, number of processes).

A checkpoint exists to resume an unfinished run. Once a run's result is written, `drop_checkpoint` removes it
(PreAct-ResNet18's is 86 MB; BackdoorBench's defenses keep none) unless --keep_checkpoint asks to keep it;
`finished_without_checkpoint` tells a --resume of such a run that there is nothing to resume.
"""

from __future__ import annotations

import logging
import os
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ftsam_plugin.data.identity import identity_change, tensor_digest
from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import check_finite_state

__all__ = ["CHECKPOINT_FORMAT", "RESUME_KEYS", "resume_config", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "plain", "checksum", "unfinished_run", "drop_checkpoint", "finished_without_checkpoint"]

logger = logging.getLogger("ftsam_plugin.defense")

CHECKPOINT_FORMAT = "ftsam-defense-checkpoint"
# settings a resumed run must share with the run that wrote the checkpoint
# (everything that changes the weights or the CSV; num_workers too: it decides which RNG seeds the augmentations,
# the main process's or the DataLoader workers'). device, pin_memory, non_blocking and paths may change.
RESUME_KEYS = ("epochs", "batch_size", "lr", "lr_scheduler", "client_optimizer", "sgd_momentum", "wd", "random_seed",
               "ratio", "index", "protocol", "label_smoothing", "rho", "adaptive", "eta", "alpha", "restore",
               "cos_t_max", "steplr_stepsize", "steplr_gamma", "steplr_milestones", "ReduceLROnPlateau_factor",
               "amp", "amp_dtype", "eval_every", "num_workers", "sam_every", "sam_prob", "sam_epochs", "rho_schedule",
               "rho_min", "checkpoint_path", "perturbation", "path_rho", "unlearn", "unlearn_eps", "unlearn_frac",
               "eval_subset")
FIX = "delete it or run without --resume"  # what to do with a checkpoint that cannot be resumed
SAM_ONLY_KEYS = ("rho", "adaptive", "eta", "alpha", "restore", "sam_every", "sam_prob", "sam_epochs", "rho_schedule",
                 "rho_min", "perturbation", "path_rho")  # not in FT


def resume_config(cfg: dict, uses_sam: bool) -> dict:
    """The RESUME_KEYS settings of the config `cfg` as stored in (and compared with) a checkpoint."""
    cfg = dict(cfg)
    if not cfg.get("amp"):
        cfg["amp_dtype"] = None  # unused without AMP
    if cfg.get("rho_schedule") != "proportional":
        cfg["rho_min"] = None  # unused by a constant rho
    if cfg.get("unlearn") in (None, "none"):
        cfg["unlearn_eps"] = cfg["unlearn_frac"] = None  # unused without unlearning
    if not uses_sam:
        for key in SAM_ONLY_KEYS:
            cfg[key] = None
    return plain({k: cfg.get(k) for k in RESUME_KEYS})


def save_checkpoint(path: str, *, defense: str, epoch: int, model_state: dict, optimizer, scheduler, scaler,
                    indices: Sequence[int], history: List[dict], config: dict, rngs: Optional[list] = None,
                    data: Optional[dict] = None, extra: Optional[dict] = None) -> None:
    """Write the checkpoint `path` atomically. `rngs`: every rank's `rng_state()` in rank order (default: this
    process's only); resume restores each rank's own state (a fresh run seeds rank r with random_seed + r).
    `data`: the fingerprint of the data the run trains on (`data.identity.data_identity`). `extra`: name -> an
    object with state_dict()/load_state_dict() whose state the run also needs (the unlearner's UAP)."""
    from ftsam_plugin.io import atomic_save

    state = {
        "format": CHECKPOINT_FORMAT, "version": 3, "defense": defense, "epoch": int(epoch),
        "model": model_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),  # rank 0's (what single-process checkpoints always had)
        "rng_ranks": rngs if rngs is not None else [rng_state()],
        "subset": torch.tensor(list(indices), dtype=torch.int64),
        "history": plain(history),
        "config": config,
        "data": plain(data),
        "extra": {name: obj.state_dict() for name, obj in (extra or {}).items()},
    }
    state["checksum"] = checksum(state)
    atomic_save(state, path)


def load_checkpoint(path: str, *, defense: str, model: torch.nn.Module, optimizer, scheduler, scaler,
                    indices: Sequence[int], config: dict, world_size: int = 1, rank: int = 0,
                    data: Optional[dict] = None, extra: Optional[dict] = None) -> Tuple[int, list]:
    """Restore `path` into model, optimizer, scheduler, scaler and this rank's RNGs; returns (next epoch, history).

    FtsamError (naming the fix) when it is missing, another defense's, made with other `config` settings, on
    another clean subset or other `data` (a fingerprint; what changed is named) or by another number of processes,
    holds an epoch outside the run or non-finite weights, or does not fit the model.
    """
    from ftsam_plugin.io import safe_load

    if not os.path.isfile(path):
        raise FtsamError(f"no checkpoint at {path} to resume from; run without --resume")
    state = safe_load(path, what="defense checkpoint", fix=FIX)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FtsamError(f"{path} is not a {defense} checkpoint; {FIX}")
    if "checksum" not in state:
        logger.warning("checkpoint %s has no checksum (an older version); damage to it cannot be detected", path)
    elif state["checksum"] != checksum({k: v for k, v in state.items() if k != "checksum"}):
        raise FtsamError(f"checkpoint {path} is damaged (its contents do not match its checksum); {FIX}")
    if state.get("defense") != defense:
        raise FtsamError(f"{path} was written by '{state.get('defense')}', not '{defense}'; run without --resume")
    try:
        for key, old in state["config"].items():
            if config.get(key) != old:
                raise FtsamError(f"checkpoint {path} was made with {key}={old!r}, now {config.get(key)!r}; "
                                 f"use the same settings or run without --resume")
        if state["subset"].tolist() != list(indices):
            raise FtsamError(f"checkpoint {path} used another clean subset; use the same data or run without "
                             f"--resume")
        _check_data(path, state.get("data"), data)
        epoch = int(state["epoch"])
        if not 1 <= epoch <= int(config["epochs"]):
            raise FtsamError(f"checkpoint {path} says it holds epoch {epoch}, not one of this run's "
                             f"1..{config['epochs']}; {FIX}")
        check_finite_state(state["model"], f"defense checkpoint {path}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng_ranks") or [state["rng"]]
        if len(rngs) != world_size:
            raise FtsamError(f"checkpoint {path} was made by {len(rngs)} process(es), now {world_size}; resume "
                             f"with the same number of processes or run without --resume")
        for name, obj in (extra or {}).items():
            if name not in (state.get("extra") or {}):
                raise FtsamError(f"checkpoint {path} holds no '{name}' state; {FIX}")
            obj.load_state_dict(state["extra"][name])
        set_rng_state(rngs[rank])  # each rank continues its own random stream
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise FtsamError(f"checkpoint {path} does not fit this model or run ({detail}); {FIX}") from None
    logger.info("resumed from %s after epoch %d", path, epoch)
    return epoch + 1, list(state["history"])


def unfinished_run(path: str) -> Optional[str]:
    """'epoch E of N' when the checkpoint `path` holds a run that stopped before its last epoch (what a run without
    --resume would throw away), else None (no checkpoint, a finished run's, or one that cannot be resumed anyway)."""
    from ftsam_plugin.io import safe_load

    if not os.path.isfile(path):
        return None
    try:
        state = safe_load(path, what="defense checkpoint")
        epoch, total = int(state["epoch"]), int(state["config"]["epochs"])
    except (FtsamError, KeyError, TypeError, ValueError):
        return None
    return f"epoch {epoch} of {total}" if 1 <= epoch < total else None


def drop_checkpoint(path: str) -> bool:
    """Remove the checkpoint `path` of a run whose result is written (its folder marked complete); True when there
    was one."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def finished_without_checkpoint(path: str, folder: str, names: Sequence[str]) -> bool:
    """Whether there is no checkpoint `path` because the run in `folder` finished: its completion marker says that
    `names` (the result and its summary) are one finished run's."""
    from ftsam_plugin.data.completion import is_complete

    return not os.path.lexists(path) and bool(is_complete(folder, names))


def checksum(state: dict) -> str:
    """sha256 of a checkpoint's contents (every tensor's bytes, every value), as stored in its 'checksum'."""
    return tensor_digest(state).hexdigest()


def _check_data(path: str, old: Optional[dict], new: Optional[dict]) -> None:
    if new is None:
        return
    if old and new.get("model") and old.get("model") != new["model"]:
        if not old.get("model"):
            logger.warning("checkpoint %s has no fingerprint of the backdoored model (an older version); it cannot be "
                           "checked to belong to this record", path)
        else:
            raise FtsamError(f"checkpoint {path} was made from another backdoored model (weights sha256 "
                             f"{str(old['model'])[:12]}..., this record's {new['model'][:12]}...): it belongs to "
                             f"another record; run without --resume, or give each record its own --checkpoint_save")
    if not old:
        logger.warning("checkpoint %s has no data fingerprint (an older version); the data cannot be checked to be "
                       "the same", path)
        return
    change = identity_change(old, new)
    if change is not None:
        raise FtsamError(f"checkpoint {path} was made on other data: {change}; use the same data (--dataset_path) or "
                         f"run without --resume")


def rng_state() -> dict:
    """python, numpy and torch (CPU and CUDA) RNG states as tensors and plain numbers."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def plain(value):
    """`value` with everything that weights_only loading refuses turned into plain types (for configs, history)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
