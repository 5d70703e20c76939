"""Tier 1: NoCloud seed rendering, validation and the cidata volume (builder/seed.py)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from builder import seed as seedmod
from builder.errors import SohoError
from builder.proc import CommandError

HAVE_FAT_TOOLS = all(
    shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin") for t in ("mkfs.vfat", "mcopy", "mdir")
)
needs_fat = pytest.mark.skipif(not HAVE_FAT_TOOLS, reason="dosfstools/mtools not installed (mkfs.vfat, mcopy, mdir)")


def fake_key(comment: str = "alice@test", kind: str = "ssh-ed25519", seed: bytes = b"k1") -> str:
    """A structurally valid OpenSSH public key (no ssh-keygen needed)."""
    name = kind.encode()
    blob = struct.pack(">I", len(name)) + name + struct.pack(">I", 32) + hashlib.sha256(seed).digest()
    return f"{kind} {base64.b64encode(blob).decode()} {comment}"


KEY1 = fake_key("alice@test", seed=b"1")
KEY2 = fake_key("bob@test", seed=b"2")


# --------------------------------------------------------------------------- render_seed


def test_render_seed_produces_three_parseable_files() -> None:
    files = seedmod.render_seed("node1", [KEY1, KEY2], sohocloud={"cluster": {"engine": "k3s"}})
    assert set(files) == {"meta-data", "user-data", "network-config"}
    meta = yaml.safe_load(files["meta-data"])
    assert meta["local-hostname"] == "node1"
    assert meta["instance-id"].startswith("node1-")
    assert files["user-data"].startswith("#cloud-config\n")
    user = yaml.safe_load(files["user-data"])
    assert user["hostname"] == "node1"
    assert user["users"] == [{"name": "admin", "ssh_authorized_keys": [KEY1, KEY2]}]
    assert user["sohocloud"] == {"cluster": {"engine": "k3s"}}
    # No network given: no ethernets, so the image's own network defaults stay in force.
    assert yaml.safe_load(files["network-config"]) == {"version": 2, "ethernets": {}}


def test_long_keys_are_not_folded() -> None:
    long_key = fake_key("x" * 100 + " admin key of the whole team at home", kind="ssh-rsa", seed=b"r")
    files = seedmod.render_seed("node1", [long_key])
    # One YAML line holds the whole key: firstboot and humans read it whole.
    assert any(long_key in line for line in files["user-data"].splitlines())


def test_instance_id_is_stable_and_follows_content() -> None:
    a = yaml.safe_load(seedmod.render_seed("node1", [KEY1])["meta-data"])["instance-id"]
    b = yaml.safe_load(seedmod.render_seed("node1", [KEY1])["meta-data"])["instance-id"]
    c = yaml.safe_load(seedmod.render_seed("node1", [KEY2])["meta-data"])["instance-id"]
    d = yaml.safe_load(
        seedmod.render_seed("node1", [KEY1], sohocloud={"token": "t"})["meta-data"]
    )["instance-id"]
    assert a == b
    assert len({a, c, d}) == 3
    explicit = seedmod.render_seed("node1", [KEY1], instance_id="iid-42")
    assert yaml.safe_load(explicit["meta-data"])["instance-id"] == "iid-42"


def test_hostname_is_lowercased() -> None:
    files = seedmod.render_seed("Node1", [KEY1])
    assert yaml.safe_load(files["meta-data"])["local-hostname"] == "node1"


@pytest.mark.parametrize("bad", ["bad_name", "-lead", "trail-", "a" * 64, "dotted.name", "", "sp ace"])
def test_bad_hostname_rejected(bad: str) -> None:
    with pytest.raises(SohoError, match="hostname"):
        seedmod.render_seed(bad, [KEY1])


def test_63_char_hostname_accepted() -> None:
    seedmod.render_seed("a" * 63, [KEY1])


@pytest.mark.parametrize(
    "bad",
    [
        "ssh-ed25519 notbase64!!",
        "ssh-ed25519",
        "ssh-foo AAAAC3NzaC1lZDI1NTE5AAAAI",
        # Right format, but the blob says ed25519 while the line says rsa.
        "ssh-rsa " + fake_key().split()[1],
        fake_key() + "\n" + fake_key("mallory"),
    ],
)
def test_bad_key_rejected_and_names_key_file(bad: str) -> None:
    with pytest.raises(SohoError, match=r"SSH key #2 from keys/admin\.pub is not an OpenSSH public key"):
        seedmod.render_seed("node1", [KEY1, bad], key_file="keys/admin.pub")


def test_private_key_in_list_rejected() -> None:
    priv = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
    with pytest.raises(SohoError, match="PRIVATE") as exc:
        seedmod.render_seed("node1", [priv])
    assert "b3BlbnNzaC1rZXktdjEAAAAA" not in str(exc.value)


def test_no_keys_rejected() -> None:
    with pytest.raises(SohoError, match="no SSH public key"):
        seedmod.render_seed("node1", [])


def test_all_key_types_accepted() -> None:
    kinds = ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "sk-ssh-ed25519@openssh.com"]
    keys = [fake_key(kind=k, seed=k.encode()) for k in kinds]
    user = yaml.safe_load(seedmod.render_seed("node1", keys)["user-data"])
    assert user["users"][0]["ssh_authorized_keys"] == keys


def test_static_network_round_trips() -> None:
    net = {"ethernets": {"lan": {"match": {"macaddress": "52:54:00:00:00:01"}, "set-name": "lan0",
                                 "addresses": ["10.44.0.1/24"]}}}
    out = yaml.safe_load(seedmod.render_seed("router", [KEY1], network=net)["network-config"])
    assert out["version"] == 2
    assert out["ethernets"]["lan"]["addresses"] == ["10.44.0.1/24"]


@pytest.mark.parametrize(
    "net, msg",
    [
        ({"version": 1, "config": []}, "version must be 2"),
        ({"version": 2, "wifis": {}}, "unsupported key"),
        ({"version": 2, "ethernets": ["eth0"]}, "must be a mapping"),
        ({"version": 2, "ethernets": {"../x": {}}}, "not a simple interface id"),
        ({"version": 2, "ethernets": {"eth0": "dhcp"}}, r"ethernets\.eth0 must be a mapping"),
    ],
)
def test_bad_network_rejected(net: dict, msg: str) -> None:
    with pytest.raises(SohoError, match=msg):
        seedmod.render_seed("node1", [KEY1], network=net)


def test_sohocloud_block_must_be_json() -> None:
    with pytest.raises(SohoError, match="JSON"):
        seedmod.render_seed("node1", [KEY1], sohocloud={"when": object()})
    with pytest.raises(SohoError, match="mapping"):
        seedmod.render_seed("node1", [KEY1], sohocloud=["x"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- read_ssh_keys


def test_read_ssh_keys_ignores_blank_and_comments(tmp_path: Path) -> None:
    f = tmp_path / "admin.pub"
    f.write_text(f"# team keys\n\n{KEY1}\n   \n{KEY2}\n")
    assert seedmod.read_ssh_keys(f) == [KEY1, KEY2]


def test_read_ssh_keys_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SohoError, match=r"nope\.pub: SSH public key file not found"):
        seedmod.read_ssh_keys(tmp_path / "nope.pub")


def test_read_ssh_keys_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.pub"
    f.write_text("# nothing here\n\n")
    with pytest.raises(SohoError, match="no SSH public key in the file"):
        seedmod.read_ssh_keys(f)


def test_read_ssh_keys_bad_line_named(tmp_path: Path) -> None:
    f = tmp_path / "admin.pub"
    f.write_text(f"{KEY1}\nhello world\n")
    with pytest.raises(SohoError, match=r"admin\.pub: line 2 is not an OpenSSH public key"):
        seedmod.read_ssh_keys(f)


def test_read_ssh_keys_refuses_private_key_without_printing_it(tmp_path: Path) -> None:
    secret_body = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQSECRET"
    f = tmp_path / "id_ed25519"
    f.write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{secret_body}\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(SohoError, match=r"PRIVATE key; pass the public key \(usually id_ed25519\.pub\)") as exc:
        seedmod.read_ssh_keys(f)
    assert secret_body not in str(exc.value)


# --------------------------------------------------------------------------- cidata volume


@needs_fat
def test_cidata_round_trip(tmp_path: Path) -> None:
    files = seedmod.render_seed("node1", [KEY1], sohocloud={"token": "s3cret"})
    out = seedmod.write_cidata(files, tmp_path / "out" / "seed.img")
    assert out == tmp_path / "out" / "seed.img"
    assert (out.stat().st_mode & 0o777) == 0o600
    assert seedmod.read_cidata(out) == files
    # FAT12/16 boot sector: volume label at 0x2B, what blkid reports as LABEL.
    assert out.read_bytes()[0x2B:0x36] == b"CIDATA     "
    assert sorted(p.name for p in out.parent.iterdir()) == ["seed.img"]


@needs_fat
def test_cidata_is_reproducible(tmp_path: Path) -> None:
    files = seedmod.render_seed("node1", [KEY1])
    a = seedmod.write_cidata(files, tmp_path / "a.img").read_bytes()
    b = seedmod.write_cidata(files, tmp_path / "b.img").read_bytes()
    c = seedmod.write_cidata(seedmod.render_seed("node2", [KEY1]), tmp_path / "c.img").read_bytes()
    assert a == b
    assert a != c


@needs_fat
def test_cidata_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "seed.img"
    out.write_bytes(b"previous image")

    real_run = seedmod.run

    def failing_run(cmd, **kw):  # type: ignore[no-untyped-def]
        # mkfs succeeds, the copy fails: the half-built temp image must vanish.
        if "mcopy" in os.fspath(cmd[0]):
            raise CommandError([os.fspath(c) for c in cmd], 1, "disk full")
        return real_run(cmd, **kw)

    monkeypatch.setattr(seedmod, "run", failing_run)
    with pytest.raises(SohoError, match=r"seed\.img: could not build the cidata volume"):
        seedmod.write_cidata(seedmod.render_seed("node1", [KEY1]), out)
    assert out.read_bytes() == b"previous image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.img"]


def test_cidata_rejects_odd_file_names(tmp_path: Path) -> None:
    with pytest.raises(SohoError, match="not allowed"):
        seedmod.write_cidata({"../meta-data": "x"}, tmp_path / "seed.img")
    assert list(tmp_path.iterdir()) == []


@needs_fat
def test_read_cidata_errors(tmp_path: Path) -> None:
    with pytest.raises(SohoError, match="not found"):
        seedmod.read_cidata(tmp_path / "missing.img")
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(SohoError, match="not a readable FAT"):
        seedmod.read_cidata(junk)
