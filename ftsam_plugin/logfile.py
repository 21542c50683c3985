"""Log files that never hide a run's own error.

A plain `logging.FileHandler` on a full disk prints a `--- Logging error ---` traceback for every record, and its
`close()` raises inside the `finally` that closes it, replacing the error the run was reporting. `LogFile` reports
a failed write once, as one `warning:` line on stderr, then logs to the console only; its `close()` never raises.
"""

from __future__ import annotations

import logging
import sys

from ftsam_plugin.errors import FtsamError

__all__ = ["LogFile"]


class LogFile(logging.FileHandler):
    """A `logging.FileHandler` (UTF-8) for `path` that stops, with one warning line, when a write fails.

    Args:
        path: the log file.
        mode: "a" (append, default) or "w".
        fix: the fix named when the file cannot be created (e.g. "pass --log elsewhere").

    Raises:
        FtsamError: the file cannot be created.
    """

    def __init__(self, path: str, mode: str = "a", fix: str = "fix the folder's permissions"):
        try:
            super().__init__(path, mode=mode, encoding="utf-8")
        except OSError as exc:
            raise FtsamError(f"cannot write log file {path}: {exc.strerror or exc}; {fix}") from None
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)  # a formatting bug: logging's own report
        self._fail(error)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as error:
            self._fail(error)

    def _fail(self, error: OSError) -> None:
        if not self.failed:
            self.failed = True
            print(f"warning: cannot write log file {self.baseFilename} ({error.strerror or error}: disk full or not "
                  f"writable); logging to the console only", file=sys.stderr)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the unwritten tail is lost; the run's own error, if any, is what gets reported
            self.stream = None
