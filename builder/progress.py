"""Progress and log lines: every line carries the elapsed time (and the build lane of a thread);
a long step shows a live spinner on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("sohocloud")
_plain = threading.Event()  # set while steps run in several threads: no spinner then


@contextlib.contextmanager
def plain_lines() -> Iterator[None]:
    """Steps of concurrent builds log plain lines: a spinner would overwrite the other thread's."""
    _plain.set()
    try:
        yield
    finally:
        _plain.clear()


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Announce a long step; on a TTY show a spinner until it ends, then log its duration."""
    t0 = time.monotonic()
    if sys.stderr.isatty() and not _plain.is_set():
        from rich.console import Console  # lazy: 40 ms of every command's start, needed on a terminal only

        with Console(stderr=True).status(f"{message} …", spinner="dots"):
            yield
    else:
        log.info("%s …", message)
        yield
    log.info("%s: done in %.1f s", message, time.monotonic() - t0)


class Elapsed(logging.Formatter):
    """`[  12.3s] [arm64] message`: seconds since start; lines of a build lane (a thread) say which."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        thread = threading.current_thread()
        lane = "" if thread is threading.main_thread() else f"[{thread.name}] "
        return f"[{time.monotonic() - self.t0:6.1f}s] {lane}{level}{msg}"


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Elapsed())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
