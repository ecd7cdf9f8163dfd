"""Logging for the supervisor and the shards: standard error (journald
collects it under systemd), or a file that logrotate may move away.

A moved log file is reopened on SIGUSR1 (`logrotate`'s postrotate:
`systemctl kill -s USR1 mlink`, or `kill -USR1` of the supervisor, which
passes it on to its shards). The signal handler only raises a flag; the
file is reopened by the next record written, in the thread writing it, so
a signal arriving in the middle of a write cannot close the file under it.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from types import FrameType


class ReopeningFileHandler(logging.FileHandler):
    """A FileHandler (append mode) that reopens its file at the next record
    after `request_reopen()`."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self._reopen = False

    def request_reopen(self) -> None:
        self._reopen = True  # a plain store: safe from a signal handler

    def emit(self, record: logging.LogRecord) -> None:
        if self._reopen:
            self._reopen = False
            self.acquire()
            try:
                if self.stream is not None:
                    self.stream.close()
                    # FileHandler(delay=True) opens it again in emit().
                    self.stream = None
            finally:
                self.release()
        super().emit(record)


def configure_logging(level: str, fmt: str, file: Path | None) -> None:
    """Log records at `level` and above, formatted by `fmt`, to `file`
    (reopened on SIGUSR1) or to standard error."""
    handler: logging.Handler
    if file is not None:
        reopening = ReopeningFileHandler(file)
        handler = reopening

        def on_usr1(signum: int, frame: FrameType | None) -> None:
            reopening.request_reopen()

        signal.signal(signal.SIGUSR1, on_usr1)
    else:
        handler = logging.StreamHandler(sys.stderr)
        # Nothing to reopen, but `systemctl kill -s USR1` (a logrotate
        # rule written for a file) must not end the process either.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
