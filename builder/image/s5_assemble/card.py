"""Output kind img.xz: an SD card image (.img.xz) and its block map (.img.bmap), which `sohocloud
flash` and bmaptool write, checking each mapped range's sha256."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ...progress import step
from ...proc import run
from ..cache import sha256_file
from ..config import BuildConfig
from .job import AssembleJob
from .rawdisk import build_raw_disk


def artefact_path(cfg: BuildConfig, out_dir: Path) -> Path:
    return out_dir / f"{cfg.slug}.img.xz"


def bmap_path(artefact: Path) -> Path:
    """`<slug>.img.bmap` next to `<slug>.img.xz` (where bmaptool looks for it)."""
    return artefact.with_name(artefact.name.removesuffix(".xz").removesuffix(".img") + ".img.bmap")


def assemble(job: AssembleJob) -> dict:
    disk = build_raw_disk(job)
    bmap = bmap_path(job.artefact)
    with step(f"assemble: bmap + xz {job.artefact.name}"):
        to_img_xz(disk.path, job.artefact, bmap)
    return {**disk.facts, "bmap": bmap.name,
            "raw_blobs": [{"file": b.path.relative_to(job.boot).as_posix(), "offset": b.offset,
                           "sha256": sha256_file(b.path)} for b in disk.blobs]}


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
