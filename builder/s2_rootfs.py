"""Stage 2 — rootfs: the distro backend makes the base tree (as a tar).

Debian: one mmdebstrap run.  What keeps it fast:
- no recommends; docs/man/locales and every kernel module outside the
  target's set are never unpacked (dpkg path-exclude);
- INITRD=No: the kernel's postinst does not run mkinitramfs (stage 4 builds
  a small initrd natively, which matters most for emulated arm64);
- the shared package cache is hard-linked in and out, so a rebuild downloads
  no .deb (a bind mount would let mmdebstrap's error cleanup empty the cache).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import time
from pathlib import Path

from .cache import StageCache, StageResult, digest, locked
from .progress import step
from .proc import run
from .s1_resolve import BuildConfig

log = logging.getLogger("sohocloud.rootfs")

MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")


def mmdebstrap_version() -> str:
    return run(["mmdebstrap", "--version"], capture=True).stdout.strip()


def module_dpkg_patterns(module_paths: tuple[str, ...]) -> list[str]:
    """dpkg path filters keeping only the listed subtrees of /lib/modules/*/kernel."""
    opts = ["path-exclude=/lib/modules/*/kernel/*"]
    for rel in module_paths:
        rel = rel.strip("/")
        opts.append(f"path-include=/lib/modules/*/kernel/{rel}")
        if not rel.endswith(".ko"):
            opts.append(f"path-include=/lib/modules/*/kernel/{rel}/*")
    return opts


def apt_sources(d) -> list[str]:
    """The image's apt sources: the suite, its -updates and -security (one-line format)."""
    comps = " ".join(d.components)
    lines = [f"deb {d.mirror} {d.suite} {comps}"]
    if d.updates:
        lines.append(f"deb {d.mirror} {d.suite}-updates {comps}")
    if d.security_mirror:
        lines.append(f"deb {d.security_mirror} {d.suite}-security {comps}")
    return lines


def rootfs_inputs(cfg: BuildConfig) -> dict[str, str]:
    d = cfg.profile.distro
    return {
        "distro": digest([d.name, d.suite, d.mirror, list(d.components), d.variant, apt_sources(d)]),
        "arch": cfg.arch,
        "packages": digest(sorted(cfg.all_packages())),
        "dpkg-filters": digest([cfg.profile.dpkg_exclude, cfg.profile.dpkg_include]),
        "kernel-modules": digest(sorted(cfg.kernel_module_paths())),
        "backend": digest([mmdebstrap_version(), _code_hash()]),
    }


def _code_hash() -> str:
    return digest(Path(__file__).read_text())


def _cache_hooks(pkg_cache: Path, *, sync_out_hook: str) -> list[str]:
    """mmdebstrap options that hard-link the package cache in and out of the chroot."""
    debs, lists = shlex.quote(str(pkg_cache / "debs")), shlex.quote(str(pkg_cache / "lists"))
    link_in = (
        'mkdir -p "$1/var/cache/apt/archives/partial" "$1/var/lib/apt/lists/partial"; '
        f'cp -al {debs}/. "$1/var/cache/apt/archives/" 2>/dev/null || cp -a {debs}/. "$1/var/cache/apt/archives/"; '
        f'cp -a {lists}/. "$1/var/lib/apt/lists/"'
    )
    link_out = (
        f'for f in "$1"/var/cache/apt/archives/*.deb; do [ -e {debs}/"${{f##*/}}" ] || '
        f'cp -al "$f" {debs}/ 2>/dev/null || cp -a "$f" {debs}/; done; '
        f'cp -a "$1"/var/lib/apt/lists/*_InRelease "$1"/var/lib/apt/lists/*_Packages* {lists}/ 2>/dev/null; true'
    )
    return [f"--setup-hook={link_in}", f"{sync_out_hook}={link_out}"]


def _mmdebstrap(cfg: BuildConfig, cache: StageCache, out: Path, *, variant: str, packages: tuple[str, ...],
                extra: list[str]) -> None:
    d = cfg.profile.distro
    pkg_cache = cache.packages(d.name, d.suite, cfg.arch)
    # The extract variant runs no customize hooks: sync the cache out after extracting.
    sync_hook = "--extract-hook" if variant == "extract" else "--customize-hook"
    cmd = [
        "mmdebstrap",
        f"--variant={variant}",
        "--mode=root",
        "--format=tar",
        f"--architectures={cfg.arch}",
        f"--components={','.join(d.components)}",
        "--skip=essential/unlink",
        "--aptopt=APT::Install-Recommends \"false\"",
        "--aptopt=Acquire::Languages \"none\"",
        f"--include={','.join(packages)}",
        *_cache_hooks(pkg_cache, sync_out_hook=sync_hook),
        *extra,
        d.suite,
        str(out),
        *apt_sources(d),
    ]
    env = {"INITRD": "No", "TMPDIR": str(cache.tmp), "SOURCE_DATE_EPOCH": source_date_epoch()}
    # One mmdebstrap per package cache at a time: apt's lists are shared.
    with locked(pkg_cache / ".lock"):
        suites = [line.split()[2] for line in apt_sources(d)]
        fresh = lists_are_fresh(pkg_cache / "lists", suites)
        if fresh:
            cmd.insert(1, "--skip=update")
        run(cmd, env=env, timeout=3600)
        if not fresh:
            (pkg_cache / "lists" / STAMP).touch()


STAMP = ".sohocloud-updated"


def lists_are_fresh(lists: Path, suites: list[str]) -> bool:
    """apt lists fetched less than SOHOCLOUD_APT_MAX_AGE hours ago (default 24), for every
    suite of the sources, are reused without `apt-get update`: a rebuild then touches no network."""
    stamp = lists / STAMP
    max_age = float(os.environ.get("SOHOCLOUD_APT_MAX_AGE", "24")) * 3600
    if not stamp.is_file() or not any(lists.glob("*_Packages*")):
        return False
    if not all(any(lists.glob(f"*_dists_{suite}_InRelease")) for suite in suites):
        return False
    return time.time() - stamp.stat().st_mtime < max_age


def source_date_epoch() -> str:
    """Timestamps in the image: SOURCE_DATE_EPOCH if set, else a fixed date."""
    return os.environ.get("SOURCE_DATE_EPOCH", "1735689600")  # 2025-01-01


def build_rootfs(cfg: BuildConfig, cache: StageCache, *, use_cache: bool = True) -> StageResult:
    inputs = rootfs_inputs(cfg)
    key = digest(inputs)

    def make(out: Path) -> None:
        p = cfg.profile
        extra = [f"--dpkgopt=path-exclude={x}" for x in p.dpkg_exclude]
        extra += [f"--dpkgopt=path-include={x}" for x in p.dpkg_include]
        extra += [f"--dpkgopt={x}" for x in module_dpkg_patterns(cfg.kernel_module_paths())]
        if MERGED_USR_HOOKS.is_dir():
            extra.append(f"--hook-dir={MERGED_USR_HOOKS}")
        with step(f"rootfs: mmdebstrap {p.distro.suite} {cfg.arch}, {len(cfg.all_packages())} packages"):
            _mmdebstrap(cfg, cache, out, variant=p.distro.variant, packages=cfg.all_packages(), extra=extra)

    return cache.produce("rootfs", key, "rootfs.tar", inputs, make, use_cache=use_cache)


def build_bootfiles(cfg: BuildConfig, cache: StageCache, *, use_cache: bool = True) -> StageResult:
    """Boot-time blobs (UEFI loader, static busybox) extracted, never installed or emulated."""
    inputs = {
        "distro": digest(apt_sources(cfg.profile.distro)),
        "arch": cfg.arch,
        "packages": digest(sorted(cfg.arch_spec.boot_packages)),
        "backend": _code_hash(),
    }
    key = digest(inputs)

    def make(out: Path) -> None:
        with step(f"bootfiles: extracting {', '.join(cfg.arch_spec.boot_packages)}"):
            _mmdebstrap(cfg, cache, out, variant="extract", packages=cfg.arch_spec.boot_packages, extra=[])

    return cache.produce("bootfiles", key, "boot.tar", inputs, make, use_cache=use_cache)


def extract_tar(tar: Path, dest: Path) -> None:
    """Unpack a stage tar with owners, modes and xattrs (file capabilities) intact."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tar, "-C", dest])


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
