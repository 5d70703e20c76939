"""Editing a test's private copy of the repo (see the `repo` fixture in conftest.py).

Its own module, not conftest.py: tests/boot has a conftest too, and `from conftest import`
gets whichever of the two pytest loaded last."""

from __future__ import annotations

from pathlib import Path


def edit(path: Path, old: str, new: str) -> None:
    """Replace the first *old* in *path*; the test's expectation of the file must still hold."""
    text = path.read_text()
    assert old in text, f"test fixture out of date: {old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
