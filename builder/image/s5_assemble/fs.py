"""Filesystems from a tree, without mounting anything: ext4 (`mkfs.ext4 -d`), FAT (mkfs.vfat +
mtools), squashfs; sizes; a finished directory put in place with renames only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ...proc import run


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
