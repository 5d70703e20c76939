"""Output kind pxe: the netboot set of a diskless PC, a folder served as is: the kernel, our initrd,
the tree as rootfs.squashfs, and boot.ipxe (from the target's templates), which names them and
the squashfs's sha256 that the initrd checks. Made in a staging folder, renamed into place whole."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ...progress import step
from ..cache import sha256_file
from ..config import BuildConfig
from .bootloader import netboot_files
from .fs import publish_dir, to_squashfs, tree_size
from .job import AssembleJob

log = logging.getLogger("sohocloud.assemble")


def artefact_path(cfg: BuildConfig, out_dir: Path) -> Path:
    """out/pxe/<role>-<distro>-<arch>/ holds what one boot.ipxe loads (target-free: it is served)."""
    return out_dir / "pxe" / f"{cfg.role}-{cfg.distro}-{cfg.arch}"


def assemble(job: AssembleJob) -> dict:
    cfg, t, kernel, artefact = job.cfg, job.cfg.target, job.kernel, job.artefact
    stage = artefact.with_name("." + artefact.name + ".new")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        shutil.copyfile(kernel.initrd, stage / t.initrd_file)
        shutil.copyfile(kernel.vmlinuz, stage / t.kernel_file)
        root_bytes = tree_size(job.root)
        squashfs = stage / "rootfs.squashfs"
        with step(f"assemble: squashfs of {root_bytes >> 20} MiB"):
            to_squashfs(job.root, squashfs, job.epoch)
        cmdline = " ".join(w for w in (t.cmdline, cfg.arch_spec.cmdline) if w)
        context = {"name": artefact.name, "role": cfg.role, "distro": cfg.distro, "arch": cfg.arch,
                   "inputs_hash": job.key, "kernel_file": t.kernel_file, "initrd_file": t.initrd_file,
                   "cmdline": cmdline, "squashfs_sha256": sha256_file(squashfs), "vars": t.vars}
        for rel, data in netboot_files(cfg.repo.images / t.boot_templates, context).items():
            (stage / rel).write_bytes(data)
        files = {p.name: sha256_file(p) for p in sorted(stage.iterdir()) if p.is_file()}
        publish_dir(stage, artefact)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("assemble: netboot set %s: %s", artefact, ", ".join(files))
    return {
        "kernel": kernel.version,
        "initrd_modules": kernel.initrd_modules,
        "cmdline": cmdline,
        "boot": {"script": "boot.ipxe", "kernel": t.kernel_file, "initrd": t.initrd_file,
                 "squashfs": squashfs.name, "cmdline": cmdline},
        "bootloader": t.bootloader,
        "seed_dir": t.seed_dir,
        "files": files,
        "sizes": {"tree_bytes": root_bytes, "initrd_bytes": (artefact / t.initrd_file).stat().st_size,
                  "squashfs_bytes": (artefact / squashfs.name).stat().st_size},
    }
