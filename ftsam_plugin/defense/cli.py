"""`ftsam defend` (and `python -m ftsam_plugin.defense.ftsam`): run FT-SAM (default) or the FT baseline on a record.

Takes the defense classes' flags (BackdoorBench's spelling: --result_file, --yaml_path, --dataset_path, --device, ...)
plus --defense and --resume. Works outside a BackdoorBench checkout, on a record made by `ftsam attack`.
"""

from __future__ import annotations

import argparse

from .config import add_arguments as add_defense_arguments
from .registry import DEFAULT_DEFENSE, DEFENSES

__all__ = ["add_arguments", "run", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--defense", choices=sorted(DEFENSES), default=DEFAULT_DEFENSE,
                        help="ftsam (default) or ft-baseline (same pipeline, plain optimizer)")
    add_defense_arguments(parser)  # every defense class's add_arguments: one shared flag set
    return parser


def run(args: argparse.Namespace) -> int:
    cls = DEFENSES[getattr(args, "defense", None) or DEFAULT_DEFENSE]
    opts = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("defense", "debug", "command")})
    defense = cls(opts)
    defense.defense(opts.result_file)
    return 0


def main(argv=None, prog: str = "python -m ftsam_plugin.defense.ftsam") -> int:
    """The standalone script: the same flags and error handling as `ftsam defend`."""
    from ftsam_plugin.cli import run_reporting_errors

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    add_arguments(parser)
    return run_reporting_errors(run, parser.parse_args(argv))
