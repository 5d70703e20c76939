"""SD cards: the root partition grows to the end of the card on the first boot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .context import StepError, info, tool, warn

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see main.py)
if TYPE_CHECKING:
    from .context import Ctx

IMAGE_JSON = "etc/sohocloud/image.json"
MBR_ALIGN = 2048  # sectors: partitions end on MiB boundaries


def mbr_grow(mbr: bytes, partno: int, disk_sectors: int) -> bytes | None:
    """The MBR with primary partition *partno* (1-4) grown to the end of the disk, or None
    when there is nothing to do (no MBR, not the last partition, less than 1 MiB to gain)."""
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa" or not 1 <= partno <= 4:
        return None
    entries = [(int.from_bytes(mbr[446 + 16 * i + 8:446 + 16 * i + 12], "little"),
                int.from_bytes(mbr[446 + 16 * i + 12:446 + 16 * i + 16], "little"), mbr[446 + 16 * i + 4])
               for i in range(4)]
    start, size, ptype = entries[partno - 1]
    if ptype == 0 or size == 0 or ptype in (0x05, 0x0F, 0x85, 0xEE):  # empty, extended, protective GPT
        return None
    if any(t != 0 and s > start for i, (s, _n, t) in enumerate(entries) if i != partno - 1):
        return None  # another partition follows it
    new_size = (disk_sectors - start) // MBR_ALIGN * MBR_ALIGN if start % MBR_ALIGN == 0 else disk_sectors - start
    new_size = min(new_size, 0xFFFFFFFF)
    if new_size < size + MBR_ALIGN:
        return None
    off = 446 + 16 * (partno - 1) + 12
    return mbr[:off] + new_size.to_bytes(4, "little") + mbr[off + 4:]


def root_partition(ctx: Ctx) -> tuple[str, str, int] | None:
    """(disk, partition, number) of the block device holding /, from sysfs."""
    st = os.stat(ctx.path("/"))
    sys_dev = ctx.path(f"sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    try:
        real = Path(os.path.realpath(sys_dev))
        number = int((real / "partition").read_text())
    except (OSError, ValueError):
        return None
    return real.parent.name, real.name, number


def grow_root(ctx: Ctx) -> None:
    """SD cards: the image's root partition is as small as its tree; on the first boot it
    takes the rest of the card (MBR entry, then the kernel's view via partx, then resize2fs)."""
    try:
        image = json.loads(ctx.path(IMAGE_JSON).read_text())
    except (OSError, ValueError):
        return
    if not image.get("grow_root") or not ctx.system:
        return
    found = root_partition(ctx)
    if found is None:
        warn("grow root: the root's partition was not found in sysfs; left as it is")
        return
    disk, part, number = found
    disk_sectors = int(ctx.path(f"sys/block/{disk}/size").read_text())
    with open(ctx.path(f"dev/{disk}"), "r+b") as f:
        new = mbr_grow(f.read(512), number, disk_sectors)
        if new is not None:
            f.seek(0)
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
    # The filesystem is grown even when the partition already was: a power cut between the two
    # (this phase runs again on the next boot) would otherwise leave the root small for good.
    # On a root that already fills its partition resize2fs has nothing to do.
    steps = ([["partx", "-u", "--nr", str(number), f"/dev/{disk}"]] if new is not None else []) + [
        ["resize2fs", f"/dev/{part}"]]
    for cmd in steps:
        r = tool(cmd)
        if r is None or r.returncode != 0:
            raise StepError(f"grow root: {cmd[0]} failed: {(r.stderr.strip() if r else 'not installed')[-300:]}")
    size = int(ctx.path(f"sys/class/block/{part}/size").read_text())
    info(f"grow root: /dev/{part} now fills /dev/{disk} ({size * 512 >> 20} MiB)")
