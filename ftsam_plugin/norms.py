"""`ftsam norms`: per-neuron weight norm vs trigger-activated change (TAC) of one layer, for several models.

FT-SAM (Zhu et al., ICCV 2023, §3.2, Fig. 2/4/5) observes that in a backdoored model the neurons (output channels)
of the last convolution with a large TAC have large weight norms, and that FT-SAM shrinks those norms. For a conv
layer with weight W (C_out x C_in x kh x kw) and output feature map f (C_out x H x W):

- weight norm of channel k:  ||W_k||_2, the L2 norm of the k-th filter (all C_in*kh*kw weights; no bias);
- TAC of channel k (CLP, Zheng et al., ECCV 2022, "trigger-activated change"), over N clean/poisoned pairs
  (x_i, x_i'), where f_k is channel k of the layer's output (the conv's own output, before any BN/ReLU/residual):
    `--tac mean_abs` (default, "the mean absolute change"):
        TAC_k = 1/N sum_i mean_{h,w} |f_k(x_i')[h,w] - f_k(x_i)[h,w]|
    `--tac l2` (CLP's L2 over the map):
        TAC_k = 1/N sum_i || f_k(x_i') - f_k(x_i) ||_2
  Pairs: the first `--num_samples` items of the record's bd_test set (poisoned, test transform) with the clean_test
  item they came from (bd_test field 2 = original index). The models run in eval mode.

Default layer: the last nn.Conv2d in module order (`layer4.1.conv2` for preactresnet18); `--layer` overrides.
Correlations: Pearson, and Spearman = Pearson of the ranks (ties get their average rank), computed with numpy.
Outputs in `--out`: norms_channels.csv (model, channel, norm, tac), norms_summary.csv (model, layer, pearson,
spearman, mean_norm, std_norm (population std), mean_tac, num_samples), norms_scatter.png (norm against TAC,
one subplot per model, shared axes) and norms_hist.png (the norm histograms overlaid, shared bins).
"""

from __future__ import annotations

import argparse
import io
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.io import atomic_write_bytes, make_output_folder, write_csv
from ftsam_plugin.lock import FolderLock
from ftsam_plugin.settings import Number, Text, check_flags

__all__ = [
    "add_arguments",
    "run",
    "conv_layers",
    "resolve_layer",
    "channel_weight_norms",
    "trigger_activated_change",
    "PairedTriggerSet",
    "pearson",
    "spearman",
    "rankdata",
]

TAC_REDUCTIONS = ("l2", "mean_abs")


# ---------------------------------------------------------------------------------------------- layers, norms


def conv_layers(model: nn.Module) -> List[str]:
    """Names of the model's nn.Conv2d modules, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def resolve_layer(model: nn.Module, name: Optional[str] = None) -> Tuple[str, nn.Conv2d]:
    """(name, module) of conv layer `name`, or of the last conv layer when `name` is None.

    Raises:
        FtsamError: no such conv layer (the message lists the model's conv layers).
    """
    convs = conv_layers(model)
    if not convs:
        raise FtsamError(f"{type(model).__name__} has no Conv2d layer; norms needs a convolutional model")
    if name is None:
        name = convs[-1]
    modules = dict(model.named_modules())
    if name not in modules or not isinstance(modules[name], nn.Conv2d):
        raise FtsamError(f"no conv layer '{name}' in {type(model).__name__}; pass --layer with one of: "
                         + ", ".join(convs))
    return name, modules[name]


def channel_weight_norms(conv: nn.Conv2d) -> np.ndarray:
    """||W_k||_2 per output channel k (float64)."""
    weight = conv.weight.detach().to(torch.float64)
    return weight.flatten(1).norm(dim=1).cpu().numpy()


# ---------------------------------------------------------------------------------------------- TAC


class PairedTriggerSet(Dataset):
    """(clean image, poisoned image) pairs: bd_test[i] with clean_test[bd_test[i][2]] for i < num_samples."""

    def __init__(self, bd_test, clean_test, num_samples: Optional[int] = None):
        n = len(bd_test) if num_samples is None else min(int(num_samples), len(bd_test))
        if n < 1:
            raise ValueError("no poisoned samples to pair (empty bd_test or num_samples < 1)")
        self.bd_test, self.clean_test, self.n = bd_test, clean_test, n

    def __len__(self) -> int:
        return self.n

    def clean_indices(self) -> List[int]:
        """The clean_test items the pairs read (bd_test's original indices), without reading any image."""
        return [int(i) for i in np.asarray(self.bd_test.original_index_array)[:self.n]]

    def __getitem__(self, i: int):
        poisoned = self.bd_test[i]
        clean = self.clean_test[int(poisoned[2])]
        return clean[0], poisoned[0]


def trigger_activated_change(model: nn.Module, layer: str, pairs, device="cpu", reduction: str = "mean_abs",
                             batch_size: int = 128) -> np.ndarray:
    """TAC per output channel of `layer` (see the module docstring), float64.

    Args:
        model: the network (run in eval mode, no grad; training flags restored afterwards).
        layer: module name whose output is the feature map (N, C, H, W) (or (N, C)).
        pairs: a Dataset or DataLoader of (clean image, poisoned image).
        device: where to run.
        reduction: 'mean_abs' (mean absolute change over positions, the default) or 'l2' (CLP: L2 norm over positions).
        batch_size: used when `pairs` is a Dataset.
    """
    if reduction not in TAC_REDUCTIONS:
        raise ValueError(f"reduction must be one of {TAC_REDUCTIONS}, got {reduction!r}")
    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise ValueError(f"model has no module named {layer!r}")
    loader = pairs if isinstance(pairs, DataLoader) else DataLoader(pairs, batch_size=batch_size, shuffle=False)
    device = torch.device(device)
    captured: List[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    modes = [(m, m.training) for m in model.modules()]
    model.to(device).eval()
    total, count = None, 0
    try:
        with torch.no_grad():
            for clean, poisoned in loader:
                captured.clear()
                model(clean.to(device))
                model(poisoned.to(device))
                if len(captured) != 2:
                    raise ValueError(f"layer {layer!r} ran {len(captured) // 2} times per forward; pick another")
                diff = (captured[1] - captured[0]).to(torch.float64).flatten(2) if captured[0].dim() > 2 else \
                    (captured[1] - captured[0]).to(torch.float64).unsqueeze(2)
                per = diff.norm(dim=2) if reduction == "l2" else diff.abs().mean(dim=2)  # (B, C)
                total = per.sum(0) if total is None else total + per.sum(0)
                count += per.shape[0]
    finally:
        handle.remove()
        for m, training in modes:
            m.training = training
    if count == 0:
        raise ValueError("no pairs to evaluate")
    return (total / count).cpu().numpy()


# ---------------------------------------------------------------------------------------------- correlation


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of `x`, ties sharing their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(x, y) -> float:
    """Pearson correlation; NaN when either input is constant or has < 2 values."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({x.size} vs {y.size})")
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the (average-tie) ranks."""
    return pearson(rankdata(x), rankdata(y))


# ---------------------------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def plot_scatter(results: Dict[str, dict], layer: str) -> bytes:
    from matplotlib.figure import Figure

    n = len(results)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, (label, r) in zip(axes, results.items()):
        ax.scatter(r["tac"], r["norm"], s=8, alpha=0.6)
        ax.set_title(f"{label}\npearson {r['pearson']:.3f}, spearman {r['spearman']:.3f}", fontsize=9)
        ax.set_xlabel("TAC")
        ax.set_ylabel("weight norm")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"neuron weight norm vs TAC: {layer}")
    return _png(fig)


def plot_histogram(results: Dict[str, dict], layer: str) -> bytes:
    from matplotlib.figure import Figure

    values = np.concatenate([r["norm"] for r in results.values()])
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for label, r in results.items():
        ax.hist(r["norm"], bins=bins, alpha=0.45, label=f"{label} (std {r['std_norm']:.3f})")
    ax.set_xlabel("weight norm")
    ax.set_ylabel("neurons")
    ax.set_title(f"neuron weight norms: {layer}")
    ax.legend(fontsize=8)
    return _png(fig)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--record", required=True, help="attack record folder (gives the attacked model and data)")
    parser.add_argument("--models", default=None,
                        help="comma-separated: 'attack' and/or defense names under <record>/defense/ "
                             "(default: attack plus every defense result found; with --result: attack only)")
    parser.add_argument("--result", action="append", default=[], metavar="PT",
                        help="extra defense_result.pt to analyse (repeatable); labelled by its folder name")
    parser.add_argument("--layer", default=None, help="conv layer name (default: the last Conv2d)")
    parser.add_argument("--num_samples", type=int, default=1000, help="clean/poisoned pairs for TAC (default 1000)")
    parser.add_argument("--tac", choices=TAC_REDUCTIONS, default="mean_abs",
                        help="mean_abs: mean |change| over positions (default); l2: CLP's L2 norm over positions")
    parser.add_argument("--out", default="norms", help="output folder (default ./norms)")
    parser.add_argument("--dataset_path", default=None, help="dataset folder override passed to load_attack_result")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch_size", type=int, default=128)
    return parser


def _select_models(args, record_dir: str) -> List[Tuple[str, Optional[str]]]:
    """[(label, defense_result.pt or None for the attacked model)]."""
    from ftsam_plugin.leaderboard import find_defenses

    found = find_defenses(record_dir)
    if args.models is None:
        names = ["attack"] if args.result else ["attack", *found]
    else:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    chosen: List[Tuple[str, Optional[str]]] = []
    for name in names:
        if name == "attack":
            chosen.append(("attack", None))
        elif name in found:
            chosen.append((name, found[name]))
        else:
            raise FtsamError(f"no defense result '{name}' under {record_dir}/defense/; choose from "
                             f"{['attack', *found]} or pass --result <defense_result.pt>")
    for path in args.result:
        if not os.path.isfile(path):
            raise FtsamError(f"--result {path} does not exist; pass a defense_result.pt")
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        if label in dict(chosen):
            label = os.path.relpath(path)
        chosen.append((label, path))
    if not chosen:
        raise FtsamError("no models selected; pass --models attack,<defense>,... or --result <defense_result.pt>")
    return chosen


def analyse(models: Sequence[Tuple[str, nn.Module]], pairs, layer: Optional[str] = None, device="cpu",
            reduction: str = "mean_abs", batch_size: int = 128) -> Tuple[str, Dict[str, dict]]:
    """Norms, TAC and correlations of one layer for each (label, model); returns (layer name, {label: stats})."""
    layer = resolve_layer(models[0][1], layer)[0]
    results = {}
    for label, model in models:
        _, conv = resolve_layer(model, layer)
        norm = channel_weight_norms(conv)
        tac = trigger_activated_change(model, layer, pairs, device, reduction, batch_size)
        results[label] = {"norm": norm, "tac": tac, "pearson": pearson(norm, tac), "spearman": spearman(norm, tac),
                          "mean_norm": float(norm.mean()), "std_norm": float(norm.std()),
                          "mean_tac": float(tac.mean())}
    return layer, results


# every numeric and path flag, checked (with --device) before anything is read or written
FLAG_RULES = {"batch_size": Number(integer=True, low=1), "num_samples": Number(integer=True, low=1),
              "out": Text(), "record": Text(), "dataset_path": Text()}


def run(args: argparse.Namespace) -> int:
    from ftsam_plugin.data.image_check import check_record_images
    from ftsam_plugin.data.records import load_attack_result
    from ftsam_plugin.leaderboard import _resolve_device, load_defense_model

    check_flags(args, FLAG_RULES)
    device = _resolve_device(args.device)
    out = os.path.abspath(args.out)
    lock = FolderLock(out, what="norms folder")
    lock.check()  # another run writing there: fail before anything is loaded
    record_dir = os.path.abspath(args.record)
    if os.path.isfile(record_dir):
        record_dir = os.path.dirname(record_dir)
    chosen = _select_models(args, record_dir)
    record = load_attack_result(record_dir, dataset_path=args.dataset_path, device=device)
    models = [(label, record["model"] if path is None else load_defense_model(path, record, device))
              for label, path in chosen]
    pairs = PairedTriggerSet(record["bd_test"], record["clean_test"], args.num_samples)
    check_record_images(record, test_indices=pairs.clean_indices())  # before anything is computed or written
    layer, results = analyse(models, pairs, args.layer, device, args.tac, args.batch_size)

    make_output_folder(out)
    with lock:  # one writer: the four files all come from this run
        _write_outputs(out, results, layer, pairs)
    print(f"layer {layer}: {len(next(iter(results.values()))['norm'])} channels, {len(pairs)} pairs, TAC {args.tac}")
    print(f"{'model':<20} {'pearson':>8} {'spearman':>9} {'mean_norm':>10} {'std_norm':>9} {'mean_tac':>9}")
    for label, r in results.items():
        print(f"{label:<20} {r['pearson']:>8.4f} {r['spearman']:>9.4f} {r['mean_norm']:>10.4f} "
              f"{r['std_norm']:>9.4f} {r['mean_tac']:>9.4f}")
    for name in ("norms_channels.csv", "norms_summary.csv", "norms_scatter.png", "norms_hist.png"):
        print(f"wrote {os.path.join(out, name)}")
    return 0


def _write_outputs(out: str, results: Dict[str, dict], layer: str, pairs) -> None:
    write_csv(os.path.join(out, "norms_channels.csv"),
              [{"model": label, "channel": k, "norm": repr(float(r["norm"][k])), "tac": repr(float(r["tac"][k]))}
               for label, r in results.items() for k in range(len(r["norm"]))])
    summary = [{"model": label, "layer": layer, "pearson": r["pearson"], "spearman": r["spearman"],
                "mean_norm": r["mean_norm"], "std_norm": r["std_norm"], "mean_tac": r["mean_tac"],
                "num_samples": len(pairs)} for label, r in results.items()]
    write_csv(os.path.join(out, "norms_summary.csv"), summary)
    atomic_write_bytes(os.path.join(out, "norms_scatter.png"), plot_scatter(results, layer))
    atomic_write_bytes(os.path.join(out, "norms_hist.png"), plot_histogram(results, layer))
