"""Runs the stages in order for one BuildConfig and writes the artefact."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .cache import StageCache, digest, sha256_file
from .errors import SohoError
from .s1_resolve import BuildConfig
from .s2_rootfs import (build_bootfiles, build_kernel, build_rootfs, extract_tar, kernel_inputs, rootfs_inputs,
                        source_date_epoch)
from .s3_customise import customise, customise_inputs
from .s4_initrd import INIT_SCRIPT, UDHCPC_SCRIPT, build_initrd, find_kernel, install_kernel
from .s5_assemble import (BOOTLOADERS, GPT_TAIL, board_boot_files, fat_uuid, identity, make_esp, make_ext4,
                          netboot_files, place_blobs, plan_layout, publish_dir, sfdisk_script, to_img_xz, to_qcow2,
                          to_squashfs, tree_size, write_disk)
from .s5_oci import write_oci_archive
from .s6_manifest import manifest_path, read_manifest, recorded_sha256, update_sha256sums, write_json_atomic
from .progress import step
from .schema import parse_size

log = logging.getLogger("sohocloud.build")


@dataclass(frozen=True)
class BuildResult:
    artefact: Path
    manifest: Path
    seconds: float
    reused: bool


def artefact_path(cfg: BuildConfig, out_dir: Path) -> Path:
    """The file (or, for a netboot set, the folder) a build writes (contract)."""
    if cfg.target.outputs[0] == "pxe":
        # Served as is: out/pxe/<role>-<distro>-<arch>/ holds what one boot.ipxe loads.
        return out_dir / "pxe" / f"{cfg.role}-{cfg.distro}-{cfg.arch}"
    ext = {"qcow2": "qcow2", "img.xz": "img.xz", "oci": "tar"}[cfg.target.outputs[0]]
    return out_dir / f"{cfg.slug}.{ext}"


def artefact_files(artefact: Path) -> list[Path]:
    """The files of an artefact: itself, or a netboot set's files."""
    return sorted(p for p in artefact.iterdir() if p.is_file()) if artefact.is_dir() else [artefact]


def bmap_path(artefact: Path) -> Path:
    """`<slug>.img.bmap` next to `<slug>.img.xz` (where bmaptool looks for it)."""
    return artefact.with_name(artefact.name.removesuffix(".xz").removesuffix(".img") + ".img.bmap")


def build_inputs(cfg: BuildConfig) -> dict[str, str]:
    """Every input of the artefact, by name (what --explain compares)."""
    inputs = {f"rootfs:{k}": v for k, v in rootfs_inputs(cfg).items()}
    inputs.update({f"customise:{k}": v for k, v in customise_inputs(cfg).items()})
    if cfg.target.kind == "node":
        inputs.update({f"kernel:{k}": v for k, v in kernel_inputs(cfg).items()})
        inputs["kernel-modules"] = digest(sorted(cfg.kernel_module_paths()))
    inputs["initrd"] = digest([list(cfg.target.initrd_modules), INIT_SCRIPT.read_text(), UDHCPC_SCRIPT.read_text(),
                               sorted(cfg.arch_spec.boot_packages)])
    inputs["assemble"] = digest([repr(cfg.target), repr(cfg.profile.container), repr(cfg.profile.disks)])
    inputs["builder"] = __version__
    here = Path(__file__).parent
    inputs["builder-code"] = digest({p.name: p.read_text() for p in sorted(here.glob("*.py")) if p.name != "cli.py"}
                                    | {"initrd-init.sh": INIT_SCRIPT.read_text(),
                                       "initrd-udhcpc.sh": UDHCPC_SCRIPT.read_text(),
                                       "SOURCE_DATE_EPOCH": source_date_epoch()})
    return inputs


def up_to_date(artefact: Path, out_dir: Path, key: str) -> bool:
    """The artefact exists, was built from *key*, and its bytes match SHA256SUMS."""
    m = read_manifest(artefact)
    if not (m and artefact.exists() and m.get("inputs_hash") == key):
        return False
    if artefact.is_dir() and sorted(m.get("files", {})) != [p.name for p in artefact_files(artefact)]:
        return False
    return all(recorded_sha256(out_dir, f) == sha256_file(f) for f in artefact_files(artefact))


def build(cfg: BuildConfig, out_dir: Path, *, cache: StageCache | None = None, use_cache: bool = True,
          explain: bool = False) -> BuildResult:
    cache = cache or StageCache()
    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(cfg)
    key = digest(inputs)
    artefact = artefact_path(cfg, out_dir)
    reasons = cache.explain("image", cfg.slug, inputs)
    if use_cache and up_to_date(artefact, out_dir, key):
        log.info("%s is up to date (inputs %s unchanged): reused", artefact, key[:12])
        return BuildResult(artefact, manifest_path(artefact), time.monotonic() - t0, True)
    if explain:
        log.info("rebuilding %s because: %s", cfg.slug,
                 "--no-cache" if not use_cache else ", ".join(reasons) or "artefact missing or modified")

    rootfs = build_rootfs(cfg, cache, use_cache=use_cache)
    log.info("rootfs: %s (%s)", "reused cache" if rootfs.reused else "built", rootfs.key[:12])
    stages = {"rootfs": {"key": rootfs.key, "reused": rootfs.reused}}
    bootfiles = kernel = None
    if cfg.target.kind == "node":
        kernel = build_kernel(cfg, cache, use_cache=use_cache)
        log.info("kernel: %s (%s)", "reused cache" if kernel.reused else "built", kernel.key[:12])
        stages["kernel"] = {"key": kernel.key, "reused": kernel.reused}
        bootfiles = build_bootfiles(cfg, cache, use_cache=use_cache)
        log.info("bootfiles: %s (%s)", "reused cache" if bootfiles.reused else "built", bootfiles.key[:12])
        stages["bootfiles"] = {"key": bootfiles.key, "reused": bootfiles.reused}

    ident = identity(key, tuple(p.name for p in cfg.target.partitions))
    epoch = int(source_date_epoch())
    work = Path(tempfile.mkdtemp(prefix=f"{cfg.slug}.", dir=cache.tmp))
    try:
        root, boot = work / "root", work / "boot"
        extract_tar(rootfs.path, root)
        if bootfiles is not None:
            extract_tar(bootfiles.path, boot)
        facts = customise(cfg, root, ident)
        if kernel is not None:
            facts["packages"].update(install_kernel(root, kernel.path, work / "kernel", cfg.kernel_module_paths()))
            facts["packages"] = dict(sorted(facts["packages"].items()))
        log.info("customise: done (%d packages)", len(facts["packages"]))
        if cfg.target.kind == "node" and cfg.target.netboot:
            out_facts = _assemble_netboot(cfg, root, boot, artefact, key, epoch)
        elif cfg.target.kind == "node":
            out_facts = _assemble_disk(cfg, root, boot, work / "kernel", work, artefact, ident, epoch)
        else:
            with step(f"assemble: OCI archive {artefact.name}"):
                out_facts = write_oci_archive(root, artefact, cfg.profile.container, cfg.arch, cfg.slug,
                                              f"sohocloud/{cfg.role}:latest", epoch, work)

        seconds = time.monotonic() - t0
        manifest = {
            "artefact": artefact.name,
            "slug": cfg.slug,
            "role": cfg.role,
            "distro": cfg.distro,
            "arch": cfg.arch,
            "target": cfg.target_name,
            "kind": cfg.target.kind,
            "builder_version": __version__,
            "inputs_hash": key,
            "inputs": inputs,
            "stages": stages,
            "build_seconds": round(seconds, 1),
            "interfaces": list(cfg.profile.interfaces),
            "network": {k: {"dhcp4": v.dhcp4, "addresses": list(v.addresses)}
                        for k, v in cfg.profile.network.items()},
            "ports": [vars(p) for p in cfg.profile.firewall.ports],
            "clients": [vars(p) for p in cfg.profile.firewall.clients],
            "disks": [vars(d) for d in cfg.profile.disks],
            **out_facts,
            "packages": facts["packages"],
        }
        files = artefact_files(artefact)
        manifest["sizes"]["artefact_bytes"] = sum(f.stat().st_size for f in files)
        mpath = manifest_path(artefact)
        write_json_atomic(mpath, manifest)
        extra = [bmap_path(artefact)] if "bmap" in manifest else []
        update_sha256sums(out_dir, [*files, mpath, *extra])
        log.info("built %s (%.1f MiB) in %.1f s", artefact, manifest["sizes"]["artefact_bytes"] / 2**20, seconds)
        return BuildResult(artefact, mpath, seconds, False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def seed_location(t) -> dict:
    """Where a card's seed files go: the partition mounted above the target's seed_dir, and the
    folder on it (e.g. boot + sohocloud for /boot/firmware/sohocloud)."""
    p = t.seed_partition()
    if p is None:
        return {}
    folder = t.seed_dir[len(p.mount.rstrip("/")) + 1:]
    return {"seed_dir": t.seed_dir, "seed_partition": {"name": p.name, "folder": folder}}


def _assemble_netboot(cfg: BuildConfig, root: Path, boot: Path, artefact: Path, key: str, epoch: int) -> dict:
    """The netboot set: kernel, our initrd, the tree as rootfs.squashfs, and boot.ipxe (from the
    target's templates) that names them and the squashfs's sha256 the initrd checks. Made in a
    staging folder beside *artefact* and renamed into place whole. Returns manifest facts."""
    t = cfg.target
    kernel = find_kernel(root)
    stage = artefact.with_name("." + artefact.name + ".new")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        initrd = stage / t.initrd_file
        initrd_facts = build_initrd(root, boot, cfg.arch_spec.busybox, list(t.initrd_modules), initrd, epoch)
        shutil.copyfile(kernel.vmlinuz, stage / t.kernel_file)
        for p in (root / "boot").glob("*"):
            if p.is_file() or p.is_symlink():
                p.unlink()
        root_bytes = tree_size(root)
        squashfs = stage / "rootfs.squashfs"
        with step(f"assemble: squashfs of {root_bytes >> 20} MiB"):
            to_squashfs(root, squashfs, epoch)
        cmdline = " ".join(w for w in (t.cmdline, cfg.arch_spec.cmdline) if w)
        context = {"name": artefact.name, "role": cfg.role, "distro": cfg.distro, "arch": cfg.arch,
                   "inputs_hash": key, "kernel_file": t.kernel_file, "initrd_file": t.initrd_file,
                   "cmdline": cmdline, "squashfs_sha256": sha256_file(squashfs), "vars": t.vars}
        for rel, data in netboot_files(cfg.repo.images / t.boot_templates, context).items():
            (stage / rel).write_bytes(data)
        files = {p.name: sha256_file(p) for p in artefact_files(stage)}
        publish_dir(stage, artefact)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("assemble: netboot set %s: %s", artefact, ", ".join(files))
    return {
        "kernel": initrd_facts["kernel"],
        "initrd_modules": initrd_facts["initrd_modules"],
        "cmdline": cmdline,
        "boot": {"script": "boot.ipxe", "kernel": t.kernel_file, "initrd": t.initrd_file,
                 "squashfs": squashfs.name, "cmdline": cmdline},
        "bootloader": t.bootloader,
        "seed_dir": t.seed_dir,
        "files": files,
        "sizes": {"tree_bytes": root_bytes, "initrd_bytes": (artefact / t.initrd_file).stat().st_size,
                  "squashfs_bytes": (artefact / squashfs.name).stat().st_size},
    }


def _assemble_disk(cfg: BuildConfig, root: Path, boot: Path, kernel_tree: Path, work: Path, artefact: Path,
                   ident: dict[str, str], epoch: int) -> dict:
    """Kernel + our initrd on the ESP (systemd-boot) or the board's boot partition (its firmware
    or U-Boot reads the files there), the tree as ext4, GPT or MBR, raw boot loader blobs at
    their sectors; then qcow2, or .img.xz + .bmap. Returns manifest facts."""
    t = cfg.target
    kernel = find_kernel(root)
    initrd = work / "initrd.img"
    initrd_facts = build_initrd(root, boot, cfg.arch_spec.busybox, list(t.initrd_modules), initrd, epoch)
    # The kernel lives on the ESP / boot partition; the root keeps its modules only.
    vmlinuz = work / "vmlinuz"
    shutil.copyfile(kernel.vmlinuz, vmlinuz)
    for p in (root / "boot").glob("*"):
        if p.is_file() or p.is_symlink():
            p.unlink()

    cmdline = " ".join(w for w in (f"root=UUID={ident['root_fs_uuid']}", t.cmdline, cfg.arch_spec.cmdline) if w)
    root_bytes = tree_size(root)
    root_size = (root_bytes + root_bytes // 10 + parse_size(t.root_free)
                 + parse_size(cfg.profile.extra_root_free))
    images = {}
    boot_facts = {"kernel": "/" + t.kernel_file, "initrd": "/" + t.initrd_file, "cmdline": cmdline}
    for part in t.partitions:
        img = work / f"{part.name}.img"
        if part.fs == "ext4":
            make_ext4(root, img, (root_size + (1 << 20) - 1) // (1 << 20) * (1 << 20),
                      ident["root_fs_uuid"], part.name, epoch)
        elif part.type == "esp" and t.bootloader == "systemd-boot":
            files = BOOTLOADERS[t.bootloader](
                boot / cfg.arch_spec.efi_loader, cfg.arch_spec.efi_fallback, vmlinuz, initrd, cmdline,
                f"sohocloud {cfg.slug}")
            make_esp(files, img, parse_size(part.size), ident["esp_vol_id"])
            boot_facts["partition"] = part.name
        elif part.type == "boot" and t.bootloader == "files":
            templates = cfg.repo.images / t.boot_templates if t.boot_templates else None
            files = board_boot_files(t, boot, kernel_tree / "usr/lib" / f"linux-image-{kernel.version}", vmlinuz,
                                     initrd, cmdline, templates, {"slug": cfg.slug, "role": cfg.role})
            make_esp(files, img, parse_size(part.size), ident["esp_vol_id"], label="BOOT")
            boot_facts["partition"] = part.name
            boot_facts["files"] = sorted(files)
        else:
            raise SohoError(f"partition {part.name}: no builder for fs {part.fs} / type {part.type} "
                            f"with bootloader {t.bootloader}")
        images[part.name] = img
    gpt = t.partition_table == "gpt"
    placed, disk_size = plan_layout(t.partitions, {n: p.stat().st_size for n, p in images.items()},
                                    start=parse_size(t.partitions_start), tail=GPT_TAIL if gpt else 0)
    blobs = place_blobs(t.raw_blobs, boot, placed[0].start)
    raw = work / "disk.raw"
    bootable = frozenset(p.name for p in t.partitions if p.bootable)
    write_disk(placed, images, disk_size, sfdisk_script(placed, cfg.arch, ident, t.partition_table, bootable),
               raw, blobs)
    log.info("assemble: %s disk %d MiB (root %d MiB used)", t.partition_table.upper(), disk_size >> 20,
             root_bytes >> 20)
    facts: dict = {}
    if t.outputs[0] == "img.xz":
        with step(f"assemble: bmap + xz {artefact.name}"):
            to_img_xz(raw, artefact, bmap_path(artefact))
        facts["bmap"] = bmap_path(artefact).name
        facts["raw_blobs"] = [{"file": b.path.relative_to(boot).as_posix(), "offset": b.offset,
                               "sha256": sha256_file(b.path)} for b in blobs]
    else:
        with step(f"assemble: qcow2 {artefact.name}"):
            to_qcow2(raw, artefact)
    return {
        **facts,
        "kernel": initrd_facts["kernel"],
        "initrd_modules": initrd_facts["initrd_modules"],
        "cmdline": cmdline,
        "boot": boot_facts,
        "bootloader": t.bootloader,
        "partition_table": t.partition_table,
        "fat_uuid": fat_uuid(ident["esp_vol_id"]),
        "grow_root": t.grow_root,
        **seed_location(t),
        "partitions": [{"name": p.name, "type": p.type, "start": p.start, "size": p.size} for p in placed],
        "sizes": {"tree_bytes": root_bytes, "disk_bytes": disk_size, "initrd_bytes": initrd.stat().st_size},
    }
