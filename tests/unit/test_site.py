"""Tier 1: site files (sites/*.yaml): parsing and every validation error, with file:line."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from builder.errors import ConfigError
from builder.fleet.sitefile import load_site

ROLES = ["router", "control", "storage", "workstation-host"]
GATEWAYS = ["router"]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@test"

GOOD = f"""\
site: example
domain: office.lan
lan: 10.44.0.0/24
admin_ssh_keys:
  - {KEY}
nodes:
  - {{name: gw, role: router, address: 10.44.0.1, mac: "52:54:00:44:00:01"}}
  - {{name: ctl, role: control, address: 10.44.0.10, mac: "52:54:00:44:00:0a"}}
  - {{name: nas, role: storage, address: 10.44.0.20, mac: "52:54:00:44:00:14", arch: arm64}}
  - {{name: ws1, role: workstation-host, address: 10.44.0.31, mac: "52:54:00:44:00:1f"}}
  - {{name: ws2, role: workstation-host, address: 10.44.0.32, mac: "52:54:00:44:00:20"}}
groups:
  - {{name: office, gid: 3000}}
users:
  - {{name: alice, uid: 2001, groups: [office]}}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_site(write(tmp_path, text), known_roles=ROLES, gateway_roles=GATEWAYS)
    return str(exc.value)


def test_good_site(tmp_path):
    site = load_site(write(tmp_path, GOOD), known_roles=ROLES, gateway_roles=GATEWAYS)
    assert site.name == "example" and site.domain == "office.lan"
    assert site.node("nas").arch == "arm64"
    assert [n.name for n in site.nodes_with_role("workstation-host")] == ["ws1", "ws2"]
    # each (role, arch, target) built once, however many nodes share it
    assert site.builds() == [("control", "amd64", "qemu"), ("router", "amd64", "qemu"),
                             ("storage", "arm64", "qemu"), ("workstation-host", "amd64", "qemu")]
    assert site.cluster.engine == "swarm"
    assert site.gateway == "gw"  # the node whose role is marked gateway: true


def test_unknown_node_is_a_clear_error(tmp_path):
    site = load_site(write(tmp_path, GOOD), known_roles=ROLES, gateway_roles=GATEWAYS)
    with pytest.raises(ConfigError, match="no node 'nope'.*gw, ctl"):
        site.node("nope")


@pytest.mark.parametrize("old,new,line,expect", [
    ('mac: "52:54:00:44:00:0a"', 'mac: "52:54:00:44:00:01"', 8, r"nodes\[1\]\.mac: duplicate mac"),
    ("address: 10.44.0.20", "address: 10.45.0.20", 9, r"nodes\[2\]\.address: 10\.45\.0\.20 is not a host address"),
    ("address: 10.44.0.31", "address: 10.44.0.255", 10, r"not a host address"),
    ("role: control", "role: kitchen", 8, r"nodes\[1\]\.role: unknown role 'kitchen'"),
    ("role: control", "role: router", 6, r"exactly one node with a gateway role \(router\), found 2"),
    ("arch: arm64", "arch: mips", 9, r"nodes\[2\]\.arch: expected one of amd64, arm64"),
    ('mac: "52:54:00:44:00:1f"', 'mac: "52-54-00-44-00-1f"', 10, r"expected a lowercase MAC"),
    ("name: ws2", "name: WS_2", 11, r"expected a lowercase DNS label"),
    ("uid: 2001", "uid: 20", 15, r"users\[0\]\.uid: expected a uid from 2000"),
    ("groups: [office]", "groups: [wheel]", 15, r"unknown group 'wheel'"),
    ("lan: 10.44.0.0/24", "lan: 10.44.0.0/33", 3, r"lan: expected an IPv4 network"),
    ("domain: office.lan", "domian: office.lan", 2, r"unknown key 'domian'; did you mean 'domain'"),
])
def test_site_errors_name_file_line_and_key(tmp_path, old, new, line, expect):
    assert old in GOOD
    msg = error_of(tmp_path, GOOD.replace(old, new, 1))
    assert re.search(expect, msg), msg
    assert f"site.yaml:{line}:" in msg, msg


def test_time_servers_default_to_debians_pool_and_are_checked(tmp_path):
    site = load_site(write(tmp_path, GOOD), known_roles=ROLES, gateway_roles=GATEWAYS)
    assert site.time_servers == ("2.debian.pool.ntp.org",)
    offline = load_site(write(tmp_path, GOOD + "time_servers: []\n"), known_roles=ROLES, gateway_roles=GATEWAYS)
    assert offline.time_servers == ()  # the router's own clock: the office still agrees with itself
    msg = error_of(tmp_path, GOOD + "time_servers: [ntp.example.org, 'pool.ntp.org iburst\\nallow all']\n")
    assert re.search(r"site.yaml:16: time_servers\[1\]: expected an NTP server's DNS name or IPv4 address", msg), msg


def test_admin_key_required(tmp_path):
    text = re.sub(r"admin_ssh_keys:\n  - .*\n", "admin_ssh_keys: []\n", GOOD)
    assert "at least one admin SSH public key" in error_of(tmp_path, text)


def test_k3s_needs_its_air_gap_files(tmp_path):
    msg = error_of(tmp_path, GOOD + "cluster: {engine: k3s}\n")
    assert "engine k3s needs cluster.k3s" in msg and "site.yaml:16:" in msg
    k3s = ("cluster:\n  engine: k3s\n  k3s: {binary: k3s, binary_sha256: %s, images: images.tar, "
           "images_sha256: %s}\n")
    msg = error_of(tmp_path, GOOD + k3s % ("a" * 64, "a" * 64))
    assert re.search(r"cluster\.k3s\.binary: no such file: .*/k3s", msg), msg
    (tmp_path / "k3s").write_bytes(b"binary")
    (tmp_path / "images.tar").write_bytes(b"images")
    digest = hashlib.sha256(b"binary").hexdigest()
    msg = error_of(tmp_path, GOOD + k3s % (digest.upper(), digest))
    assert "binary_sha256: expected 64 lowercase hex digits" in msg
    site = load_site(write(tmp_path, GOOD + k3s % (digest, hashlib.sha256(b"images").hexdigest())),
                     known_roles=ROLES, gateway_roles=GATEWAYS)
    assert site.cluster.k3s.binary == "k3s"


def test_missing_site_file(tmp_path):
    with pytest.raises(ConfigError, match="no such site file"):
        load_site(tmp_path / "nope.yaml", known_roles=ROLES, gateway_roles=GATEWAYS)


VPN = """\
vpn:
  network: 10.45.0.0/24
  reach:
    - {node: gw, port: 53, proto: udp}
    - {node: nas, port: 445}
    - {node: ctl}
  peers:
    - {name: laptop, address: 10.45.0.2}
    - {name: phone, address: 10.45.0.3, public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="}
"""


def test_vpn_reach_and_peers(tmp_path):
    site = load_site(write(tmp_path, GOOD + VPN), known_roles=ROLES, gateway_roles=GATEWAYS)
    assert site.vpn.gateway_address == "10.45.0.1" and site.vpn.port == 51820
    assert [(r.node, r.port, r.proto) for r in site.vpn.reach] == [("gw", 53, "udp"), ("nas", 445, "tcp"),
                                                                  ("ctl", None, "tcp")]
    assert site.vpn.peers[0].public_key is None  # sohocloud makes its key pair
    assert load_site(write(tmp_path, GOOD), known_roles=ROLES, gateway_roles=GATEWAYS).vpn is None


@pytest.mark.parametrize("old,new,expect", [
    ("network: 10.45.0.0/24", "network: 10.44.0.0/25", r"vpn\.network: expected a network apart from the LAN"),
    ("{node: nas, port: 445}", "{node: nas2, port: 445}", r"vpn\.reach\[1\]\.node: unknown node 'nas2'"),
    ("{node: gw, port: 53, proto: udp}", "{node: gw}", r"vpn\.reach\[0\]\.port: the router gw itself: name each port"),
    ("{node: nas, port: 445}", "{node: nas, port: 70000}", r"vpn\.reach\[1\]\.port: expected a port 1-65535"),
    ("address: 10.45.0.3", "address: 10.45.0.2", r"vpn\.peers\[1\]\.address: duplicate address"),
    ("address: 10.45.0.2", "address: 10.45.0.1", r"other than the router's 10\.45\.0\.1"),
    ('public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="', 'public_key: "not-a-key"',
     r"vpn\.peers\[1\]\.public_key: expected a WireGuard public key"),
])
def test_vpn_errors_name_the_key(tmp_path, old, new, expect):
    assert old in VPN
    msg = error_of(tmp_path, GOOD + VPN.replace(old, new, 1))
    assert re.search(expect, msg), msg
    assert "site.yaml:" in msg


def test_backup_retention_defaults_and_is_checked(tmp_path):
    site = load_site(write(tmp_path, GOOD), known_roles=ROLES, gateway_roles=GATEWAYS)
    assert (site.backups.keep_daily, site.backups.keep_weekly, site.backups.keep_monthly) == (7, 5, 12)
    msg = error_of(tmp_path, GOOD + "backups: {keep_daily: -1}\n")
    assert re.search(r"site.yaml:16: backups\.keep_daily: expected a count", msg), msg
    msg = error_of(tmp_path, GOOD + "backups: {keep_daily: 0, keep_weekly: 0, keep_monthly: 0}\n")
    assert "keeps no snapshot at all" in msg
    msg = error_of(tmp_path, GOOD + "backups: {keep_last: 3}\n")
    assert "unknown key 'keep_last'" in msg


def test_certificate_policy_is_checked(tmp_path):
    site = load_site(write(tmp_path, GOOD), known_roles=ROLES, gateway_roles=GATEWAYS)
    assert (site.certificates.valid_days, site.certificates.renew_before_days) == (825, 30)
    msg = error_of(tmp_path, GOOD + "certificates: {valid_days: 10, renew_before_days: 10}\n")
    assert re.search(r"site.yaml:16: certificates\.renew_before_days: expected 0 or more days, fewer than", msg), msg
    msg = error_of(tmp_path, GOOD + "certificates: {valid_days: 0}\n")
    assert "certificates.valid_days: expected 1 to 3650 days" in msg
