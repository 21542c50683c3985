"""`ftsam retune`: the retuning attack on one result of an attack record (is the backdoor gone, or only hidden?).

    ftsam retune --result_file ./record/badnet_0_1 --defense ftsam              # P-ASR of FT-SAM's model
    ftsam retune --result_file ./record/badnet_0_1 --defense ftsam --poison_num 0   # the control: clean data only
    ftsam retune --result_file ./record/badnet_0_1 --defense none               # the backdoored model itself

Outputs in `<folder of the result>/retune/<settings tag>/` (see `ftsam_plugin.retune.runs`). A finished run with
the same key is reported, not redone (`--force` redoes it); an unfinished one (no summary.json) is run again from
the start: a run is a few epochs on 2% of the training set.
"""

from __future__ import annotations

import argparse
import os
import signal

from ftsam_plugin.lock import FolderLock
from ftsam_plugin.settings import Number, Text, check_flags, str2bool
from ftsam_plugin.signals import Stopped

from .runs import NO_DEFENSE, WEIGHTS_NAME, find_summary, load_result_model, output_dir, result_path, retune_and_save
from .settings import add_settings_arguments, given_names, settings_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--result_file", required=True,
                        help="the attack record: a name under ./record/ or a record folder")
    parser.add_argument("--defense", default="ftsam",
                        help=f"which model to attack: a folder under <record>/defense/ (ftsam (default), "
                             f"ft-baseline, BackdoorBench's ft, ft-sam, ...) or {NO_DEFENSE} (the backdoored model)")
    add_settings_arguments(parser)
    parser.add_argument("--dataset_path", default=None, help="dataset folder override passed to load_attack_result")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--eval_every", type=int, default=1,
                        help="evaluate every k epochs (default 1; before retuning and the last epoch always)")
    parser.add_argument("--eval_before", type=str2bool, default=True,
                        help="evaluate the model before retuning too (the CSV's epoch 0, O-ASR; default True)")
    parser.add_argument("--eval_batch_size", type=int, default=256, help="test-set batch size (default 256)")
    parser.add_argument("--num_workers", type=int, default=0, help="test-set data-loader workers (default 0)")
    parser.add_argument("--save_model", action="store_true", help=f"also write the retuned weights ({WEIGHTS_NAME})")
    parser.add_argument("--force", action="store_true",
                        help="run again even if a finished run with the same key exists")
    return parser


def _percent(metrics: dict) -> str:
    return " / ".join(f"{100 * metrics[k]:.2f}" for k in ("acc", "asr", "ra"))


def _report(summary: dict, folder: str, cached: bool) -> None:
    settings = summary["settings"]
    kind = "control (clean data only)" if settings["poison_num"] == 0 else f"{settings['poison_num']} poisoned samples"
    state = "finished earlier, same key (pass --force to run again)" if cached else f"{summary['seconds']:.0f} s"
    print(f"retuning attack on {summary['defense']}: {summary['retune_set']['size']} samples, {kind}, "
          f"{settings['epochs']} epochs ({state})")
    if summary["before"] is not None:
        print(f"  before  ACC / ASR / RA  {_percent(summary['before'])}")
    print(f"  after   ACC / ASR / RA  {_percent(summary['after'])}   (P-ASR {100 * summary['after']['asr']:.2f})")
    print(f"wrote {folder}")


# the flags besides the settings (RetuneSettings checks those): all checked before anything is read or written
FLAG_RULES = {"eval_every": Number(integer=True, low=1), "eval_batch_size": Number(integer=True, low=1),
              "num_workers": Number(integer=True, low=0), "dataset_path": Text(), "defense": Text("a defense name")}


def run(args: argparse.Namespace) -> int:
    import torch

    from ftsam_plugin.data.records import load_attack_result
    from ftsam_plugin.defense.ddp import resolve_device
    from ftsam_plugin.defense.locations import resolve_record

    check_flags(args, FLAG_RULES)
    settings = settings_from_args(args)
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    record_dir = os.path.abspath(resolve_record(args.result_file))
    result = result_path(record_dir, args.defense)
    folder = output_dir(result, settings)
    FolderLock(folder, what="retune folder").check()  # another run writing there: fail before loading anything
    if not args.force:
        cached = find_summary(result, record_dir, settings, args.dataset_path)
        if cached is not None and (cached.get("weights") or not args.save_model):
            _report(cached, folder, cached=True)
            return 0
    record = load_attack_result(record_dir, dataset_path=args.dataset_path, device=device)
    model = load_result_model(result, record, device)
    try:
        summary = retune_and_save(model, record, result, settings, args.defense, args.dataset_path, device,
                                  args.eval_every, args.eval_batch_size, args.num_workers, args.save_model,
                                  args.eval_before, console=True, given=given_names(args))
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the same signal's exit code (130, 143)
        raise Stopped(f"stopped; {folder} has no summary.json (unfinished): the same command runs it again from the "
                      f"start", getattr(exc, "signum", signal.SIGINT)) from None
    _report(summary, folder, cached=False)
    return 0
