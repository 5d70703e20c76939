"""Stage 5 — assemble: partitions and filesystems without mounting anything.

ext4 from the tree with `mkfs.ext4 -d`, FAT (ESP or a board's boot
partition) with mkfs.vfat + mtools, the GPT or MBR with sfdisk on a plain
file, partitions copied in sparsely, boot loader blobs at their sectors, then
`qemu-img convert` to a zstd-compressed qcow2, or `bmaptool create` + `xz`
for SD cards.  Identities (filesystem UUIDs, partition GUIDs, the MBR disk
id) derive from the build's input hash, so the same inputs give the same disk.
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
    ("boot", None): "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",  # basic data (FAT)
    ("root", "amd64"): "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    ("root", "arm64"): "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
}
MBR_TYPES = {"esp": "ef", "boot": "c", "root": "83"}  # c: FAT32 (LBA), what board firmware looks for


def identity(key: str, partitions: tuple[str, ...] = ("esp", "root")) -> dict[str, str]:
    """Filesystem/partition identities derived from the build key (reproducible)."""
    ns = uuid.UUID(key[:32])
    ident = {
        "disk_guid": str(uuid.uuid5(ns, "disk")).upper(),
        "mbr_id": "0x" + key[8:16],
        "root_fs_uuid": str(uuid.uuid5(ns, "root-fs")),
        "esp_vol_id": key[:8].upper(),  # the disk's FAT volume (ESP or boot partition)
    }
    for name in dict.fromkeys(("esp", "root") + tuple(partitions)):
        ident[f"part:{name}"] = str(uuid.uuid5(ns, f"part-{name}")).upper()
    return ident


def fat_uuid(vol_id: str) -> str:
    """A FAT volume id as blkid and fstab spell it (UUID=9D56-A33A)."""
    return f"{vol_id[:4]}-{vol_id[4:]}"


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


def make_esp(files: dict[str, Path | bytes], out: Path, size: int, vol_id: str, label: str = "ESP") -> None:
    """A FAT32 volume (ESP or a board's boot partition) holding *files* (path on it -> host file or content)."""
    out.unlink(missing_ok=True)
    run(["mkfs.vfat", "-C", "-F", "32", "-s", "1", "-n", label, "-i", vol_id, out, str(size // 1024)])
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


def board_boot_files(target, boot_tree: Path, dtb_tree: Path, kernel: Path, initrd: Path, cmdline: str,
                     templates: Path | None, context: dict) -> dict[str, Path | bytes]:
    """A board's boot partition: firmware files, DTBs, kernel, initrd and the rendered boot
    templates (config.txt, extlinux.conf, ...), all named by the target's data."""
    files: dict[str, Path | bytes] = {}

    def add(entries, tree: Path, what: str) -> list[str]:
        placed = []
        for e in entries:
            matches = sorted(tree.glob(e.src))
            if not matches:
                raise SohoError(f"{what} {e.src}: not found in {tree.name} (is its package in the target's list?)")
            if len(matches) > 1 and not e.dest.endswith("/"):
                raise SohoError(f"{what} {e.src} matches {len(matches)} files: its dest must be a folder (end in /)")
            for m in matches:
                dest = e.dest + m.name if e.dest.endswith("/") else e.dest
                files[dest.lstrip("/")] = m
                placed.append(dest.lstrip("/"))
        return placed

    add(target.boot_files, boot_tree, "boot file")
    dtbs = add(target.dtb_files, dtb_tree, "device tree")
    files[target.kernel_file] = kernel
    files[target.initrd_file] = initrd
    if templates is not None:
        files.update(render_templates(templates, dict(context, kernel=target.kernel_file, initrd=target.initrd_file,
                                                      cmdline=cmdline, dtbs=dtbs, vars=target.vars)))
    return files


def render_templates(templates: Path, context: dict) -> dict[str, Path | bytes]:
    """A target's template folder: *.j2 rendered (and named without the suffix), other files as they are."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    out: dict[str, Path | bytes] = {}
    for p in sorted(templates.rglob("*")):
        if p.is_file():
            rel = p.relative_to(templates).as_posix()
            out[rel.removesuffix(".j2")] = env.get_template(rel).render(**context).encode() if rel.endswith(".j2") \
                else p
    return out


BOOTLOADERS = {"systemd-boot": systemd_boot_files}


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


def to_img_xz(raw: Path, out: Path, bmap: Path) -> None:
    """An SD card image: `bmaptool create` (block map + checksums of the used ranges) on the raw
    disk, then xz. Both written under temp names and renamed."""
    tmp, tmp_bmap = out.with_name("." + out.name + ".tmp"), bmap.with_name("." + bmap.name + ".tmp")
    try:
        run(["bmaptool", "create", "-o", tmp_bmap, raw])
        # -1: measured here on the 1.2 GB storage card, 31.6 s for 155 MB against -3's 81 s for
        # 150 MB (-6: ten times -3's time): 3 % more bytes for a card that is written once.
        run(["xz", "-T2", "-1", "--keep", "--force", raw])
        shutil.move(raw.with_name(raw.name + ".xz"), tmp)
        os.replace(tmp_bmap, bmap)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_bmap.unlink(missing_ok=True)


def to_qcow2(raw: Path, out: Path) -> None:
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
             "-m", "4", "-W", raw, tmp])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def to_squashfs(root: Path, out: Path, epoch: int) -> None:
    """The netboot root: the tree as squashfs (zstd), owners, modes and file capabilities
    kept, every time stamp SOURCE_DATE_EPOCH. Written under a temp name."""
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        # zstd -6: 2-3x faster than xz to make and to read on a slow client, ~10 % larger.
        run(["mksquashfs", root, tmp, "-noappend", "-quiet", "-no-progress", "-comp", "zstd",
             "-Xcompression-level", "6", "-b", "1M", "-xattrs", "-processors", str(os.cpu_count() or 1),
             "-mkfs-time", str(epoch), "-all-time", str(epoch)])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def netboot_files(templates: Path, context: dict) -> dict[str, bytes]:
    """The boot scripts of a netboot set (boot.ipxe, ...): the target's templates rendered."""
    return {rel: data if isinstance(data, bytes) else data.read_bytes()
            for rel, data in render_templates(templates, context).items()}


def publish_dir(staging: Path, dest: Path) -> None:
    """Put a finished directory in place of *dest* with renames only: a reader sees the old
    set or the new one, never a mix (the old one is removed afterwards)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = dest.with_name("." + dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.rename(dest, old)
    os.rename(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
