"""Ctrl-C during a defense run: stop cleanly after the current epoch's checkpoint (and a test-only pause hook)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

__all__ = ["Interrupted", "StopOnSigint", "ignore_sigint", "test_pause"]

logger = logging.getLogger("ftsam_plugin.defense")


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT after an epoch's checkpoint; the message names it and `--resume` (exit code 130)."""


class StopOnSigint:
    """While active, the first SIGINT only sets `requested`: the run finishes the current epoch (training, its
    evaluation if due, CSV row, checkpoint) and then stops; a second SIGINT interrupts at once (the last written
    checkpoint stays). A no-op outside the main thread; only the process that installed it prints (forked
    DataLoader workers inherit the handler)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if os.getpid() == self._pid:
            logger.warning("SIGINT: stopping after this epoch's checkpoint (press Ctrl-C again to abort at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def ignore_sigint(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C goes to the whole process group; only the main process handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
