"""Tier 1: the node program (firstboot/sohocloud_firstboot, run by firstboot/sohocloud-firstboot)
against a fake root directory.

Every run uses --no-system, so nothing on the host is touched (no hostname,
mount or udevadm calls); role hooks run only where SOHOCLOUD_RUN_HOOKS=1.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sohocloud_firstboot import context, hooks, sources
from sohocloud_firstboot import main as fb_main

REPO = Path(__file__).resolve().parents[2]
FIRSTBOOT = REPO / "firstboot" / "sohocloud-firstboot"
HAVE_SSH_KEYGEN = shutil.which("ssh-keygen") is not None
needs_keygen = pytest.mark.skipif(not HAVE_SSH_KEYGEN, reason="ssh-keygen (openssh-client) not installed")
HAVE_FAT_TOOLS = all(
    shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin") for t in ("mkfs.vfat", "mcopy", "mdir")
)

SECRET = "TOPSECRET-7f3a9c"  # must never show up in firstboot's output


def fake_key(comment: str = "alice@test", seed: bytes = b"k1") -> str:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + hashlib.sha256(seed).digest()
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


KEY1 = fake_key("alice@test", b"1")
KEY2 = fake_key("bob@test", b"2")


# --------------------------------------------------------------------------- fixtures


def make_root(path: Path, *, host_key: bool = True) -> Path:
    """Minimal Debian-like tree. With host_key, a placeholder key exists so tests
    about other steps do not depend on ssh-keygen."""
    (path / "etc/ssh").mkdir(parents=True)
    (path / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nadmin:x:1000:1000:admin:/home/admin:/bin/bash\n"
    )
    (path / "etc/group").write_text("root:x:0:\nadm:x:4:admin\nadmin:x:1000:\n")
    (path / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost\n")
    (path / "etc/hostname").write_text("debian\n")
    (path / "home/admin").mkdir(parents=True)
    if host_key:
        key = path / "etc/ssh/ssh_host_ed25519_key"
        key.write_text("placeholder private key\n")
        key.chmod(0o600)
        (path / "etc/ssh/ssh_host_ed25519_key.pub").write_text("ssh-ed25519 placeholder\n")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "root")


def user_data(**kw: Any) -> str:
    return "#cloud-config\n" + yaml.safe_dump(kw, sort_keys=False)


def make_seed(
    d: Path,
    *,
    iid: str = "iid-1",
    hostname: str | None = "node1",
    user: str | None = None,
    network: str | None = None,
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"instance-id": iid}
    if hostname is not None:
        meta["local-hostname"] = hostname
    (d / "meta-data").write_text(yaml.safe_dump(meta))
    for name, text in (("user-data", user), ("network-config", network)):
        p = d / name
        if text is None:
            p.unlink(missing_ok=True)
        else:
            p.write_text(text)
    return d


def run_fb(root: Path, seed: Path | None, *extra: str) -> int:
    argv = ["--root", str(root), "--no-system", *extra]
    if seed is not None:
        argv += ["--seed-dir", str(seed)]
    return fb_main.main(argv)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# --------------------------------------------------------------------------- hostname


def test_hostname_and_hosts(root: Path, tmp_path: Path) -> None:
    assert run_fb(root, make_seed(tmp_path / "seed", user=user_data(ssh_authorized_keys=[KEY1]))) == 0
    assert (root / "etc/hostname").read_text() == "node1\n"
    hosts = (root / "etc/hosts").read_text().splitlines()
    assert hosts == ["127.0.0.1\tlocalhost", "127.0.1.1\tnode1", "::1\tlocalhost ip6-localhost"]


def test_hosts_line_added_when_missing(root: Path, tmp_path: Path) -> None:
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    assert run_fb(root, make_seed(tmp_path / "seed", hostname="nas")) == 0
    assert (root / "etc/hosts").read_text() == "127.0.0.1 localhost\n127.0.1.1\tnas\n"


def test_user_data_hostname_used_without_local_hostname(root: Path, tmp_path: Path) -> None:
    seed = make_seed(tmp_path / "seed", hostname=None, user=user_data(hostname="ws1"))
    assert run_fb(root, seed) == 0
    assert (root / "etc/hostname").read_text() == "ws1\n"


def test_invalid_hostname_rejected(root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    seed = make_seed(tmp_path / "seed", hostname="bad_name", user=user_data(ssh_authorized_keys=[KEY1]))
    assert run_fb(root, seed) == 1
    err = capfd.readouterr().err
    assert "local-hostname 'bad_name' is not a valid host name" in err
    assert (root / "etc/hostname").read_text() == "debian\n"
    assert not (root / "var/lib/sohocloud/firstboot.done").exists()
    # The rest still ran: the admin can get in to fix it.
    assert (root / "home/admin/.ssh/authorized_keys").read_text() == KEY1 + "\n"


# --------------------------------------------------------------------------- host keys


@needs_keygen
def test_host_key_created_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "root", host_key=False)
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    key = root / "etc/ssh/ssh_host_ed25519_key"
    pub = root / "etc/ssh/ssh_host_ed25519_key.pub"
    assert mode(key) == 0o600 and mode(pub) == 0o644
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pub.read_text().startswith("ssh-ed25519 ")
    assert not list((root / "etc/ssh").glob(".*"))  # no temp files left
    first = key.read_bytes()
    # A new seed re-runs everything but must keep the node's identity.
    assert run_fb(root, make_seed(tmp_path / "seed", iid="iid-2")) == 0
    assert key.read_bytes() == first
    out = capfd.readouterr()
    assert first.decode().splitlines()[1] not in out.out + out.err
    assert pub.read_text().split()[1] not in out.out + out.err


@needs_keygen
def test_two_roots_get_different_host_keys(tmp_path: Path) -> None:
    pubs = []
    for n in ("a", "b"):
        root = make_root(tmp_path / n, host_key=False)
        assert run_fb(root, make_seed(tmp_path / f"seed-{n}")) == 0
        pubs.append((root / "etc/ssh/ssh_host_ed25519_key.pub").read_text())
    assert pubs[0] != pubs[1]


@needs_keygen
def test_lost_public_host_key_is_rebuilt(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", host_key=False)
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    pub = root / "etc/ssh/ssh_host_ed25519_key.pub"
    before = pub.read_text().split()[:2]
    pub.unlink()
    assert run_fb(root, make_seed(tmp_path / "seed", iid="iid-2")) == 0
    assert pub.read_text().split()[:2] == before


@needs_keygen
def test_no_seed_still_makes_host_key(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "root", host_key=False)
    assert run_fb(root, None) == 0
    assert "sohocloud-firstboot: no seed found" in capfd.readouterr().out
    assert (root / "etc/ssh/ssh_host_ed25519_key").is_file()
    assert not (root / "var/lib/sohocloud/firstboot.done").exists()


def test_netboot_machine_without_seed_is_not_enrolled(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The netboot initrd found no seed for this MAC (404): a clear not-enrolled state, no URL retry,
    no admin key, no marker; the console login banner says how to enroll it."""
    root = make_root(tmp_path / "root", host_key=False)
    (root / "proc").mkdir()
    (root / "proc/cmdline").write_text("quiet ds=nocloud;s=http://10.44.0.1/seeds/52:54:00:44:00:77/\n")
    (root / "run/sohocloud").mkdir(parents=True)
    (root / "run/sohocloud/not-enrolled").write_text("mac=52:54:00:44:00:77\nserver=http://10.44.0.1\n")
    assert run_fb(root, None) == 0
    out = capfd.readouterr().out
    assert "NOT ENROLLED: http://10.44.0.1 has no seed for this machine (MAC 52:54:00:44:00:77)" in out
    assert "fetch" not in out  # the initrd already asked; firstboot does not try the URL again
    issue = (root / "etc/issue.d/50-sohocloud-not-enrolled.issue").read_text()
    assert 'mac: "52:54:00:44:00:77"' in issue and "sohocloud fleet build" in issue
    assert (root / "etc/ssh/ssh_host_ed25519_key").is_file()
    assert not (root / "home/admin/.ssh/authorized_keys").exists()
    assert not (root / "var/lib/sohocloud/firstboot.done").exists()


# --------------------------------------------------------------------------- admin keys


def test_authorized_keys_written(root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ssh = root / "home/admin/.ssh"
    ssh.mkdir(mode=0o755)
    (ssh / "authorized_keys").write_text(fake_key("old@key", b"old") + "\n")
    ud = user_data(
        ssh_authorized_keys=[KEY1, "not a key at all"],
        users=["default", {"name": "admin", "ssh_authorized_keys": [KEY2, KEY1]},
               {"name": "eve", "ssh_authorized_keys": [fake_key("eve", b"e")]}],
    )
    assert run_fb(root, make_seed(tmp_path / "seed", user=ud)) == 0
    ak = ssh / "authorized_keys"
    # Seed is the truth: old key gone, duplicates folded, order kept, eve not admin.
    assert ak.read_text() == f"{KEY1}\n{KEY2}\n"
    assert mode(ak) == 0o600 and mode(ssh) == 0o700
    if os.geteuid() == 0:
        assert (ak.stat().st_uid, ak.stat().st_gid) == (1000, 1000)
        assert (ssh.stat().st_uid, ssh.stat().st_gid) == (1000, 1000)
    err = capfd.readouterr().err
    assert "ssh_authorized_keys[1] is not an OpenSSH public key, skipped" in err
    assert "not a key at all" not in err
    assert "users[2] ignored" in err


def test_non_list_keys_ignored_with_warning(root: Path, tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    ud = user_data(ssh_authorized_keys=KEY1, users=[{"name": "admin", "ssh_authorized_keys": [KEY2]}])
    assert run_fb(root, make_seed(tmp_path / "seed", user=ud)) == 0
    assert (root / "home/admin/.ssh/authorized_keys").read_text() == KEY2 + "\n"
    assert "user-data: ssh_authorized_keys must be a list, ignored" in capfd.readouterr().err


def test_no_valid_keys_leaves_file_alone(root: Path, tmp_path: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    ssh = root / "home/admin/.ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "authorized_keys").write_text(KEY1 + "\n")
    assert run_fb(root, make_seed(tmp_path / "seed", user=user_data(ssh_authorized_keys=["junk"]))) == 0
    assert (ssh / "authorized_keys").read_text() == KEY1 + "\n"
    assert "no valid key in user-data" in capfd.readouterr().err


def test_admin_missing_from_passwd_is_an_error(root: Path, tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert run_fb(root, make_seed(tmp_path / "seed", user=user_data(ssh_authorized_keys=[KEY1]))) == 1
    assert "user 'admin' not found in /etc/passwd" in capfd.readouterr().err


# --------------------------------------------------------------------------- network


STATIC_NET = {
    "version": 2,
    "ethernets": {
        "lan": {
            "match": {"macaddress": "52:54:00:AA:00:01"},
            "set-name": "lan0",
            "addresses": ["10.44.0.1/24"],
            "nameservers": {"addresses": ["10.44.0.1"], "search": ["home.lan"]},
            "routes": [{"to": "10.45.0.0/16", "via": "10.44.0.254"}],
        },
        "wan": {"match": {"name": "eth0"}, "dhcp4": True},
    },
}


def test_network_static_and_dhcp(root: Path, tmp_path: Path) -> None:
    seed = make_seed(tmp_path / "seed", network=yaml.safe_dump(STATIC_NET))
    assert run_fb(root, seed) == 0
    nd = root / "etc/systemd/network"
    lan = (nd / "10-seed-lan.network").read_text()
    assert "[Match]\nName=lan0\n" in lan
    assert "Address=10.44.0.1/24\n" in lan
    assert "DNS=10.44.0.1\n" in lan and "Domains=home.lan\n" in lan
    assert "[Route]\nDestination=10.45.0.0/16\nGateway=10.44.0.254\n" in lan
    assert "DHCP=" not in lan
    link = (nd / "10-seed-lan.link").read_text()
    assert "[Match]\nMACAddress=52:54:00:aa:00:01\n" in link and "[Link]\nName=lan0\n" in link
    wan = (nd / "10-seed-wan.network").read_text()
    assert "[Match]\nName=eth0\n" in wan and "DHCP=ipv4\n" in wan
    assert not (nd / "10-seed-wan.link").exists()
    for p in nd.iterdir():
        assert mode(p) == 0o644
    assert sorted(p.name for p in nd.iterdir()) == ["10-seed-lan.link", "10-seed-lan.network", "10-seed-wan.network"]


def test_network_gateway_and_default_route(root: Path, tmp_path: Path) -> None:
    net = {"version": 2, "ethernets": {"eth0": {"addresses": ["10.44.0.20/24"], "gateway4": "10.44.0.1",
                                                "routes": [{"to": "default", "via": "10.44.0.1"}]}}}
    assert run_fb(root, make_seed(tmp_path / "seed", network=yaml.safe_dump({"network": net}))) == 0
    text = (root / "etc/systemd/network/10-seed-eth0.network").read_text()
    assert "[Match]\nName=eth0\n" in text and "Gateway=10.44.0.1\n" in text
    assert "Destination=0.0.0.0/0\n" in text


def test_stale_seed_network_files_removed(root: Path, tmp_path: Path) -> None:
    nd = root / "etc/systemd/network"
    nd.mkdir(parents=True)
    (nd / "20-image-default.network").write_text("[Match]\nName=e*\n")
    assert run_fb(root, make_seed(tmp_path / "seed", network=yaml.safe_dump(STATIC_NET))) == 0
    only_wan = {"version": 2, "ethernets": {"wan": STATIC_NET["ethernets"]["wan"]}}
    assert run_fb(root, make_seed(tmp_path / "seed", iid="iid-2", network=yaml.safe_dump(only_wan))) == 0
    assert sorted(p.name for p in nd.iterdir()) == ["10-seed-wan.network", "20-image-default.network"]
    # A new seed without network-config: no seed network files at all.
    assert run_fb(root, make_seed(tmp_path / "seed", iid="iid-3")) == 0
    assert sorted(p.name for p in nd.iterdir()) == ["20-image-default.network"]


def test_malformed_network_config_keeps_admin_keys(root: Path, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    seed = make_seed(tmp_path / "seed", user=user_data(ssh_authorized_keys=[KEY1]),
                     network="version: 2\nethernets: {lan: [unclosed\n")
    assert run_fb(root, seed) == 1
    err = capfd.readouterr().err
    assert "sohocloud-firstboot: error: network-config: not valid YAML" in err
    assert (root / "home/admin/.ssh/authorized_keys").read_text() == KEY1 + "\n"
    assert not (root / "var/lib/sohocloud/firstboot.done").exists()


@pytest.mark.parametrize(
    "eth, msg",
    [
        ({"addresses": ["10.44.0.1"]}, r"ethernets\.lan0\.addresses\[0\]: '10\.44\.0\.1' needs a prefix length"),
        ({"addresses": ["10.44.0.300/24"]}, "is not an IP address"),
        ({"match": {"macaddress": "zz:00"}, "set-name": "x"}, "is not a MAC address"),
        ({"dhcp4": "maybe"}, "dhcp4 must be true or false"),
        ({"routes": [{"to": "default"}]}, "needs 'to' and 'via'"),
    ],
)
def test_invalid_network_leaves_old_files(root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                          eth: dict, msg: str) -> None:
    good = {"version": 2, "ethernets": {"lan0": {"addresses": ["10.44.0.1/24"]}}}
    assert run_fb(root, make_seed(tmp_path / "seed", network=yaml.safe_dump(good))) == 0
    before = (root / "etc/systemd/network/10-seed-lan0.network").read_text()
    bad = {"version": 2, "ethernets": {"wan": {"dhcp4": True}, "lan0": eth}}
    assert run_fb(root, make_seed(tmp_path / "seed", iid="iid-2", network=yaml.safe_dump(bad))) == 1
    assert re.search(msg, capfd.readouterr().err)
    assert (root / "etc/systemd/network/10-seed-lan0.network").read_text() == before
    assert not (root / "etc/systemd/network/10-seed-wan.network").exists()


# --------------------------------------------------------------------------- marker


def test_done_marker_and_instance_id(root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    seed = make_seed(tmp_path / "seed", user=user_data(ssh_authorized_keys=[KEY1]))
    marker = root / "var/lib/sohocloud/firstboot.done"
    assert run_fb(root, seed) == 0
    assert marker.read_text() == "iid-1\n"
    # Same instance-id: nothing is redone (the deleted file stays deleted).
    (root / "etc/hostname").unlink()
    capfd.readouterr()
    assert run_fb(root, seed) == 0
    assert "already done for instance iid-1" in capfd.readouterr().out
    assert not (root / "etc/hostname").exists()
    # New instance-id: a new seed, everything runs again.
    make_seed(tmp_path / "seed", iid="iid-2", hostname="node2", user=user_data(ssh_authorized_keys=[KEY2]))
    assert run_fb(root, seed) == 0
    assert (root / "etc/hostname").read_text() == "node2\n"
    assert (root / "home/admin/.ssh/authorized_keys").read_text() == KEY2 + "\n"
    assert marker.read_text() == "iid-2\n"


# --------------------------------------------------------------------------- malformed user-data


@needs_keygen
@pytest.mark.parametrize(
    "text, problem",
    [
        ("#!/bin/sh\necho hi\n", "user-data: first line must be '#cloud-config'"),
        # The offending line holds the secret: PyYAML's own message would quote it.
        (f"#cloud-config\nsohocloud:\n  token: abc: {SECRET}\n", "user-data: not valid YAML"),
        ("#cloud-config\n- just\n- a list\n", "user-data: expected a YAML mapping"),
    ],
)
def test_malformed_user_data(tmp_path: Path, capfd: pytest.CaptureFixture[str], text: str, problem: str) -> None:
    root = make_root(tmp_path / "root", host_key=False)
    assert run_fb(root, make_seed(tmp_path / "seed", user=text)) == 1
    out = capfd.readouterr()
    err_lines = [ln for ln in out.err.splitlines() if "user-data" in ln]
    assert len(err_lines) == 1 and problem in err_lines[0]
    assert err_lines[0].startswith("sohocloud-firstboot: error: ")
    assert SECRET not in out.out + out.err
    assert not (root / "var/lib/sohocloud/firstboot.done").exists()
    assert (root / "etc/ssh/ssh_host_ed25519_key").is_file()
    assert (root / "etc/hostname").read_text() == "node1\n"  # meta-data was fine


def test_malformed_meta_data(root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    seed = make_seed(tmp_path / "seed", user=user_data(ssh_authorized_keys=[KEY1]))
    (seed / "meta-data").write_text("instance-id: [oops\n")
    assert run_fb(root, seed) == 1
    assert "meta-data: not valid YAML" in capfd.readouterr().err
    assert (root / "home/admin/.ssh/authorized_keys").read_text() == KEY1 + "\n"
    assert not (root / "var/lib/sohocloud/firstboot.done").exists()


# --------------------------------------------------------------------------- write_files


def test_write_files(root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    ud = user_data(write_files=[
        {"path": "/etc/sohocloud/plain.conf", "content": f"token={SECRET}\n", "permissions": "0640",
         "owner": "admin:adm"},
        {"path": "/etc/b64.bin", "content": base64.b64encode(b"\x00\x01" + SECRET.encode()).decode(),
         "encoding": "b64"},
    ])
    assert run_fb(root, make_seed(tmp_path / "seed", user=ud)) == 0
    plain = root / "etc/sohocloud/plain.conf"
    assert plain.read_text() == f"token={SECRET}\n"
    assert mode(plain) == 0o640
    if os.geteuid() == 0:
        assert (plain.stat().st_uid, plain.stat().st_gid) == (1000, 4)
    b64 = root / "etc/b64.bin"
    assert b64.read_bytes() == b"\x00\x01" + SECRET.encode()
    assert mode(b64) == 0o644
    out = capfd.readouterr()
    assert "/etc/sohocloud/plain.conf (0640)" in out.out
    assert SECRET not in out.out + out.err


def test_write_files_escape_refused(root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc/evil-link").symlink_to(outside)
    ud = user_data(write_files=[
        {"path": "/etc/ok.conf", "content": "ok\n"},
        {"path": "/../../outside/escaped", "content": "x"},
        {"path": "/etc/evil-link/escaped", "content": "x"},
        {"path": "relative/file", "content": "x"},
    ])
    assert run_fb(root, make_seed(tmp_path / "seed", user=ud)) == 1
    err = capfd.readouterr().err
    assert "write_files[1]: path '/../../outside/escaped' contains '..'" in err
    assert "write_files[2]: path '/etc/evil-link/escaped' leads outside the root" in err
    assert "write_files[3]: path 'relative/file' must be an absolute file path" in err
    assert list(outside.iterdir()) == []
    assert (root / "etc/ok.conf").read_text() == "ok\n"  # good entries still written
    assert not (root / "var/lib/sohocloud/firstboot.done").exists()


# --------------------------------------------------------------------------- role hooks


def add_hook(root: Path, name: str, body: str, executable: bool = True) -> Path:
    d = root / "usr/lib/sohocloud/firstboot.d"
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\nset -e\n" + body)
    p.chmod(0o755 if executable else 0o644)
    return p


def test_role_hooks_run_in_order_with_seed_json(root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOHOCLOUD_RUN_HOOKS", "1")
    log = root / "hooks.log"
    add_hook(root, "20-second", f'echo second >> "{log}"\n')
    add_hook(root, "10-first", f'echo "first $SOHOCLOUD_ROOT" >> "{log}"\n'
                               f'cp "$SOHOCLOUD_SEED_JSON" "{root}/seen.json"\n')
    add_hook(root, "15-not-executable", f'echo nope >> "{log}"\n', executable=False)
    block = {"cluster": {"engine": "k3s", "token": SECRET}}
    assert run_fb(root, make_seed(tmp_path / "seed", user=user_data(sohocloud=block))) == 0
    assert log.read_text() == f"first {root}\nsecond\n"
    assert json.loads((root / "seen.json").read_text()) == block
    assert mode(root / "run/sohocloud/seed.json") == 0o600
    assert (root / "var/lib/sohocloud/firstboot.done").read_text() == "iid-1\n"


PY_HOOK = """#!/usr/bin/python3
import json, os, sys
report = {"argv0": sys.argv[0], "cwd": os.getcwd(), "x": os.environ.get("X"), "stdin": sys.stdin.read(),
          "path0": sys.path[0], "name": __name__, "forked": "pytest" in sys.modules}
with open(os.environ["REPORT"], "w") as f:
    json.dump(report, f)
print("hook says hi", flush=True)
how = os.environ.get("HOW", "0")
if how == "message":
    sys.exit("hook refused: bad setting")
if how == "raise":
    raise ValueError("hook bug")
sys.exit(int(how))
"""


@pytest.mark.parametrize("how, code", [("0", 0), ("3", 3), ("message", 1), ("raise", 1)])
def test_python_hook_in_a_fork_behaves_like_an_exec(root: Path, tmp_path: Path, how: str, code: int,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """A Python hook runs in a fork of firstboot (no interpreter start-up); what it sees — argv,
    cwd, environment, stdin, its own folder first on sys.path, __main__ — and its exit code and
    output are those of a fresh `python3 HOOK`."""
    hook = add_hook(root, "10-py", "")
    hook.write_text(PY_HOOK)
    ctx = context.Ctx(root=root, system=False)
    env = {"PATH": "/usr/bin:/bin", "X": "from-env", "HOW": how}
    seen = {}
    for kind in ("fork", "exec"):
        if kind == "exec":  # the same file, run the classic way
            monkeypatch.setattr(hooks, "PYTHON_SHEBANG", b"#!never\n")
        report = tmp_path / f"{kind}.json"
        assert hooks.run_hook(ctx, hook, {**env, "REPORT": str(report)}) == code
        out, err = capfd.readouterr()
        assert "hook says hi" in out, (out, err)
        if how == "message":
            assert err.strip() == "hook refused: bad setting"
        if how == "raise":
            assert "Traceback" in err and "ValueError: hook bug" in err
        seen[kind] = json.loads(report.read_text())
    assert seen["fork"].pop("forked") and not seen["exec"].pop("forked")  # each path was taken
    assert seen["fork"] == seen["exec"] == {"argv0": str(hook), "cwd": str(root), "x": "from-env", "stdin": "",
                                            "path0": str(hook.parent), "name": "__main__"}


def test_role_hooks_not_run_under_no_system_by_default(root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOHOCLOUD_RUN_HOOKS", raising=False)
    add_hook(root, "10-touch", f'touch "{root}/ran"\n')
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    assert not (root / "ran").exists()


def test_failing_hook_prevents_marker(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SOHOCLOUD_RUN_HOOKS", "1")
    add_hook(root, "10-join", "exit 3\n")
    add_hook(root, "20-after", f'touch "{root}/after"\n')
    assert run_fb(root, make_seed(tmp_path / "seed")) == 1
    assert "role hook 10-join failed (exit 3)" in capfd.readouterr().err
    assert not (root / "after").exists()
    assert not (root / "var/lib/sohocloud/firstboot.done").exists()
    # Fixed hook, same seed: the next boot finishes the job.
    add_hook(root, "10-join", "exit 0\n")
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    assert (root / "after").exists()
    assert (root / "var/lib/sohocloud/firstboot.done").read_text() == "iid-1\n"


def test_hooks_skipped_when_seed_is_broken(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOHOCLOUD_RUN_HOOKS", "1")
    add_hook(root, "10-touch", f'touch "{root}/ran"\n')
    seed = make_seed(tmp_path / "seed", network="version: 2\nethernets: [\n")
    assert run_fb(root, seed) == 1
    assert not (root / "ran").exists()


def add_online_hook(root: Path, name: str, body: str) -> Path:
    d = root / "usr/lib/sohocloud/online.d"
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def test_online_phase_retries_until_each_hook_succeeds(root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The online phase runs after the early one; a failing hook (manager not up yet) is retried with
    backoff between rounds, the next hook has its try meanwhile, and the marker comes last."""
    monkeypatch.setenv("SOHOCLOUD_RUN_HOOKS", "1")
    sleeps: list[float] = []
    monkeypatch.setattr(hooks, "backoff", sleeps.append)
    count = root / "tries"
    add_online_hook(root, "10-join", f'echo x >> "{count}"\n[ "$(wc -l < "{count}")" -ge 3 ]\n')
    add_online_hook(root, "20-after", f'test -f "$SOHOCLOUD_SEED_JSON" && touch "{root}/after"\n')
    online = root / "var/lib/sohocloud/online.done"
    # Before the early phase handed over: nothing to do.
    assert run_fb(root, None, "--phase", "online") == 0 and not online.exists()
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    assert not online.exists()
    assert run_fb(root, None, "--phase", "online") == 0
    assert count.read_text().count("x") == 3 and (root / "after").exists()
    assert sleeps == list(hooks.ONLINE_BACKOFF_S[:2])
    assert online.read_text() == "iid-1\n"
    # Done: another boot runs no hook again.
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    assert run_fb(root, None, "--phase", "online") == 0
    assert count.read_text().count("x") == 3


def test_a_stuck_online_hook_is_stopped_and_does_not_hold_up_the_others(root: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A try that outlives ONLINE_HOOK_TIMEOUT_S is killed with everything it started; the hooks
    after it have their tries meanwhile; the stuck one is tried again and can then succeed."""
    monkeypatch.setenv("SOHOCLOUD_RUN_HOOKS", "1")
    monkeypatch.setattr(hooks, "ONLINE_HOOK_TIMEOUT_S", 2)
    monkeypatch.setattr(hooks, "backoff", lambda s: None)
    pids, tries = tmp_path / "pids", tmp_path / "tries"
    # First try: hangs, with a child of its own. Second try: done.
    add_online_hook(root, "10-stuck", f'echo x >> "{tries}"\n[ "$(wc -l < "{tries}")" -ge 2 ] && exit 0\n'
                                      f'sleep 600 & echo $! > "{pids}"\nwait\n')
    add_online_hook(root, "20-unrelated", f'[ -s "{pids}" ] && touch "{root}/unrelated"\n')
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    started = time.monotonic()
    assert run_fb(root, None, "--phase", "online") == 0
    assert time.monotonic() - started < 30
    assert (root / "unrelated").exists()  # ran while 10-stuck was still to be retried
    assert tries.read_text().count("x") == 2
    child = int(pids.read_text())
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()
    assert (root / "var/lib/sohocloud/online.done").read_text() == "iid-1\n"


def test_online_python_hooks_run_as_fresh_processes(root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Online hooks are retried for minutes: each try is a new interpreter (not a fork of the
    long-lived online phase, which would hand it this process's state); firstboot.d hooks
    keep the fork (test_python_hook_in_a_fork_behaves_like_an_exec)."""
    monkeypatch.setenv("SOHOCLOUD_RUN_HOOKS", "1")
    report = tmp_path / "online.json"
    hook = add_online_hook(root, "10-py", "")
    hook.write_text(PY_HOOK)
    monkeypatch.setenv("REPORT", str(report))
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    assert run_fb(root, None, "--phase", "online") == 0
    seen = json.loads(report.read_text())
    assert seen["forked"] is False and seen["argv0"] == str(hook) and seen["name"] == "__main__"
    assert (root / "var/lib/sohocloud/online.done").read_text() == "iid-1\n"


def test_online_phase_resumes_after_power_cut(root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Early phase done, online phase cut off: the next boot hands the settings over again."""
    monkeypatch.setenv("SOHOCLOUD_RUN_HOOKS", "1")
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    seed_json = root / "run/sohocloud/seed.json"
    seed_json.unlink()  # /run is gone after the reboot
    (root / "run/sohocloud/instance-id").unlink()
    add_online_hook(root, "10-join", f'test -f "$SOHOCLOUD_SEED_JSON" && touch "{root}/joined"\n')
    assert run_fb(root, make_seed(tmp_path / "seed")) == 0
    assert seed_json.exists()
    assert run_fb(root, None, "--phase", "online") == 0
    assert (root / "joined").exists()


# --------------------------------------------------------------------------- secrets


def test_secrets_never_logged(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SOHOCLOUD_RUN_HOOKS", "1")
    add_hook(root, "10-ok", "true\n")
    secret_key = fake_key(f"{SECRET}-keycomment", b"s")
    ud = user_data(
        ssh_authorized_keys=[secret_key, f"ssh-ed25519 {SECRET}"],
        write_files=[
            {"path": "/etc/a", "content": SECRET},
            {"path": "/etc/b", "content": base64.b64encode(SECRET.encode()).decode(), "encoding": "b64"},
            {"path": "/etc/c", "content": SECRET, "permissions": "0999"},  # error path
        ],
        sohocloud={"join_token": SECRET, "nested": {"password": SECRET}},
    )
    assert run_fb(root, make_seed(tmp_path / "seed", user=ud)) == 1  # the 0999 entry fails
    out = capfd.readouterr()
    text = out.out + out.err
    assert "write_files[2]: 'permissions' '0999' is not an octal mode" in text
    assert SECRET not in text
    assert secret_key.split()[1] not in text
    assert base64.b64encode(SECRET.encode()).decode() not in text


# --------------------------------------------------------------------------- discovery


def test_seed_dirs_discovery(root: Path) -> None:
    (root / "etc/sohocloud").mkdir(parents=True)
    (root / "etc/sohocloud/seed-dirs").write_text("# boot partition first\n/boot/empty\n/boot/firmware/sohocloud\n")
    (root / "boot/empty").mkdir(parents=True)
    make_seed(root / "boot/firmware/sohocloud", hostname="pi1")
    assert run_fb(root, None) == 0
    assert (root / "etc/hostname").read_text() == "pi1\n"


@pytest.fixture
def http_seed(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "www"
    (served / "seed").mkdir(parents=True)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/seed/", served / "seed"
    finally:
        srv.shutdown()
        srv.server_close()


def test_kernel_cmdline_seed_url(root: Path, http_seed: tuple[str, Path]) -> None:
    url, served = http_seed
    make_seed(served, hostname="pxe1", user=user_data(ssh_authorized_keys=[KEY1]))  # no network-config: 404
    (root / "proc").mkdir()
    (root / "proc/cmdline").write_text(f"BOOT_IMAGE=/vmlinuz quiet ds=nocloud-net;s={url} console=ttyS0\n")
    assert run_fb(root, None) == 0
    assert (root / "etc/hostname").read_text() == "pxe1\n"
    assert (root / "home/admin/.ssh/authorized_keys").read_text() == KEY1 + "\n"


# --------------------------------------------------------------------------- builder/seed.py ↔ firstboot


def test_rendered_seed_is_accepted(root: Path, tmp_path: Path) -> None:
    from builder.seed import read_cidata, render_seed, write_cidata

    net = {"ethernets": {"lan": {"match": {"macaddress": "52:54:00:00:00:07"}, "set-name": "lan0",
                                 "addresses": ["10.44.0.7/24"], "gateway4": "10.44.0.1"}}}
    files = render_seed("storage1", [KEY1], network=net, sohocloud={"role": "storage"})
    if HAVE_FAT_TOOLS:
        files = read_cidata(write_cidata(files, tmp_path / "seed.img"))
    seed = tmp_path / "seed"
    seed.mkdir()
    for name, text in files.items():
        (seed / name).write_text(text)
    assert run_fb(root, seed) == 0
    assert (root / "etc/hostname").read_text() == "storage1\n"
    assert (root / "home/admin/.ssh/authorized_keys").read_text() == KEY1 + "\n"
    assert "Address=10.44.0.7/24" in (root / "etc/systemd/network/10-seed-lan.network").read_text()
    iid = yaml.safe_load(files["meta-data"])["instance-id"]
    assert (root / "var/lib/sohocloud/firstboot.done").read_text() == f"{iid}\n"


def test_cli_runs_as_a_script(root: Path, tmp_path: Path) -> None:
    """The unit executes the file directly: executable, python3 shebang, exit code."""
    assert os.access(FIRSTBOOT, os.X_OK)
    assert FIRSTBOOT.read_text().startswith("#!/usr/bin/python3\n")
    seed = make_seed(tmp_path / "seed", user="not cloud-config\n")
    # The host's interpreter (which has PyYAML), not the shebang's.
    r = subprocess.run([sys.executable, str(FIRSTBOOT), "--root", str(root), "--seed-dir", str(seed), "--no-system"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "user-data: first line must be '#cloud-config'" in r.stderr


# --------------------------------------------------------------------------- seed volume discovery


@pytest.mark.skipif(not HAVE_FAT_TOOLS, reason="dosfstools/mtools not installed")
def test_cidata_label_read_from_the_volume_itself(tmp_path: Path) -> None:
    """firstboot finds the seed by reading the FAT label, without waiting for udev."""
    from builder.seed import render_seed, write_cidata

    root = make_root(tmp_path / "root")
    img = write_cidata(render_seed("node1", [KEY1]), tmp_path / "seed.img")
    assert sources.read_fs_label(img) == "CIDATA"
    # A fake /sys/class/block + /dev: vda is some other disk, vdb the seed.
    (root / "sys/class/block/vda").mkdir(parents=True)
    (root / "sys/class/block/vdb").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "dev/vda").write_bytes(b"\0" * 4096)
    shutil.copyfile(img, root / "dev/vdb")
    ctx = context.Ctx(root=root, system=False)
    assert sources.scan_block_labels(ctx) == str(root / "dev/vdb")
    (root / "dev/vdb").write_bytes(b"\0" * 4096)
    assert sources.scan_block_labels(ctx) is None


def test_fs_label_of_other_data_is_none(tmp_path: Path) -> None:
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(40000))
    assert sources.read_fs_label(p) is None
    assert sources.read_fs_label(tmp_path / "missing") is None
