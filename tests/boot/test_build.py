"""Tier 2: the build itself through the CLI: caching, --no-cache, interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.image.cache import StageCache
from bootkit import OUT, REPO, write_router_site  # tests/boot is on sys.path (prepend import mode)

pytestmark = pytest.mark.boot


def cli(*args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    return r, time.monotonic() - t0


def package_cache_listing() -> dict[str, float]:
    debs = StageCache().root / "packages" / "debian-bookworm-amd64" / "debs"
    return {p.name: p.stat().st_mtime for p in debs.glob("*.deb")}


def test_noop_rebuild_is_fast_and_says_reused(router_image):
    r, seconds = cli("build", "router", "-o", str(OUT))
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stderr and "reused" in r.stderr, r.stderr
    assert seconds < 5, f"no-op rebuild took {seconds:.1f} s"


def test_explain_names_the_changed_input(router_image, tmp_path):
    overlay_file = REPO / "overlays/router/etc/sohocloud/dnsmasq-upstream.conf"
    original = overlay_file.read_text()
    out = tmp_path / "out"
    cli("build", "router", "-o", str(out))
    try:
        overlay_file.write_text(original + "# test edit\n")
        r, seconds = cli("build", "router", "-o", str(out), "--explain")
    finally:
        overlay_file.write_text(original)
    assert r.returncode == 0, r.stderr
    assert "customise:overlay:router" in r.stderr, r.stderr
    assert "rootfs: reused cache" in r.stderr  # an overlay edit does not rerun mmdebstrap
    assert seconds < 30, f"overlay-edit rebuild took {seconds:.1f} s"


def test_no_cache_rebuilds_every_stage_without_downloading(router_image, tmp_path):
    before = package_cache_listing()
    assert before, "the package cache should hold the router's .debs by now"
    r, _ = cli("build", "router", "-o", str(tmp_path / "out"), "--no-cache")
    assert r.returncode == 0, r.stderr
    assert "rootfs: built" in r.stderr and "bootfiles: built" in r.stderr, r.stderr
    assert package_cache_listing() == before  # no .deb fetched or replaced


def test_interrupted_build_leaves_nothing_behind(router_image, tmp_path):
    out = tmp_path / "out"
    stage_tmp = list((StageCache().root / "stages" / "rootfs").glob(".*"))
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "build", "router", "-o", str(out), "--no-cache"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    time.sleep(8)  # inside mmdebstrap by now
    assert proc.poll() is None, proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (out / "router-debian-amd64-qemu.qcow2").exists()
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert not [n for n in leftovers if n.endswith(".tmp") or n.startswith(".")], leftovers
    assert list((StageCache().root / "stages" / "rootfs").glob(".*")) == stage_tmp, err
    mounts = Path("/proc/mounts").read_text()
    assert "mmdebstrap" not in mounts and str(StageCache().tmp) not in mounts


def test_fleet_build_secrets_once_and_seeds(router_image, tmp_path, test_key):
    site = write_router_site(tmp_path / "tiny.yaml", "tiny", test_key.with_suffix(".pub"))
    secrets = tmp_path / "secrets"
    r, _ = cli("fleet", "build", str(site), "-o", str(OUT), "--secrets", str(secrets))
    assert r.returncode == 0, r.stderr
    seed = OUT / "tiny" / "seeds" / "gw.img"
    assert seed.is_file() and (seed.stat().st_mode & 0o777) == 0o600
    assert "up to date" in r.stderr  # the router image is built once per run, here reused
    ca = (secrets / "tiny" / "ca.crt").read_bytes()
    for p in (secrets / "tiny").rglob("*"):
        assert (p.stat().st_mode & 0o777) == (0o700 if p.is_dir() else 0o600), p
    r, _ = cli("fleet", "build", str(site), "-o", str(OUT), "--secrets", str(secrets))
    assert r.returncode == 0 and (secrets / "tiny" / "ca.crt").read_bytes() == ca  # generated once
    assert "PRIVATE KEY" not in r.stderr + r.stdout


def test_fleet_build_rejects_k3s_without_artifacts(tmp_path, test_key):
    site = write_router_site(tmp_path / "k.yaml", "k", test_key.with_suffix(".pub"),
                             extra="cluster: {engine: k3s}\n")
    r, seconds = cli("fleet", "build", str(site), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "engine k3s needs cluster.k3s" in r.stderr and "k.yaml:5" in r.stderr
    assert seconds < 5 and not (tmp_path / "out").exists()
