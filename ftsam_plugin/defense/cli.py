"""`ftsam defend`: run FT-SAM (default) or the FT baseline on an attack record.

Takes the defense class's flags (BackdoorBench's spelling: --result_file, --yaml_path, --dataset_path, --device, ...)
plus --defense and --resume. Works outside a BackdoorBench checkout, on a record made by `ftsam attack`.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .ftsam import DEFENSES, FTSAM

    parser.add_argument("--defense", choices=sorted(DEFENSES), default=FTSAM.name,
                        help="ftsam (default) or ft-baseline (same pipeline, plain optimizer)")
    FTSAM.add_arguments(parser)  # both classes share the flag set
    return parser


def run(args: argparse.Namespace) -> int:
    from .ftsam import DEFENSES

    cls = DEFENSES[getattr(args, "defense", None) or "ftsam"]
    opts = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("defense", "debug", "command")})
    defense = cls(opts)
    defense.defense(opts.result_file)
    return 0
