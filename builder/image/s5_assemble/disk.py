"""Output kind qcow2: a VM's disk image (GPT, systemd-boot), zstd-compressed clusters."""

from __future__ import annotations

import os
from pathlib import Path

from ...progress import step
from ...proc import run
from ..config import BuildConfig
from .job import AssembleJob
from .rawdisk import build_raw_disk


def artefact_path(cfg: BuildConfig, out_dir: Path) -> Path:
    return out_dir / f"{cfg.slug}.qcow2"


def assemble(job: AssembleJob) -> dict:
    disk = build_raw_disk(job)
    with step(f"assemble: qcow2 {job.artefact.name}"):
        to_qcow2(disk.path, job.artefact)
    return disk.facts


def to_qcow2(raw: Path, out: Path) -> None:
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
             "-m", "4", "-W", raw, tmp])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
