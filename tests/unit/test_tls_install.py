"""Tier 1: a node takes a renewed key and certificate (`fleet renew` -> sohocloud-tls-install) in a
fake root: the site CA's pair for this node is installed whole and the role's tls.d hooks run;
anything else is refused with nothing changed and no key material shown."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder.fleet.secrets import issue_cert, make_ca

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "overlays/site-node/usr/lib/sohocloud/sohocloud-tls-install"
CONTROL_HOOK = REPO / "overlays/control/usr/lib/sohocloud/tls.d/40-control"


@pytest.fixture(scope="module")
def ca():
    return make_ca("sohocloud test site CA")


@pytest.fixture
def node(tmp_path: Path, ca):
    root = tmp_path / "root"
    tls = root / "etc/sohocloud/tls"
    tls.mkdir(parents=True)
    (root / "etc/hostname").write_text("ctl\n")
    (root / "etc/group").write_text("root:x:0:\nopenldap:x:104:\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    key, cert = issue_cert(*ca, "ctl", dns=["ctl", "ctl.office.lan"], ips=["10.44.0.10"])
    (tls / "ca.crt").write_bytes(ca[1])
    (tls / "node.crt").write_bytes(cert)
    (tls / "node.key").write_bytes(key)
    hooks = tmp_path / "tls.d"
    hooks.mkdir()
    marker = tmp_path / "hook-ran"
    (hooks / "10-mark").write_text(f"#!/bin/sh\ncat {tls}/node.crt > {marker}\n")
    (hooks / "10-mark").chmod(0o755)

    def install(payload: dict) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SOHOCLOUD_ROOT=str(root), SOHOCLOUD_LIB=str(REPO / "firstboot"),
                   SOHOCLOUD_TLS_HOOKS=str(hooks))
        return subprocess.run([sys.executable, str(TOOL)], input=json.dumps(payload), env=env, capture_output=True,
                              text=True, timeout=60)
    install.tls, install.marker, install.root = tls, marker, root
    return install


def test_a_renewed_pair_is_installed_and_the_hooks_take_it_up(node, ca):
    key, cert = issue_cert(*ca, "ctl", dns=["ctl", "ctl.office.lan"], ips=["10.44.0.10"], days=30)
    r = node({"cert": cert.decode(), "key": key.decode()})
    assert r.returncode == 0, r.stderr
    assert (node.tls / "node.crt").read_bytes() == cert and (node.tls / "node.key").read_bytes() == key
    assert stat.S_IMODE((node.tls / "node.key").stat().st_mode) == 0o600
    assert node.marker.read_bytes() == cert  # the hook ran after both files were in place
    assert "subject=commonName=ctl" in r.stderr and key.decode().splitlines()[1] not in r.stderr


@pytest.mark.parametrize("why", ["another CA", "another node", "another key"])
def test_anything_but_this_nodes_pair_from_the_site_ca_is_refused(node, ca, why):
    before = {p.name: p.read_bytes() for p in node.tls.iterdir()}
    other_ca = make_ca("someone else's CA")
    key, cert = issue_cert(*(other_ca if why == "another CA" else ca), "ws1" if why == "another node" else "ctl",
                           dns=["x"], ips=["10.44.0.9"])
    if why == "another key":
        key = issue_cert(*ca, "ctl", dns=["x"], ips=["10.44.0.9"])[0]
    r = node({"cert": cert.decode(), "key": key.decode()})
    assert r.returncode != 0 and "refused" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in node.tls.iterdir()} == before and not node.marker.exists()
    assert key.decode().splitlines()[1] not in r.stderr + r.stdout


def test_controls_hook_gives_slapd_its_copy(node, ca):
    key, cert = issue_cert(*ca, "ctl", dns=["ctl"], ips=["10.44.0.10"])
    assert node({"cert": cert.decode(), "key": key.decode()}).returncode == 0
    env = dict(os.environ, SOHOCLOUD_ROOT=str(node.root), SOHOCLOUD_LIB=str(REPO / "firstboot"))
    r = subprocess.run([sys.executable, str(CONTROL_HOOK)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ldap = node.root / "etc/ldap/tls"
    assert (ldap / "node.crt").read_bytes() == cert and (ldap / "node.key").read_bytes() == key
    assert stat.S_IMODE((ldap / "node.key").stat().st_mode) == 0o640
