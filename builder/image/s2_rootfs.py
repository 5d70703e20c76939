"""Stage 2 — rootfs: the distro backend makes the base trees, each a tar cached by its input hash.

The role's root tree; for node targets also the kernel, extracted natively (never installed or
configured), and the boot files (boot loaders, a static busybox, board firmware). How: the
backend of the profile's distro (distro/, contract in distro/backend.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .cache import StageCache, StageResult
from .distro import backend_for
from .distro.foreign import check_foreign_arch
from .config import BuildConfig

log = logging.getLogger("sohocloud.rootfs")


@dataclass(frozen=True)
class BaseTrees:
    rootfs: StageResult
    kernel: StageResult | None  # node targets only
    bootfiles: StageResult | None


def rootfs_inputs(cfg: BuildConfig) -> dict[str, str]:
    return backend_for(cfg.distro).rootfs_inputs(cfg)


def kernel_inputs(cfg: BuildConfig) -> dict[str, str]:
    return backend_for(cfg.distro).kernel_inputs(cfg)


def check_host(cfg: BuildConfig) -> list[str]:
    """Before any work: the distro is one we can build and a foreign arch can run here.
    Returns the host tools its backend runs."""
    backend = backend_for(cfg.distro)
    check_foreign_arch(cfg.arch)
    return list(backend.host_tools())


def make_base_trees(cfg: BuildConfig, cache: StageCache, *, use_cache: bool) -> BaseTrees:
    backend = backend_for(cfg.distro)
    rootfs = _logged("rootfs", backend.rootfs(cfg, cache, use_cache=use_cache))
    if cfg.target.kind != "node":
        return BaseTrees(rootfs, None, None)
    kernel = _logged("kernel", backend.kernel(cfg, cache, use_cache=use_cache))
    bootfiles = _logged("bootfiles", backend.bootfiles(cfg, cache, use_cache=use_cache))
    return BaseTrees(rootfs, kernel, bootfiles)


def _logged(what: str, result: StageResult) -> StageResult:
    log.info("%s: %s (%s)", what, "reused cache" if result.reused else "built", result.key[:12])
    return result


def stage_records(trees: BaseTrees) -> dict[str, dict]:
    """For the build record: each base tree's cache key and whether it was reused."""
    named = {"rootfs": trees.rootfs, "kernel": trees.kernel, "bootfiles": trees.bootfiles}
    return {name: {"key": r.key, "reused": r.reused} for name, r in named.items() if r is not None}

