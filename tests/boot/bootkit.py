"""Helpers the boot tests import by name (conftest.py holds only fixtures: a module named
`conftest` exists in tests/unit too, so importing from it depends on which one pytest loaded last)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from builder.image.pipeline import build
from builder.image.s1_resolve import Repo, resolve

REPO = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("SOHOCLOUD_OUT", REPO / "out"))
ARTIFACTS = Path(os.environ.get("SOHOCLOUD_TEST_ARTIFACTS", REPO / "out" / "test-logs"))
BOOT_TIMEOUT = float(os.environ.get("SOHOCLOUD_BOOT_TIMEOUT", "240"))



def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("boot tests need root (network namespaces, tap devices)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_image(role: str, target: str = "qemu", arch: str = "amd64") -> Path:
    """Build (or reuse: each image is built once per run) one image into OUT."""
    require_root()
    return build(resolve(Repo(REPO), role, target=target, arch=arch), OUT).artefact


def disk_raw(image: Path, work: Path) -> Path:
    """The image's whole disk as a raw file (a card image unpacked with its bmap)."""
    from builder.machine.qemu import disk_format, unpack_card_image

    return image if disk_format(image) == "qcow2" else unpack_card_image(image, work / f"{image.name}.raw")


def partition_raw(image: Path, kind: str, work: Path) -> Path:
    """One partition (the first of type *kind*) of an image, as a raw file."""
    from builder.proc import run

    manifest = json.loads(Path(str(image) + ".manifest.json").read_text())
    part = next(p for p in manifest["partitions"] if p["type"] == kind)
    disk = disk_raw(image, work)
    out, mib = work / f"{kind}.img", 1 << 20
    run(["qemu-img", "dd", "-f", "qcow2" if disk.name.endswith(".qcow2") else "raw", "-O", "raw", f"bs={mib}",
         f"skip={part['start'] // mib}", f"count={part['size'] // mib}", f"if={disk}", f"of={out}"])
    return out


def write_router_site(path: Path, name: str, key_pub: Path, *, net: str = "10.44.0", extra: str = "") -> Path:
    """A one-node site (its router) for the fleet commands; *extra* lines go before `nodes:`."""
    path.write_text(f"""\
site: {name}
domain: {name}.lan
lan: {net}.0/24
admin_ssh_keys: ["{key_pub.read_text().strip()}"]
{extra}nodes:
  - {{name: gw, role: router, address: {net}.1, mac: "52:54:00:{net.split('.')[1]}:00:01"}}
""")
    return path
