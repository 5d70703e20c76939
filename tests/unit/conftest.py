"""Shared by the tier-1 tests that edit the repository's data: a private copy to break."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A private copy of the repo's data (profiles, images, overlays, firstboot)."""
    root = tmp_path / "repo"
    for name in ("profiles", "images", "overlays", "firstboot"):
        if (REPO_ROOT / name).exists():
            shutil.copytree(REPO_ROOT / name, root / name, symlinks=True)
    return root
