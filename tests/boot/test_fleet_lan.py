"""Tier 3 (first part): `fleet build/up/ssh/down` on a site's private LAN namespace.

Only the roles that exist so far take part (the router); the namespace,
taps, seeds by MAC, persistence of node disks, the commands, and that `fleet up`
boots what `fleet build` recorded (not what the profiles say now) are what is under
test here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bootkit import REPO, write_router_site  # tests/boot is on sys.path (prepend import mode)

pytestmark = pytest.mark.boot


def cli(*args: str, timeout: float = 900, repo: Path = REPO) -> subprocess.CompletedProcess[str]:
    """sohocloud ARGS, its data (profiles/, images/, ...) from *repo* (SOHOCLOUD_REPO)."""
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, SOHOCLOUD_REPO=str(repo)))


def edited_repo(work: Path) -> Path:
    """The repository's data as it might be after `fleet build`: the router's profile broken (it
    no longer even loads) and the qemu target naming a QEMU that does not exist. A `fleet up`
    that resolved profiles or read images/*.yaml again would fail or boot something else."""
    repo = work / "edited-repo"
    repo.mkdir()
    for entry in ("overlays", "firstboot", "sites"):
        (repo / entry).symlink_to(REPO / entry)
    shutil.copytree(REPO / "profiles", repo / "profiles")
    shutil.copytree(REPO / "images", repo / "images")
    with open(repo / "profiles/router.yaml", "a") as f:
        f.write("\nedited_after_the_build: true\n")
    qemu = repo / "images/qemu.yaml"
    qemu.write_text(qemu.read_text().replace("binary: qemu-system-x86_64", "binary: /nonexistent/qemu-edited"))
    return repo


def netns_exists(name: str) -> bool:
    return name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


@pytest.fixture(scope="module")
def tiny_site(router_image, test_key, tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    site = write_router_site(d / "fleettest.yaml", "fleettest", test_key.with_suffix(".pub"), net="10.46.0")
    out = d / "out"
    out.mkdir()
    # the image built by this run, reused (each image is built once per run)
    for f in router_image.parent.glob(router_image.name + "*"):
        os.link(f, out / f.name)
    (out / "SHA256SUMS").write_text((router_image.parent / "SHA256SUMS").read_text())
    r = cli("fleet", "build", str(site), "-o", str(out), "--secrets", str(d / "secrets"))
    assert r.returncode == 0, r.stderr
    yield site, out
    cli("fleet", "down", str(site), "-o", str(out))


def test_fleet_up_ssh_down(tiny_site, test_key):
    site, out = tiny_site
    r = cli("fleet", "up", str(site), "-o", str(out))
    assert r.returncode == 0, r.stderr + (out / "fleettest/run/gw.console.log").read_text(errors="replace")[-3000:]
    assert "gw\tup" in r.stdout
    assert netns_exists("sc-fleettest")
    # the host namespace holds nothing of the site LAN
    host_addrs = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
    assert "10.46.0." not in host_addrs
    r = cli("fleet", "ssh", str(site), "gw", "-o", str(out), "-i", str(test_key), "--",
            "hostname; ip -br addr show lan; cat /etc/dnsmasq.d/60-site-hosts.conf; cat /sys/class/net/lan/address")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "gw"
    assert "10.46.0.1/24" in r.stdout
    assert "52:54:00:46:00:01" in lines[-1]  # the seed named the site MAC's NIC 'lan'
    # a second `up` while running is refused
    r = cli("fleet", "up", str(site), "-o", str(out))
    assert r.returncode == 2 and "already up" in r.stderr
    r = cli("fleet", "down", str(site), "-o", str(out))
    assert r.returncode == 0 and "stopped gw" in r.stdout
    assert not netns_exists("sc-fleettest")
    time.sleep(0.5)
    assert "sc-fleettest" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    # ssh to a node of a site that is down: a clear error
    r = cli("fleet", "ssh", str(site), "gw", "-o", str(out), "--", "true")
    assert r.returncode == 2 and "not up" in r.stderr
    assert (out / "fleettest/run/gw.qcow2").is_file()  # the node's disk stays for the next `up`
    # The profiles and targets change after `fleet build` (here: the router's profile no longer
    # loads, the qemu target names another QEMU): `fleet up` still boots what was built, as built.
    edited = edited_repo(site.parent)
    assert cli("build", "router", "-o", str(out / "probe"), repo=edited).returncode == 2  # it really is broken
    # up again: a reboot of the same disk (firstboot already done, same host key)
    r = cli("fleet", "up", str(site), "-o", str(out), repo=edited)
    assert r.returncode == 0, r.stderr
    booted = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "qemu-system-x86_64" in booted and "/nonexistent/qemu-edited" not in booted
    record = json.loads((out / "fleettest/site.json").read_text())
    assert record["nodes"][0]["image"]["path"] == "router-debian-amd64-qemu.qcow2"
    r = cli("fleet", "ssh", str(site), "gw", "-o", str(out), "-i", str(test_key), "--",
            "hostname; sudo -n journalctl -b -u sohocloud-firstboot --no-pager | grep -c 'already done'")
    assert r.returncode == 0, r.stderr  # known_hosts from the first boot still matches
    assert r.stdout.split() == ["gw", "1"], r.stdout
    assert cli("fleet", "down", str(site), "-o", str(out)).returncode == 0
    # A record that no longer matches what it names, or none at all: fleet up says to run fleet build.
    site.write_text(site.read_text() + "# edited after fleet build\n")
    r = cli("fleet", "up", str(site), "-o", str(out))
    assert r.returncode == 2 and "changed since `fleet build`" in r.stderr and "fleet build" in r.stderr, r.stderr
    (out / "fleettest/site.json").unlink()
    r = cli("fleet", "up", str(site), "-o", str(out))
    assert r.returncode == 2 and "run `sohocloud fleet build" in r.stderr, r.stderr
    assert not netns_exists("sc-fleettest")
