"""The `ftsam` command: one sub-command per module, each exposing `add_arguments(parser)` and `run(args)`.

Errors of type FtsamError become one line on stderr and exit code 2; `--debug` shows the traceback.
"""
import argparse
import importlib
import sys

from .errors import FtsamError

# sub-command -> (module, one-line help). Modules are imported lazily so `ftsam --help` is fast.
COMMANDS = {
    "attack": ("ftsam_plugin.attacks.cli", "train a backdoored model and write a BackdoorBench attack record"),
    "defend": ("ftsam_plugin.defense.cli", "run FT-SAM (or the FT baseline) on an attack record"),
    "demo": ("ftsam_plugin.demo", "make a backdoored model and defend it with FT and FT-SAM, side by side"),
    "leaderboard": ("ftsam_plugin.leaderboard", "tabulate every attack record and defense result under record roots"),
    "norms": ("ftsam_plugin.norms", "per-neuron weight norm vs trigger-activated change, for several models"),
}


def build_parser(argv):
    parser = argparse.ArgumentParser(prog="ftsam", description="FT-SAM backdoor defense, a BackdoorBench plugin.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        if name == wanted:  # only import the module that will run
            try:
                importlib.import_module(module).add_arguments(p)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = COMMANDS[args.command][0]
    try:
        return importlib.import_module(module).run(args) or 0
    except FtsamError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
