"""Partitions without mounting anything: MiB-aligned layout, the GPT or MBR written by sfdisk on a
plain file, partition images copied in sparsely, boot loader blobs at their sectors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import SohoError
from ...proc import run
from ..schema import Partition, parse_size

SECTOR = 512
ALIGN = 1 << 20  # partitions start on MiB boundaries
GPT_TAIL = 1 << 20  # room for the backup GPT

# Discoverable Partitions Specification type GUIDs.
GPT_TYPES = {
    ("esp", None): "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    ("boot", None): "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",  # basic data (FAT)
    ("root", "amd64"): "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    ("root", "arm64"): "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
}
MBR_TYPES = {"esp": "ef", "boot": "c", "root": "83"}  # c: FAT32 (LBA), what board firmware looks for


@dataclass(frozen=True)
class Placed:
    name: str
    type: str
    start: int  # bytes
    size: int  # bytes


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_layout(parts: tuple[Partition, ...], sizes: dict[str, int], *, start: int = ALIGN,
                tail: int = GPT_TAIL) -> tuple[list[Placed], int]:
    """Place partitions MiB-aligned from *start*. Returns (placed, disk size).

    *sizes* gives the byte size of each `auto` partition (its filesystem image);
    *tail* is room kept after the last one (GPT: its backup copy; MBR: none).
    """
    placed = []
    pos = start
    for p in parts:
        size = sizes[p.name] if p.size == "auto" else parse_size(p.size)
        size = _align(size)
        placed.append(Placed(p.name, p.type, pos, size))
        pos += size
    return placed, pos + tail


def sfdisk_script(placed: list[Placed], arch: str, ident: dict[str, str], table: str = "gpt",
                  bootable: frozenset[str] = frozenset()) -> str:
    if table == "mbr":
        lines = ["label: dos", f"label-id: {ident['mbr_id']}", "unit: sectors", ""]
        for p in placed:
            flag = ", bootable" if p.name in bootable else ""
            lines.append(f"start={p.start // SECTOR}, size={p.size // SECTOR}, type={MBR_TYPES[p.type]}{flag}")
        return "\n".join(lines) + "\n"
    lines = ["label: gpt", f"label-id: {ident['disk_guid']}", "first-lba: 2048", ""]
    for p in placed:
        type_guid = GPT_TYPES.get((p.type, arch)) or GPT_TYPES[(p.type, None)]
        attrs = ", attrs=LegacyBIOSBootable" if p.name in bootable else ""
        lines.append(f"start={p.start // SECTOR}, size={p.size // SECTOR}, type={type_guid}, "
                     f"uuid={ident['part:' + p.name]}, name=\"{p.name}\"{attrs}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PlacedBlob:
    path: Path
    offset: int  # bytes
    size: int


def place_blobs(blobs, tree: Path, limit: int) -> list[PlacedBlob]:
    """The target's raw blobs from the boot-package tree, checked to fit between the partition
    table and *limit* (the first partition's start) without overlapping each other."""
    out = []
    for b in sorted(blobs, key=lambda b: b.sector):
        path = tree / b.file
        if not path.is_file():
            raise SohoError(f"raw blob {b.file} is not in the boot packages")
        out.append(PlacedBlob(path, b.sector * SECTOR, path.stat().st_size))
    for a, b in zip(out, out[1:]):
        if a.offset + a.size > b.offset:
            raise SohoError(f"raw blob {a.path.name} ({a.size} bytes at {a.offset}) overlaps {b.path.name} "
                            f"at {b.offset}")
    if out and out[-1].offset + out[-1].size > limit:
        last = out[-1]
        raise SohoError(f"raw blob {last.path.name} ends at byte {last.offset + last.size}, after the first "
                        f"partition's start {limit}: raise partitions_start")
    return out


def write_disk(placed: list[Placed], images: dict[str, Path], disk_size: int, script: str, out: Path,
               blobs: list[PlacedBlob] = ()) -> None:
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
    for b in blobs:
        run(["dd", f"if={b.path}", f"of={out}", "bs=512", f"seek={b.offset // SECTOR}", "conv=notrunc",
             "status=none"])
