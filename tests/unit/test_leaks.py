"""Tier 1: the secrets-in-artefacts search (builder/fleet/leaks.py) on small artefacts of every kind
sohocloud writes: a secret planted anywhere inside is found and named by its file, never shown;
the same artefacts without it are clean."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.fleet.leaks import find_secrets, site_needles
from builder.fleet.secrets import SiteSecrets, wireguard_keypair, write_secret
from builder.fleet.sitefile import SiteNode
from builder.image.s5_assemble.oci import write_oci_archive
from builder.image.schema import ContainerConfig

TOOLS = ("qemu-img", "mksquashfs", "unsquashfs", "xz", "grep")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Path:
    """A site's secrets as `fleet build` makes them: the CA, a node's key, a WireGuard key, a password."""
    root = tmp_path_factory.mktemp("secrets") / "office"
    s = SiteSecrets(root)
    s.ca()
    node = SiteNode("gw", "router", "10.44.0.1", "52:54:00:44:00:01")
    s.wireguard(node)
    s.secret("ldap-admin")
    s.user_password("alice")
    write_secret(root / "wireguard" / "peers" / "laptop.key", wireguard_keypair()[0])
    return root


def tree(base: Path, planted: bytes = b"") -> Path:
    """A small root tree; *planted* goes into a file deep inside."""
    (base / "etc/ssl").mkdir(parents=True)
    (base / "etc/hostname").write_text("node\n")
    (base / "usr/share/doc").mkdir(parents=True)
    (base / "usr/share/doc/readme").write_bytes(b"x" * 5000 + planted + b"y" * 5000)
    return base


def as_qcow2(src: Path, out: Path) -> Path:
    raw = out.with_suffix(".raw")
    raw.write_bytes(b"\0" * 65536 + (src / "usr/share/doc/readme").read_bytes() + b"\0" * 65536)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(out)], check=True)
    raw.unlink()
    return out


def as_card(src: Path, out: Path) -> Path:
    raw = out.with_suffix("")
    raw.write_bytes(b"\0" * 4096 + (src / "usr/share/doc/readme").read_bytes())
    subprocess.run(["xz", "-T1", "-f", str(raw)], check=True)
    return out


def as_squashfs(src: Path, out: Path) -> Path:
    subprocess.run(["mksquashfs", str(src), str(out), "-noappend", "-quiet", "-no-progress", "-comp", "xz"],
                   check=True, capture_output=True)
    return out


def as_pxe(src: Path, out: Path) -> Path:
    out.mkdir()
    as_squashfs(src, out / "rootfs.squashfs")
    (out / "vmlinuz").write_bytes(b"MZ" + b"\0" * 100)
    (out / "initrd.img").write_bytes(gzip.compress(b"070701" + (src / "etc/hostname").read_bytes() * 10))
    return out


def as_pxe_initrd(src: Path, out: Path) -> Path:
    """A PXE set whose compressed initrd is where the secret is."""
    out.mkdir()
    as_squashfs(tree(out.with_name(out.name + "-clean")), out / "rootfs.squashfs")
    (out / "initrd.img").write_bytes(gzip.compress(b"070701" + (src / "usr/share/doc/readme").read_bytes()))
    return out


def as_oci(src: Path, out: Path) -> Path:
    work = out.with_name(out.name + ".work")
    work.mkdir()
    write_oci_archive(src, out, ContainerConfig(), "amd64", "t", "t:latest", 1_700_000_000, work)
    return out


KINDS = {"disk.qcow2": as_qcow2, "card.img.xz": as_card, "template.squashfs": as_squashfs, "pxe": as_pxe,
         "pxe-initrd": as_pxe_initrd, "image.tar": as_oci}


def first_secret_line(secrets: Path, rel: str) -> bytes:
    return (secrets / rel).read_text().splitlines()[1].encode()  # a line of the PEM body


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("secret", ["ca.key", "wireguard/gw.key", "ldap-admin.secret", "users/alice.password",
                                    "wireguard/peers/laptop.key"])
def test_a_secret_anywhere_inside_is_found_and_named(secrets, tmp_path, kind, secret):
    value = first_secret_line(secrets, secret) if secret.endswith("ca.key") else (secrets / secret).read_bytes().strip()
    artefact = KINDS[kind](tree(tmp_path / "tree", b"\n" + value + b"\n"), tmp_path / kind)
    found = find_secrets([artefact], site_needles(secrets))
    assert found and all(any(name.startswith(secret) for name in names) for names in found.values()), found
    assert value.decode() not in repr(found)  # named, never shown


@pytest.mark.parametrize("kind", list(KINDS))
def test_clean_artefacts_are_clean(secrets, tmp_path, kind):
    artefact = KINDS[kind](tree(tmp_path / "tree"), tmp_path / kind)
    assert find_secrets([artefact], site_needles(secrets)) == {}


def test_every_secret_file_is_looked_for(secrets):
    names = {n.name.split(" ")[0] for n in site_needles(secrets)}
    assert names == {"ca.key", "wireguard/gw.key", "ldap-admin.secret", "users/alice.password",
                     "wireguard/peers/laptop.key"}
