"""What ties an image's identities and time stamps to its inputs (same inputs, same ids).

Filesystem UUIDs, partition GUIDs, the MBR disk id and FAT volume serials derive from the
build's input hash; file times are SOURCE_DATE_EPOCH. Stage 3 writes them into the tree
(fstab) and stage 5 onto the disk, so both take them from here.
"""

from __future__ import annotations

import os
import uuid

DEFAULT_EPOCH = "1735689600"  # 2025-01-01


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


def source_date_epoch() -> str:
    """Timestamps in the image: SOURCE_DATE_EPOCH if set, else a fixed date."""
    return os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH)
