"""Stop signals: SIGTERM (what Slurm and Kubernetes send first) is treated like Ctrl-C (SIGINT).

A command stopped by signal N ends with `interrupted: <message>` and exit code 128 + N (130 for SIGINT, 143 for
SIGTERM), as a shell reports it. `sigterm_as_interrupt()` makes SIGTERM raise `Stopped` like Ctrl-C raises
KeyboardInterrupt, so atomic writes clean up their temp files; long runs catch both signals themselves to stop at
a checkpoint. A process started with SIGINT ignored (a shell's background job, `nohup`) would not see Ctrl-C's
KeyboardInterrupt at all: while active, SIGINT raises it there too, as `defend`'s own handler already stops there.
DataLoader workers ignore both (`ignore_in_worker`): only the main process decides.
"""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["STOP_SIGNALS", "Stopped", "exit_code", "sigterm_as_interrupt", "ignore_in_worker"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal; the message says what was kept and how to continue."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number (a plain KeyboardInterrupt is SIGINT's)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def _raise_stopped(signum, frame):
    raise Stopped(f"stopped by {signal.Signals(signum).name}", signum)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While active (main thread only), SIGTERM raises `Stopped(signum=SIGTERM)`, and SIGINT raises
    KeyboardInterrupt even where the process started with SIGINT ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_stopped)}
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a signal sent to the whole process group is the main process's to handle."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
