"""The one way this package runs a program: argv only (never a shell, never a secret in argv),
output captured, a time limit, and a failure as RuntimeError naming the program and its last words."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

Run = Callable[..., subprocess.CompletedProcess]


def run(argv: list[str], *, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''}: no answer within {timeout:.0f} s") from e
    except OSError as e:
        raise RuntimeError(f"{argv[0]}: {e.strerror}") from e
    if check and p.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-300:]}")
    return p
