"""Tier 1: each service's exposure measured on a tree (builder/image/exposure.py), with the host's real
systemd-analyze (the same systemd as the images), on small trees made here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builder.errors import SohoError
from builder.image import exposure

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (make deps)")

BARE = "[Service]\nExecStart=/usr/bin/true\n"


def tree(tmp_path: Path, units: dict[str, str]) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/true").write_text("")
    for name, text in units.items():
        (root / "usr/lib/systemd/system" / name).write_text(text)
    sandbox = root / exposure.SANDBOX
    sandbox.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "overlays/hardened" / exposure.SANDBOX, sandbox)
    return root


def test_parse_overall() -> None:
    assert exposure.parse_overall("→ Overall exposure level for dnsmasq.service: 3.4 OK 🙂\n") == 3.4
    assert exposure.parse_overall("Unit x.service not found.") is None


def test_the_common_sandbox_lowers_a_bare_service(tmp_path: Path) -> None:
    root = tree(tmp_path, {"a.service": BARE, "b.service": BARE})
    bare = exposure.measure(root, "a.service")
    exposure.install_sandbox(root, ("b.service",))
    assert (root / f"usr/lib/systemd/system/b.service.d/{exposure.SANDBOX_DROPIN}").is_file()
    sandboxed = exposure.measure(root, "b.service")
    assert bare >= 9.0 and sandboxed <= bare - 2.0, (bare, sandboxed)


def test_a_service_above_its_declared_level_fails_the_build(tmp_path: Path) -> None:
    root = tree(tmp_path, {"a.service": BARE, "b.service": BARE})
    exposure.install_sandbox(root, ("b.service",))
    level = exposure.measure(root, "b.service")
    assert exposure.check(root, "r", ("b.service",), {"b.service": level}) == {"b.service": level}
    with pytest.raises(SohoError) as ei:
        exposure.check(root, "r", ("a.service", "b.service"), {"a.service": level, "b.service": level})
    msg = str(ei.value)
    assert "role r: services.exposure: a.service measures" in msg and f"over the {level:.1f} declared" in msg
    assert "b.service" not in msg


def test_a_missing_unit_is_named(tmp_path: Path) -> None:
    root = tree(tmp_path, {})
    with pytest.raises(SohoError, match="cannot measure nosuch.service"):
        exposure.measure(root, "nosuch.service")


def test_sandbox_needs_its_file(tmp_path: Path) -> None:
    root = tree(tmp_path, {"a.service": BARE})
    (root / exposure.SANDBOX).unlink()
    with pytest.raises(SohoError, match="no /usr/lib/sohocloud/sandbox.conf"):
        exposure.install_sandbox(root, ("a.service",))


def test_systemd_major_of_both_spellings() -> None:
    assert exposure.systemd_major("systemd 252 (252.38-1~deb12u1)\n+PAM +AUDIT") == 252
    assert exposure.systemd_major("252.38-1~deb12u1") == 252
    assert exposure.systemd_major("257~rc3-1") == 257
    assert exposure.systemd_major("") is None


def test_an_image_of_another_systemd_release_is_refused(tmp_path: Path) -> None:
    """Each release scores sandboxes its own way: a level declared for the images' systemd cannot be
    checked by another one's systemd-analyze."""
    root = tree(tmp_path, {"a.service": BARE})
    host = exposure.systemd_major(exposure.run(["systemd-analyze", "--version"], capture=True).stdout)
    with pytest.raises(SohoError, match=f"the image has systemd 999.1-1 but this host's systemd-analyze is {host}"):
        exposure.check(root, "r", ("a.service",), {"a.service": 10.0}, "999.1-1")
    assert exposure.check(root, "r", ("a.service",), {"a.service": 10.0}, f"{host}.1-1")
