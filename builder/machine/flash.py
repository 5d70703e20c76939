"""`sohocloud flash IMAGE DEVICE [--seed SEED]`: an SD card image onto a card, safely.

Before a byte is written the device is checked: a whole disk (not a partition), not
holding the running root, nothing of it mounted, used as swap or held by another
device (LVM, RAID, dm-crypt), and removable media (an SD or USB card reader) unless
--force. Then only the blocks the image's .bmap maps are written (the rest of a card
is don't-care), each range checked against the bmap's sha256 as it is written and
again when read back from the device; the node's seed goes onto the card's boot
partition as files (what firstboot reads there) and is read back too.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import lzma
import os
import stat
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..errors import SohoError
from ..proc import require_tools
from ..seed import read_cidata, read_seed_from_fat, write_seed_to_fat
from .qemu import image_info

log = logging.getLogger("sohocloud.flash")

CHUNK = 4 << 20  # bytes read and written at a time
BLKFLSBUF = 0x1261  # <linux/fs.h>: flush and invalidate a block device's buffer cache


@dataclass(frozen=True)
class Bmap:
    image_size: int
    block_size: int
    ranges: tuple[tuple[int, int, str], ...]  # (first block, last block, sha256)

    @property
    def mapped_bytes(self) -> int:
        return sum((last - first + 1) * self.block_size for first, last, _ in self.ranges)


def parse_bmap(text: str) -> Bmap:
    """A bmaptool 2.x block map: image size, block size and checksummed ranges."""
    try:
        root = ET.fromstring(text)
        if root.findtext("ChecksumType", "").strip() != "sha256":
            raise SohoError("bmap: only sha256 block maps are supported")
        ranges = []
        for r in root.iter("Range"):
            first, _, last = r.text.strip().partition("-")
            ranges.append((int(first), int(last or first), r.get("chksum", "")))
        return Bmap(int(root.findtext("ImageSize")), int(root.findtext("BlockSize")), tuple(ranges))
    except (ET.ParseError, TypeError, ValueError) as exc:
        raise SohoError(f"bmap: not a block map file ({exc})") from None


# --------------------------------------------------------------------------- safety


@dataclass(frozen=True)
class Device:
    path: Path
    name: str  # kernel name, e.g. sdb, mmcblk0, loop3
    size: int  # bytes
    removable: bool


def _dev_numbers(sysfs_block: Path) -> set[str]:
    """major:minor of the disk and each of its partitions."""
    out = {(sysfs_block / "dev").read_text().strip()}
    for child in sysfs_block.iterdir():
        if (child / "partition").is_file():
            out.add((child / "dev").read_text().strip())
    return out


def check_device(dev: Path, *, force: bool, sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc"),
                 root_dev: int | None = None) -> Device:
    """Every reason not to write *dev*, as a SohoError naming it; else the Device. Reads only."""
    try:
        st = os.stat(dev)
    except FileNotFoundError:
        raise SohoError(f"{dev}: no such device") from None
    if not stat.S_ISBLK(st.st_mode):
        raise SohoError(f"{dev}: not a block device (give the card's device, e.g. /dev/sdX or /dev/mmcblk0)")
    numbers = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    sysfs = Path(os.path.realpath(sys_root / "dev/block" / numbers))
    if (sysfs / "partition").is_file():
        disk = sysfs.parent.name
        raise SohoError(f"{dev}: a partition of /dev/{disk}; give the whole card (/dev/{disk})")
    name = sysfs.name
    ours = _dev_numbers(sysfs)
    rdev = os.stat("/").st_dev if root_dev is None else root_dev
    if f"{os.major(rdev)}:{os.minor(rdev)}" in ours:
        raise SohoError(f"{dev}: holds the running system's root filesystem; refusing (even with --force)")
    for line in (proc_root / "self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[2] in ours:
            raise SohoError(f"{dev}: mounted at {fields[4]} (major:minor {fields[2]}); unmount it first")
    swaps = (proc_root / "swaps").read_text().splitlines()[1:] if (proc_root / "swaps").is_file() else []
    for line in swaps:
        swap = line.split()[0]
        try:
            sst = os.stat(swap)
        except OSError:
            continue
        if stat.S_ISBLK(sst.st_mode) and f"{os.major(sst.st_rdev)}:{os.minor(sst.st_rdev)}" in ours:
            raise SohoError(f"{dev}: in use as swap ({swap}); swapoff it first")
    for part in [sysfs] + [c for c in sysfs.iterdir() if (c / "partition").is_file()]:
        holders = sorted(p.name for p in (part / "holders").iterdir()) if (part / "holders").is_dir() else []
        if holders:
            raise SohoError(f"{dev}: /dev/{part.name} is in use by {', '.join(holders)} (LVM, RAID or dm-crypt)")
    size = int((sysfs / "size").read_text()) * 512
    # An SD card in a built-in slot (mmc bus) reports removable=0, yet the card is removable media.
    removable = (sysfs / "removable").read_text().strip() == "1" or "/mmc_host/" in str(sysfs)
    if not removable and not force:
        raise SohoError(f"{dev}: not removable media ({size >> 20} MiB; /sys/block/{name}/removable is 0). "
                        "If it really is the card, add --force")
    return Device(dev, name, size, removable)


# --------------------------------------------------------------------------- writing


def _progress(label: str, done: int, total: int, state: dict) -> None:
    pct = 100 * done // max(total, 1)
    if done and (pct >= state.get("next", 0) or done == total):
        rate = done / max(time.monotonic() - state.setdefault("t0", time.monotonic()), 1e-3)
        log.info("flash: %s %3d%% (%d of %d MiB, %.0f MiB/s)", label, pct, done >> 20, total >> 20, rate / 2**20)
        state["next"] = pct - pct % 10 + 10


def write_image(image: Path, bmap: Bmap, dev_fd: int) -> None:
    """Decompress *image* (.img.xz, or a raw .img) and write the mapped ranges only, each
    checked against its sha256 before it counts as written."""
    opener = lzma.open if image.name.endswith(".xz") else open
    state: dict = {}
    written = 0
    with opener(image, "rb") as src:
        pos = 0
        for first, last, chksum in bmap.ranges:
            start, end = first * bmap.block_size, min((last + 1) * bmap.block_size, bmap.image_size)
            while pos < start:  # the unmapped part of the stream: read past it
                skipped = src.read(min(CHUNK, start - pos))
                if not skipped:
                    raise SohoError(f"{image}: ends at byte {pos}, its bmap maps up to {end}")
                pos += len(skipped)
            h = hashlib.sha256()
            while pos < end:
                data = src.read(min(CHUNK, end - pos))
                if not data:
                    raise SohoError(f"{image}: ends at byte {pos}, its bmap maps up to {end}")
                h.update(data)
                os.pwrite(dev_fd, data, pos)
                pos += len(data)
                written += len(data)
                _progress("writing", written, bmap.mapped_bytes, state)
            if chksum and h.hexdigest() != chksum:
                raise SohoError(f"{image}: blocks {first}-{last} do not match the bmap's sha256: a corrupt image")
    os.fsync(dev_fd)


def verify_device(dev: Path, bmap: Bmap) -> None:
    """Read every mapped range back from the device itself (the page cache dropped first)."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)  # drop the device's cached pages: what follows reads the device
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        state: dict = {}
        done = 0
        for first, last, chksum in bmap.ranges:
            start, end = first * bmap.block_size, min((last + 1) * bmap.block_size, bmap.image_size)
            h = hashlib.sha256()
            pos = start
            while pos < end:
                data = os.pread(fd, min(CHUNK, end - pos), pos)
                if not data:
                    raise SohoError(f"{dev}: read back ended at byte {pos}")
                h.update(data)
                pos += len(data)
                done += len(data)
                _progress("verifying", done, bmap.mapped_bytes, state)
            if chksum and h.hexdigest() != chksum:
                raise SohoError(f"{dev}: blocks {first}-{last} read back differ from the image: "
                                "the card is faulty or was changed while writing")
    finally:
        os.close(fd)


def flash(image: Path, dev: Path, *, seed: Path | None = None, force: bool = False) -> Device:
    require_tools(["mcopy", "mmd", "mdir"])
    manifest = image_info(image)
    bmap_file = image.with_name(manifest.get("bmap", image.name + ".bmap"))
    if not bmap_file.is_file():
        raise SohoError(f"{image}: its block map {bmap_file.name} is missing")
    bmap = parse_bmap(bmap_file.read_text())
    seed_files = None
    if seed is not None:
        if "seed_partition" not in manifest:
            raise SohoError(f"{image.name}: target {manifest['target']} has no seed partition; attach the seed "
                            "volume instead")
        seed_files = read_cidata(seed)
    device = check_device(dev, force=force)
    if device.size < bmap.image_size:
        raise SohoError(f"{dev}: {device.size >> 20} MiB, the image needs {bmap.image_size >> 20} MiB")
    log.info("flash: %s -> %s (%d MiB card, %d MiB mapped of %d MiB)", image.name, dev, device.size >> 20,
             bmap.mapped_bytes >> 20, bmap.image_size >> 20)
    fd = os.open(dev, os.O_WRONLY | os.O_EXCL)  # O_EXCL on a block device: fails if anything has it open
    try:
        write_image(image, bmap, fd)
    finally:
        os.close(fd)
    verify_device(dev, bmap)
    if seed_files is not None:
        where = manifest["seed_partition"]
        part = next(p for p in manifest["partitions"] if p["name"] == where["name"])
        write_seed_to_fat(dev, part["start"], seed_files, where["folder"])
        if read_seed_from_fat(dev, part["start"], where["folder"]) != seed_files:
            raise SohoError(f"{dev}: the seed read back from the boot partition differs from {seed}")
        os.sync()
        log.info("flash: seed %s written to %s:/%s/ (%s)", seed.name, where["name"], where["folder"],
                 ", ".join(sorted(seed_files)))
    log.info("flash: %s verified; it is safe to remove the card", dev)
    return device
