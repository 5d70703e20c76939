"""The image's AIDE baseline, made by the host's aide over a tree (real aide, a small tree)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from builder.errors import SohoError
from builder.image import integrity

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "overlays/hardened/etc/aide/aide.conf"

needs_aide = pytest.mark.skipif(shutil.which("aide") is None, reason="aide not installed (make deps)")


def test_upstream_version():
    assert integrity.upstream_version("0.18.3-1+deb12u5") == "0.18.3"
    assert integrity.upstream_version("1:3.0.9-1") == "3.0.9"


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/aide").write_text("")  # the image has aide (which binary does not matter here)
    (root / "usr/bin/tool").write_text("as built\n")
    (root / "etc/aide").mkdir(parents=True)
    shutil.copy(CONF, root / "etc/aide/aide.conf")
    (root / "etc/hostname").write_text("written at first boot, not watched\n")
    return root


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["aide", "--config", str(root / integrity.CONFIG), "--check",
                           "-B", f"root_prefix={root}", "-B", f"database_in=file:{root / integrity.DATABASE}"],
                          capture_output=True, text=True)


@needs_aide
def test_the_baseline_matches_the_tree_and_catches_a_changed_file(tmp_path):
    root = _tree(tmp_path)
    assert integrity.wanted(root)
    n = integrity.record_baseline(root, f"{integrity.host_aide_version()}-1")
    db = root / integrity.DATABASE
    assert n >= 4 and (db.stat().st_mode & 0o777) == 0o600
    assert not list(db.parent.glob("*.tmp"))
    assert _check(root).returncode == 0
    (root / "etc/hostname").write_text("changed\n")
    assert _check(root).returncode == 0  # not watched
    (root / "usr/bin/tool").write_text("replaced by someone\n")
    (root / "usr/bin/new").write_text("dropped in\n")
    r = _check(root)
    assert r.returncode & 1 and r.returncode & 4, r.stdout  # added and changed
    assert "/usr/bin/tool" in r.stdout and "/usr/bin/new" in r.stdout


@needs_aide
def test_another_aide_version_is_refused_before_writing(tmp_path):
    root = _tree(tmp_path)
    with pytest.raises(SohoError, match="the image has aide 0.1.0 but the build host has aide"):
        integrity.record_baseline(root, "0.1.0-1")
    assert not (root / integrity.DATABASE).exists()


def test_a_tree_without_aide_gets_no_baseline(tmp_path):
    assert not integrity.wanted(tmp_path)
