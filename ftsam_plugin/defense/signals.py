"""Ctrl-C or SIGTERM during a defense run: stop cleanly after the current epoch's checkpoint (and a test-only pause
hook). SIGTERM is what Slurm and Kubernetes send before they kill a job; both signals are handled alike."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from ftsam_plugin.signals import STOP_SIGNALS, Stopped, ignore_in_worker

__all__ = ["Interrupted", "StopOnSigint", "ignore_sigint", "test_pause"]

logger = logging.getLogger("ftsam_plugin.defense")

ignore_sigint = ignore_in_worker  # DataLoader worker_init_fn (the name it had before SIGTERM was handled too)


class Interrupted(Stopped):
    """A run stopped by SIGINT/SIGTERM after an epoch's checkpoint; the message names it and `--resume` (exit code
    128 + the signal: 130, 143)."""


class StopOnSigint:
    """While active, the first SIGINT or SIGTERM only sets `requested` (and `signum`): the run finishes the current
    epoch (training, its evaluation if due, CSV row, checkpoint) and then stops; a second one interrupts at once
    (the last written checkpoint stays). A no-op outside the main thread; only the process that installed it prints
    (forked DataLoader workers inherit the handler)."""

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGINT
        self._previous = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: at once
            raise Interrupted(f"stopped at once by a second {signal.Signals(signum).name}; the last written "
                              f"checkpoint is kept; continue with the same command plus --resume", signum)
        self.requested, self.signum = True, signum
        if os.getpid() == self._pid:
            logger.warning("%s: stopping after this epoch's checkpoint (send it again to abort at once)",
                           signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False


def test_pause(epoch: int, step: int, stop) -> None:
    """TEST-ONLY hook: with FTSAM_TEST_PAUSE="EPOCH:STEP:MARKER", the run creates the file MARKER and waits (until
    killed, or until a SIGINT makes it stop) after step STEP of epoch EPOCH (STEP 0: at the epoch's start, after
    the previous epoch's checkpoint). Lets tests kill a run at an exact point; not meant for users."""
    spec = os.environ.get("FTSAM_TEST_PAUSE")
    if not spec:
        return
    want_epoch, want_step, marker = spec.split(":", 2)
    if (int(want_epoch), int(want_step)) != (epoch, step):
        return
    with open(marker, "w"):
        pass
    while not (stop is not None and stop.requested):
        time.sleep(0.02)


test_pause.__test__ = False  # not a pytest test, whatever imports it
