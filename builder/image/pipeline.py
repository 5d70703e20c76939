"""One build: the stages in order for one BuildConfig, then the artefact, its manifest and SHA256SUMS.

build() reads as the list of its steps; each step is a small function of the BuildJob.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..proc import require_tools
from . import exposure, integrity, s2_rootfs, s3_customise, s4_initrd
from .cache import StageCache, digest, extract_tar, hash_tree, sha256_file
from .identity import identity, source_date_epoch
from .config import BuildConfig
from .s2_rootfs import BaseTrees
from .s4_initrd import KernelFiles
from .s5_assemble import AssembleJob, artefact_path, assemble, assemble_inputs
from .s5_assemble.card import bmap_path
from .s6_manifest import (artefact_files, make_manifest, manifest_path, read_manifest, recorded_sha256,
                          update_sha256sums, write_json_atomic)

log = logging.getLogger("sohocloud.build")

PIPELINE_CODE = Path(__file__).parent  # its code is an input of every artefact


@dataclass(frozen=True)
class BuildResult:
    artefact: Path
    manifest: Path
    seconds: float
    reused: bool


@dataclass
class BuildJob:
    """One build in progress: what it is made from, and what the steps have made so far."""

    cfg: BuildConfig
    out_dir: Path
    cache: StageCache
    use_cache: bool
    inputs: dict[str, str]
    key: str
    artefact: Path
    started: float = field(default_factory=time.monotonic)
    work: Path | None = None
    trees: BaseTrees | None = None
    kernel: KernelFiles | None = None
    packages: dict[str, str] = field(default_factory=dict)
    assembled: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.work / "root"

    @property
    def boot(self) -> Path:
        return self.work / "boot"


def build(cfg: BuildConfig, out_dir: Path, *, cache: StageCache | None = None, use_cache: bool = True,
          explain: bool = False) -> BuildResult:
    job = plan(cfg, out_dir, cache or StageCache(), use_cache)
    reasons = job.cache.explain("image", cfg.slug, job.inputs)
    if use_cache and up_to_date(job.artefact, out_dir, job.key):
        log.info("%s is up to date (inputs %s unchanged): reused", job.artefact, job.key[:12])
        return BuildResult(job.artefact, manifest_path(job.artefact), time.monotonic() - job.started, True)
    if explain:
        log.info("rebuilding %s because: %s", cfg.slug,
                 "--no-cache" if not use_cache else ", ".join(reasons) or "artefact missing or modified")
    with workspace(job):
        make_base_trees(job)        # stage 2, cached: rootfs, kernel, boot files
        unpack_base_trees(job)
        customise_tree(job)         # stage 3
        check_exposure(job)         #          each service's sandbox, measured
        install_kernel(job)         # stage 4: the kernel's modules into the tree,
        make_initrd(job)            #          kernel and initrd out of it
        record_integrity(job)       #          the finished tree's AIDE database
        assemble_artefact(job)      # stage 5
        manifest = write_manifest(job)  # stage 6
    seconds = time.monotonic() - job.started
    log.info("built %s (%.1f MiB) in %.1f s", job.artefact, manifest["sizes"]["artefact_bytes"] / 2**20, seconds)
    return BuildResult(job.artefact, manifest_path(job.artefact), seconds, False)


# --------------------------------------------------------------------------- the steps


def plan(cfg: BuildConfig, out_dir: Path, cache: StageCache, use_cache: bool) -> BuildJob:
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(cfg)
    return BuildJob(cfg, out_dir, cache, use_cache, inputs, digest(inputs), artefact_path(cfg, out_dir))


@contextlib.contextmanager
def workspace(job: BuildJob) -> Iterator[None]:
    """A scratch folder beside the cache (same filesystem: hard links, renames), always removed."""
    job.work = Path(tempfile.mkdtemp(prefix=f"{job.cfg.slug}.", dir=job.cache.tmp))
    try:
        yield
    finally:
        shutil.rmtree(job.work, ignore_errors=True)


def make_base_trees(job: BuildJob) -> None:
    job.trees = s2_rootfs.make_base_trees(job.cfg, job.cache, use_cache=job.use_cache)


def unpack_base_trees(job: BuildJob) -> None:
    extract_tar(job.trees.rootfs.path, job.root)
    if job.trees.bootfiles is not None:
        extract_tar(job.trees.bootfiles.path, job.boot)


def customise_tree(job: BuildJob) -> None:
    job.packages = s3_customise.customise(job.cfg, job.root, identity_of(job))
    log.info("customise: done (%d packages)", len(job.packages))


def check_exposure(job: BuildJob) -> None:
    services = job.cfg.profile.services
    if job.cfg.target.kind == "node" and services.exposure:
        exposure.check(job.root, job.cfg.role, services.run(), services.exposure, job.packages.get("systemd", ""))


def install_kernel(job: BuildJob) -> None:
    if job.trees.kernel is None:
        return
    versions = s4_initrd.install_kernel(job.root, job.trees.kernel.path, job.work / "kernel",
                                        job.cfg.kernel_module_paths())
    job.packages = dict(sorted({**job.packages, **versions}.items()))


def make_initrd(job: BuildJob) -> None:
    if job.trees.kernel is None:
        return
    job.kernel = s4_initrd.make_kernel_and_initrd(job.cfg, job.root, job.boot, job.work / "kernel", job.work,
                                                  int(source_date_epoch()))


def record_integrity(job: BuildJob) -> None:
    if integrity.wanted(job.root):
        integrity.record_baseline(job.root, job.packages.get("aide", ""))


def assemble_artefact(job: BuildJob) -> None:
    job.assembled = assemble(AssembleJob(
        cfg=job.cfg, root=job.root, boot=job.boot if job.trees.bootfiles else None, kernel=job.kernel,
        work=job.work, artefact=job.artefact, ident=identity_of(job), epoch=int(source_date_epoch()), key=job.key))


def write_manifest(job: BuildJob) -> dict:
    manifest = make_manifest(job.cfg, job.artefact, job.key, job.inputs, s2_rootfs.stage_records(job.trees),
                             time.monotonic() - job.started, job.assembled, job.packages)
    path = manifest_path(job.artefact)
    write_json_atomic(path, manifest)
    extra = [bmap_path(job.artefact)] if "bmap" in manifest else []
    update_sha256sums(job.out_dir, [*artefact_files(job.artefact), path, *extra])
    return manifest


# --------------------------------------------------------------------------- inputs


def identity_of(job: BuildJob) -> dict[str, str]:
    return identity(job.key, tuple(p.name for p in job.cfg.target.partitions))


def build_inputs(cfg: BuildConfig) -> dict[str, str]:
    """Every input of the artefact, by name (what --explain compares)."""
    inputs = {f"rootfs:{k}": v for k, v in s2_rootfs.rootfs_inputs(cfg).items()}
    inputs.update({f"customise:{k}": v for k, v in s3_customise.customise_inputs(cfg).items()})
    if cfg.target.kind == "node":
        inputs.update({f"kernel:{k}": v for k, v in s2_rootfs.kernel_inputs(cfg).items()})
        inputs["kernel-modules"] = digest(sorted(cfg.kernel_module_paths()))
    inputs["initrd"] = s4_initrd.initrd_inputs(cfg)
    inputs["assemble"] = assemble_inputs(cfg)
    inputs["builder"] = __version__
    inputs["builder-code"] = digest([hash_tree(PIPELINE_CODE), source_date_epoch()])
    return inputs


def up_to_date(artefact: Path, out_dir: Path, key: str) -> bool:
    """The artefact exists, was built from *key*, and its bytes match SHA256SUMS."""
    m = read_manifest(artefact)
    if not (m and artefact.exists() and m.get("inputs_hash") == key):
        return False
    if artefact.is_dir() and sorted(m.get("files", {})) != [p.name for p in artefact_files(artefact)]:
        return False
    return all(recorded_sha256(out_dir, f) == sha256_file(f) for f in artefact_files(artefact))


def check_build_host(cfgs: list[BuildConfig]) -> None:
    """Before any long work: each distro has a backend, a foreign arch can run here, and the host
    tools these builds use are installed."""
    tools = ["mkfs.ext4", "mkfs.vfat", "mcopy", "sfdisk", "qemu-img", "systemctl"]
    for cfg in cfgs:
        tools += s2_rootfs.check_host(cfg)
    if any("img.xz" in c.target.outputs for c in cfgs):
        tools += ["bmaptool", "xz"]
    if any(c.target.kind == "node" and c.profile.services.exposure for c in cfgs):
        tools += ["systemd-analyze"]  # each service's exposure (exposure.py)
    if any("aide" in c.all_packages() for c in cfgs):  # the integrity baseline (integrity.py)
        tools += ["aide"]
    require_tools(list(dict.fromkeys(tools)))
