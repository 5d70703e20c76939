"""Progress for long steps: a live spinner with elapsed time on a terminal, plain log lines elsewhere."""

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
        from rich.console import Console

        with Console(stderr=True).status(f"{message} …", spinner="dots"):
            yield
    else:
        log.info("%s …", message)
        yield
    log.info("%s: done in %.1f s", message, time.monotonic() - t0)
