"""Why FT and FT-SAM first destroyed the demo's model at the old demo setting (lr 0.01, issue 18): a diagnosis.

    .venv/bin/python benchmarks/demo_collapse.py                  # ~2 min, one thread: measure, then the report
    .venv/bin/python benchmarks/demo_collapse.py --report_only    # the report from benchmarks/results/demo_collapse.json

On the demo sweep's seed-0 record (made by `benchmarks/demo_sweep.py`; made here if missing), one thread:
  1. the backdoored model's clean ACC in eval mode, and after re-estimating its BatchNorm statistics on the clean
     training images alone (no weight changes): how much its running statistics owe to the poisoned batches;
  2. two epochs of FT (`ftsam defend` through the demo's `run_defense`) at several settings, then the clean ACC
     in eval mode (running statistics), in train mode (each test batch's own statistics) and after re-estimating
     BN on the defense's clean subset, plus the relative weight change ||w - w0|| / ||w0||.
The measurements go to benchmarks/results/demo_collapse.json (with the commit and machine); demo_collapse.md is
generated from that file alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from datetime import datetime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from ftsam_plugin.provenance import git_commit, machine, machine_short  # noqa: E402

DATA = os.path.join(REPO, "benchmarks", "results", "demo_collapse.json")
REPORT = os.path.join(REPO, "benchmarks", "results", "demo_collapse.md")
# (label, clean ratio, batch, lr, momentum): the old demo default first, then the levers (lr 0.003 was the next
# default for a while; today's is lr 0.002, see ftsam_plugin/demo.py)
SETTINGS = (("old demo default", 0.1, 32, 0.01, 0.9), ("momentum 0", 0.1, 32, 0.01, 0.0),
            ("lr 0.003, ratio 0.2", 0.2, 32, 0.003, 0.9), ("lr 0.001", 0.1, 32, 0.001, 0.9))
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


def measure() -> dict:
    """The diagnosis on the sweep's seed-0 record: the data file's content."""
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
    out = {"source": "measured by benchmarks/demo_collapse.py", "when": f"{datetime.now():%Y-%m-%d %H:%M}",
           "commit": git_commit(REPO), "machine": machine(1), "machine_text": machine_short(1),
           "clean_test": len(test), "clean_train": len(raw), "epochs": EPOCHS,
           "backdoored": {"eval_acc": clean_acc(base, test),
                          "bn_reestimated_acc": clean_acc(recalibrated(base, TransformDataset(raw, test_tf)), test)},
           "settings": []}
    for label, ratio, batch, lr, momentum in SETTINGS:
        shutil.rmtree(os.path.join(record, "defense"), ignore_errors=True)
        run = demo.run_defense("ft-baseline", record, EPOCHS, ratio, None, "cpu", 0, eval_every=1, batch_size=batch,
                               lr=lr, extra=["--sgd_momentum", str(momentum)])
        model = load_defense_model(run["result"], loaded, "cpu")
        folder = os.path.dirname(run["result"])
        index = [int(i) for i in open(os.path.join(folder, "log", "index.txt")).read().split()]
        subset = TransformDataset(Subset(raw, index), test_tf)
        change = (sum(float((p - q).pow(2).sum()) for p, q in zip(model.parameters(), base.parameters()))
                  / sum(float(q.pow(2).sum()) for q in base.parameters())) ** 0.5
        out["settings"].append({"label": label, "ratio": ratio, "batch": batch, "lr": lr, "momentum": momentum,
                                "acc_epoch1": run["curve"][0]["test_acc"], "acc_eval": clean_acc(model, test),
                                "acc_train_mode": clean_acc(copy.deepcopy(model), test, True),
                                "acc_bn_reestimated": clean_acc(recalibrated(model, subset), test),
                                "weight_change": change})
        print(out["settings"][-1], flush=True)
    shutil.rmtree(os.path.join(record, "defense"), ignore_errors=True)
    return out


def render(data: dict) -> str:
    """The report, from the data file alone."""
    bd = data["backdoored"]
    lines = ["# Why the demo's defenses first destroyed the model at lr 0.01", "",
             "- Generated by `benchmarks/demo_collapse.py --report_only` from [`demo_collapse.json`](demo_collapse.json)"
             f"; source: {data['source']}; measured {data['when']}, commit {data['commit']}, machine: "
             f"{data['machine_text']}.",
             "- Record: the demo sweep's seed-0 record (offline digits, Blended, PreAct-ResNet18 width 0.25, 15 epochs, "
             f"10% poison); clean test set of {data['clean_test']} images.", "",
             "## The backdoored model", "",
             f"- clean ACC, eval mode (its running BN statistics): {100 * bd['eval_acc']:.1f}%",
             f"- after re-estimating BN on the {data['clean_train']:,} clean training images only: "
             f"{100 * bd['bn_reestimated_acc']:.1f}%", "",
             f"## {data['epochs']} epochs of FT, then", "",
             "| setting | ratio | batch | lr | momentum | ACC epoch 1 | ACC epoch 2, eval mode | train mode (batch "
             "statistics) | BN re-estimated on the clean subset | ‖w − w0‖ / ‖w0‖ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["settings"]:
        lines.append(f"| {r['label']} | {r['ratio']:g} | {r['batch']} | {r['lr']:g} | {r['momentum']:g} | "
                     f"{100 * r['acc_epoch1']:.1f} | {100 * r['acc_eval']:.1f} | {100 * r['acc_train_mode']:.1f} | "
                     f"{100 * r['acc_bn_reestimated']:.1f} | {r['weight_change']:.4f} |")
    return "\n".join(lines + data.get("notes", [])) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report_only", action="store_true", help="rewrite the report from its data file")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(DATA) as handle:
            data = json.load(handle)
    else:
        data = measure()
        with open(DATA + ".tmp", "w") as handle:
            json.dump(data, handle, indent=1, ensure_ascii=False)
            handle.write("\n")
        os.replace(DATA + ".tmp", DATA)
    with open(REPORT + ".tmp", "w") as handle:
        handle.write(render(data))
    os.replace(REPORT + ".tmp", REPORT)
    print(f"report: {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
