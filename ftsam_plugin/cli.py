"""The `ftsam` command: one sub-command per module, each exposing `add_arguments(parser)` and `run(args)`.

Errors of type FtsamError become one line on stderr and exit code 2; an interrupted run (Ctrl-C or SIGTERM) exits
with 128 + the signal number (130, 143) after one line saying how to resume. Anything else is a bug or a failure
nobody foresaw: a write that failed (disk full, not writable) still becomes its one line and exit code 2, any other
exception one `error:` line naming it, "run with --debug for the traceback", and exit code 1. `--debug` shows the
traceback in every case.
"""
import argparse
import errno
import importlib
import sys

from .errors import FtsamError
from .signals import exit_code, sigterm_as_interrupt

# sub-command -> (module, one-line help). Modules are imported lazily so `ftsam --help` is fast.
COMMANDS = {
    "attack": ("ftsam_plugin.attacks.cli", "train a backdoored model and write a BackdoorBench attack record"),
    "defend": ("ftsam_plugin.defense.cli", "run FT-SAM (or the FT baseline) on an attack record"),
    "demo": ("ftsam_plugin.demo", "make a backdoored model and defend it with FT and FT-SAM, side by side"),
    "leaderboard": ("ftsam_plugin.leaderboard", "tabulate every attack record and defense result under record roots"),
    "norms": ("ftsam_plugin.norms", "per-neuron weight norm vs trigger-activated change, for several models"),
    "retune": ("ftsam_plugin.retune.cli", "retuning attack: does the backdoor of a defended model come back (P-ASR)?"),
    "grid": ("ftsam_plugin.grid.cli", "run a grid of defenses (records x settings x seeds) on Slurm or here; --status"),
}


MAX_LINE = 300  # characters of an unexpected exception's message


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
    return run_reporting_errors(importlib.import_module(COMMANDS[args.command][0]).run, args)


def run_reporting_errors(run, args) -> int:
    """`run(args)` with the CLI's error contract: FtsamError (and a failed write) -> `error: ...` and 2, Ctrl-C /
    SIGTERM -> `interrupted: ...` and 130 / 143, any other exception -> `error: unexpected ...; run with --debug for
    the traceback` and 1, each one line (`args.debug` re-raises for the traceback)."""
    try:
        with sigterm_as_interrupt():
            return run(args) or 0
    except FtsamError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        print(f"interrupted: {one_line(exc)}" if str(exc) else "interrupted", file=sys.stderr)
        return exit_code(exc)
    except Exception as exc:  # the last resort: one line, never a traceback (unless --debug)
        if args.debug:
            raise
        from .io import DISK_FULL, write_error  # (torch: imported only when needed, `ftsam --help` stays fast)

        path = getattr(exc, "filename", None)
        error = write_error(path, exc) if path and getattr(exc, "errno", None) in (*DISK_FULL, errno.EROFS) else None
        if error is not None:
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 2
        what = "out of memory" if isinstance(exc, MemoryError) else f"unexpected {type(exc).__name__}"
        print(f"error: {what}: {one_line(exc)[:MAX_LINE]}; run with --debug for the traceback", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """The message on one line. An FtsamError re-raised from a DataLoader worker carries the worker's traceback
    in its message; its last line holds the original message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    last = lines[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else " ".join(lines)


if __name__ == "__main__":
    sys.exit(main())
