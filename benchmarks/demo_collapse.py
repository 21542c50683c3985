"""Why FT and FT-SAM first destroyed the demo's model at the old demo setting (lr 0.01, issue 18): a diagnosis.

    .venv/bin/python benchmarks/demo_collapse.py      # ~2 min, one thread; writes benchmarks/results/demo_collapse.md

On the demo sweep's seed-0 record (made by `benchmarks/demo_sweep.py`; made here if missing), one thread:
  1. the backdoored model's clean ACC in eval mode, and after re-estimating its BatchNorm statistics on the clean
     training images alone (no weight changes): how much its running statistics owe to the poisoned batches;
  2. two epochs of FT (`ftsam defend` through the demo's `run_defense`) at several settings, then the clean ACC
     in eval mode (running statistics), in train mode (each test batch's own statistics) and after re-estimating
     BN on the defense's clean subset, plus the relative weight change ||w - w0|| / ||w0||.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from datetime import datetime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# (label, clean ratio, batch, lr, momentum): the old demo default first, then the new one and the levers
SETTINGS = (("old demo default", 0.1, 32, 0.01, 0.9), ("momentum 0", 0.1, 32, 0.01, 0.0),
            ("lr 0.003, ratio 0.2 (new default)", 0.2, 32, 0.003, 0.9), ("lr 0.001", 0.1, 32, 0.001, 0.9))
EPOCHS = 2


def clean_acc(model, dataset, train_mode: bool = False) -> float:
    import torch
    from torch.utils.data import DataLoader

    model.train(train_mode)
    right = total = 0
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=128):
            y = torch.as_tensor(batch[1])
            right += int((model(batch[0]).argmax(1) == y).sum())
            total += len(y)
    return right / total


def recalibrated(model, dataset):
    """A copy of `model` whose BN running statistics are re-estimated (cumulative average) on `dataset`."""
    import torch
    from torch.utils.data import DataLoader

    model = copy.deepcopy(model)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    model.train()
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=32):
            model(batch[0])
    return model


def main() -> int:
    import torch
    from torch.utils.data import Subset

    import demo_sweep
    from ftsam_plugin import demo
    from ftsam_plugin.data.backdoor import TransformDataset
    from ftsam_plugin.data.records import load_attack_result, load_defense_model
    from ftsam_plugin.data.transforms import get_transform
    from ftsam_plugin.defense.subsets import raw_dataset

    torch.set_num_threads(1)
    cache = os.path.join(REPO, "benchmarks", ".cache", "demo_sweep")
    record = os.path.join(cache, "records", "s0", f"demo_{demo_sweep.ATTACK}")
    if not os.path.isfile(os.path.join(record, "attack_result.pt")):
        data = demo.select_data(None, os.path.join(cache, "data"), offline=True)
        shutil.rmtree(record, ignore_errors=True)
        demo.run_attack(data, os.path.dirname(record), os.path.basename(record), demo_sweep.ATTACK, 15, 0.25, "cpu",
                        0, False)
    loaded = load_attack_result(os.path.join(record, "attack_result.pt"))
    base, test = loaded["model"], loaded["clean_test"]
    raw = raw_dataset(loaded["clean_train"])
    test_tf = get_transform(loaded["clean_data"], train=False, img_size=loaded.get("img_size"))
    lines = ["# Why the demo's defenses first destroyed the model at lr 0.01", "",
             f"- Command: `.venv/bin/python benchmarks/demo_collapse.py` (one thread), written "
             f"{datetime.now():%Y-%m-%d %H:%M}", "- Record: the demo sweep's seed-0 record (offline digits, Blended, "
             "PreAct-ResNet18 width 0.25, 15 epochs, 10% poison); clean test set of 364 images.", "",
             "## The backdoored model", "",
             f"- clean ACC, eval mode (its running BN statistics): {100 * clean_acc(base, test):.1f}%",
             f"- after re-estimating BN on the 1,433 clean training images only: "
             f"{100 * clean_acc(recalibrated(base, TransformDataset(raw, test_tf)), test):.1f}%", "",
             f"## {EPOCHS} epochs of FT, then", "",
             "| setting | ratio | batch | lr | momentum | ACC epoch 1 | ACC epoch 2, eval mode | train mode (batch "
             "statistics) | BN re-estimated on the clean subset | ‖w − w0‖ / ‖w0‖ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, ratio, batch, lr, momentum in SETTINGS:
        shutil.rmtree(os.path.join(record, "defense"), ignore_errors=True)
        out = demo.run_defense("ft-baseline", record, EPOCHS, ratio, None, "cpu", 0, eval_every=1, batch_size=batch,
                               lr=lr, extra=["--sgd_momentum", str(momentum)])
        model = load_defense_model(out["result"], loaded, "cpu")
        folder = os.path.dirname(out["result"])
        index = [int(i) for i in open(os.path.join(folder, "log", "index.txt")).read().split()]
        subset = TransformDataset(Subset(raw, index), test_tf)
        change = (sum(float((p - q).pow(2).sum()) for p, q in zip(model.parameters(), base.parameters()))
                  / sum(float(q.pow(2).sum()) for q in base.parameters())) ** 0.5
        acc1 = out["curve"][0]["test_acc"]
        lines.append(f"| {label} | {ratio:g} | {batch} | {lr:g} | {momentum:g} | {100 * acc1:.1f} | "
                     f"{100 * clean_acc(model, test):.1f} | {100 * clean_acc(copy.deepcopy(model), test, True):.1f} | "
                     f"{100 * clean_acc(recalibrated(model, subset), test):.1f} | {change:.4f} |")
        print(lines[-1], flush=True)
    shutil.rmtree(os.path.join(record, "defense"), ignore_errors=True)
    path = os.path.join(REPO, "benchmarks", "results", "demo_collapse.md")
    with open(path + ".tmp", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
