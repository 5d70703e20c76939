"""Stage 5 — assemble: partitions and filesystems without mounting anything.

ext4 from the tree with `mkfs.ext4 -d`, the ESP with mkfs.vfat + mtools,
the GPT with sfdisk on a plain file, partitions copied in sparsely, then
`qemu-img convert` to a zstd-compressed qcow2.  Identities (filesystem
UUIDs, partition GUIDs) derive from the build's input hash, so the same
inputs give the same disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import SohoError
from .proc import run
from .schema import Partition, parse_size

log = logging.getLogger("sohocloud.assemble")

SECTOR = 512
ALIGN = 1 << 20  # partitions start on MiB boundaries
GPT_TAIL = 1 << 20  # room for the backup GPT

# Discoverable Partitions Specification type GUIDs.
GPT_TYPES = {
    ("esp", None): "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    ("root", "amd64"): "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    ("root", "arm64"): "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
}


def identity(key: str) -> dict[str, str]:
    """Filesystem/partition identities derived from the build key (reproducible)."""
    ns = uuid.UUID(key[:32])
    return {
        "disk_guid": str(uuid.uuid5(ns, "disk")).upper(),
        "root_fs_uuid": str(uuid.uuid5(ns, "root-fs")),
        "esp_vol_id": key[:8].upper(),
        "part:esp": str(uuid.uuid5(ns, "part-esp")).upper(),
        "part:root": str(uuid.uuid5(ns, "part-root")).upper(),
    }


@dataclass(frozen=True)
class Placed:
    name: str
    type: str
    start: int  # bytes
    size: int  # bytes


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_layout(parts: tuple[Partition, ...], sizes: dict[str, int]) -> tuple[list[Placed], int]:
    """Place partitions MiB-aligned after the primary GPT. Returns (placed, disk size).

    *sizes* gives the byte size of each `auto` partition (its filesystem image).
    """
    placed = []
    pos = ALIGN
    for p in parts:
        size = sizes[p.name] if p.size == "auto" else parse_size(p.size)
        size = _align(size)
        placed.append(Placed(p.name, p.type, pos, size))
        pos += size
    return placed, pos + GPT_TAIL


def sfdisk_script(placed: list[Placed], arch: str, ident: dict[str, str]) -> str:
    lines = ["label: gpt", f"label-id: {ident['disk_guid']}", "first-lba: 2048", ""]
    for p in placed:
        type_guid = GPT_TYPES.get((p.type, arch)) or GPT_TYPES[(p.type, None)]
        lines.append(f"start={p.start // SECTOR}, size={p.size // SECTOR}, type={type_guid}, "
                     f"uuid={ident['part:' + p.name]}, name=\"{p.name}\"")
    return "\n".join(lines) + "\n"


def tree_size(root: Path) -> int:
    """Bytes the tree needs in ext4: file data in 4 KiB blocks plus inode tables."""
    total, inodes = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            inodes += 1
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if not os.path.isdir(p):
                total += (st.st_size + 4095) // 4096 * 4096
        total += 4096
    return total + inodes * 256


def make_ext4(tree: Path, out: Path, size: int, fs_uuid: str, label: str, epoch: int) -> None:
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-U", fs_uuid, "-b", "4096", "-m", "0",
         "-E", f"hash_seed={fs_uuid},root_owner=0:0", "-d", tree, out],
        env={"E2FSPROGS_FAKE_TIME": str(epoch)})


def make_esp(files: dict[str, Path | bytes], out: Path, size: int, vol_id: str) -> None:
    """A FAT32 ESP holding *files* (ESP path -> host file or content)."""
    out.unlink(missing_ok=True)
    run(["mkfs.vfat", "-C", "-F", "32", "-s", "1", "-n", "ESP", "-i", vol_id, out, str(size // 1024)])
    made: set[str] = set()
    staging = out.with_suffix(".d")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for esp_path in sorted(files):
            parts = esp_path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in made:
                    run(["mmd", "-i", out, f"::/{d}"])
                    made.add(d)
            src = files[esp_path]
            if isinstance(src, bytes):
                tmp = staging / esp_path.replace("/", "_")
                tmp.write_bytes(src)
                src = tmp
            run(["mcopy", "-i", out, "-o", src, f"::/{esp_path}"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def systemd_boot_files(loader: Path, fallback: str, kernel: Path, initrd: Path, cmdline: str,
                       title: str) -> dict[str, Path | bytes]:
    """The ESP of a systemd-boot disk: loader, one Boot Loader Spec entry, kernel, initrd."""
    entry = (f"title {title}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n").encode()
    return {
        fallback: loader,
        "loader/loader.conf": b"default sohocloud.conf\ntimeout 0\neditor no\nconsole-mode keep\n",
        "loader/entries/sohocloud.conf": entry,
        "vmlinuz": kernel,
        "initrd.img": initrd,
    }


BOOTLOADERS = {"systemd-boot": systemd_boot_files}


def write_disk(placed: list[Placed], images: dict[str, Path], disk_size: int, script: str, out: Path) -> None:
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate(disk_size)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", out], input=script)
    for p in placed:
        img = images[p.name]
        if img.stat().st_size > p.size:
            raise SohoError(f"partition {p.name}: image of {img.stat().st_size} bytes exceeds {p.size}")
        run(["dd", f"if={img}", f"of={out}", "bs=1M", f"seek={p.start // (1 << 20)}", "conv=notrunc,sparse",
             "status=none"])


def to_qcow2(raw: Path, out: Path) -> None:
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
             "-m", "4", "-W", raw, tmp])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
