"""Tier 3 (first part): `fleet build/up/ssh/down` on a site's private LAN namespace.

Only the roles that exist so far take part (the router); the namespace,
taps, seeds by MAC, persistence of node disks and the commands are what is
under test here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from bootkit import REPO, write_router_site  # tests/boot is on sys.path (prepend import mode)

pytestmark = pytest.mark.boot


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


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
    # up again: a reboot of the same disk (firstboot already done, same host key)
    r = cli("fleet", "up", str(site), "-o", str(out))
    assert r.returncode == 0, r.stderr
    r = cli("fleet", "ssh", str(site), "gw", "-o", str(out), "-i", str(test_key), "--",
            "hostname; sudo -n journalctl -b -u sohocloud-firstboot --no-pager | grep -c 'already done'")
    assert r.returncode == 0, r.stderr  # known_hosts from the first boot still matches
    assert r.stdout.split() == ["gw", "1"], r.stdout
    assert cli("fleet", "down", str(site), "-o", str(out)).returncode == 0
