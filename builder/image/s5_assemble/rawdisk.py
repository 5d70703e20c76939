"""The raw disk of a disk image or an SD card: kernel + our initrd on the ESP (systemd-boot) or on
the board's boot partition (its firmware or U-Boot reads the files there), the tree as ext4,
GPT or MBR, raw boot loader blobs at their sectors. disk.py and card.py package it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ...errors import SohoError
from ..identity import fat_uuid
from ..schema import Partition, Target, parse_size
from .bootloader import BOOTLOADERS, board_boot_files
from .fs import make_esp, make_ext4, tree_size
from .job import AssembleJob
from .partitions import GPT_TAIL, PlacedBlob, place_blobs, plan_layout, sfdisk_script, write_disk

log = logging.getLogger("sohocloud.assemble")


@dataclass(frozen=True)
class RawDisk:
    path: Path
    blobs: list[PlacedBlob]
    facts: dict  # manifest facts shared by every disk-shaped artefact


def seed_location(t: Target) -> dict:
    """Where a card's seed files go: the partition mounted above the target's seed_dir, and the
    folder on it (e.g. boot + sohocloud for /boot/firmware/sohocloud)."""
    p = t.seed_partition()
    if p is None:
        return {}
    folder = t.seed_dir[len(p.mount.rstrip("/")) + 1:]
    return {"seed_dir": t.seed_dir, "seed_partition": {"name": p.name, "folder": folder}}


def build_raw_disk(job: AssembleJob) -> RawDisk:
    cfg, t, kernel = job.cfg, job.cfg.target, job.kernel
    cmdline = " ".join(w for w in (f"root=UUID={job.ident['root_fs_uuid']}", t.cmdline, cfg.arch_spec.cmdline) if w)
    root_bytes = tree_size(job.root)
    root_size = (root_bytes + root_bytes // 10 + parse_size(t.root_free)
                 + parse_size(cfg.profile.extra_root_free))
    boot_facts = {"kernel": "/" + t.kernel_file, "initrd": "/" + t.initrd_file, "cmdline": cmdline}
    images = {part.name: partition_image(job, part, cmdline, root_size, boot_facts) for part in t.partitions}
    gpt = t.partition_table == "gpt"
    placed, disk_size = plan_layout(t.partitions, {n: p.stat().st_size for n, p in images.items()},
                                    start=parse_size(t.partitions_start), tail=GPT_TAIL if gpt else 0)
    blobs = place_blobs(t.raw_blobs, job.boot, placed[0].start)
    raw = job.work / "disk.raw"
    bootable = frozenset(p.name for p in t.partitions if p.bootable)
    write_disk(placed, images, disk_size, sfdisk_script(placed, cfg.arch, job.ident, t.partition_table, bootable),
               raw, blobs)
    log.info("assemble: %s disk %d MiB (root %d MiB used)", t.partition_table.upper(), disk_size >> 20,
             root_bytes >> 20)
    facts = {
        "kernel": kernel.version,
        "initrd_modules": kernel.initrd_modules,
        "cmdline": cmdline,
        "boot": boot_facts,
        "bootloader": t.bootloader,
        "partition_table": t.partition_table,
        "fat_uuid": fat_uuid(job.ident["esp_vol_id"]),
        "grow_root": t.grow_root,
        **seed_location(t),
        "partitions": [{"name": p.name, "type": p.type, "start": p.start, "size": p.size} for p in placed],
        "sizes": {"tree_bytes": root_bytes, "disk_bytes": disk_size, "initrd_bytes": kernel.initrd.stat().st_size},
    }
    return RawDisk(raw, blobs, facts)


def partition_image(job: AssembleJob, part: Partition, cmdline: str, root_size: int, boot_facts: dict) -> Path:
    """One partition's filesystem as a file in the work folder (*boot_facts* learns where the
    kernel and initrd went)."""
    cfg, t, kernel = job.cfg, job.cfg.target, job.kernel
    img = job.work / f"{part.name}.img"
    if part.fs == "ext4":
        make_ext4(job.root, img, (root_size + (1 << 20) - 1) // (1 << 20) * (1 << 20),
                  job.ident["root_fs_uuid"], part.name, job.epoch)
    elif part.type == "esp" and t.bootloader == "systemd-boot":
        files = BOOTLOADERS[t.bootloader](
            job.boot / cfg.arch_spec.efi_loader, cfg.arch_spec.efi_fallback, kernel.vmlinuz, kernel.initrd, cmdline,
            f"sohocloud {cfg.slug}")
        make_esp(files, img, parse_size(part.size), job.ident["esp_vol_id"])
        boot_facts["partition"] = part.name
    elif part.type == "boot" and t.bootloader == "files":
        templates = cfg.repo.images / t.boot_templates if t.boot_templates else None
        files = board_boot_files(t, job.boot, kernel.dtb_dir, kernel.vmlinuz, kernel.initrd, cmdline, templates,
                                 {"slug": cfg.slug, "role": cfg.role})
        make_esp(files, img, parse_size(part.size), job.ident["esp_vol_id"], label="BOOT")
        boot_facts["partition"] = part.name
        boot_facts["files"] = sorted(files)
    else:
        raise SohoError(f"partition {part.name}: no builder for fs {part.fs} / type {part.type} "
                        f"with bootloader {t.bootloader}")
    return img
