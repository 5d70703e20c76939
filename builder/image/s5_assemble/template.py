"""Output kind squashfs: a container role's tree as one squashfs file, a runtime's read-only root.

A workstation host mounts it (loop, read-only) and rootless podman runs each session on it with
--rootfs: nothing is unpacked, nothing copied at sign-in, and a diskless PC keeps the template
compressed in its RAM. The tree must hold what the runtime binds over in a read-only root
(/etc/hosts, /etc/resolv.conf, /etc/hostname, /etc/machine-id): the role's overlay provides them.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import SohoError
from ...progress import step
from ..config import BuildConfig
from .fs import to_squashfs, tree_size
from .job import AssembleJob

# podman --rootfs --read-only bind-mounts its own files over these: they must exist in the tree.
BIND_TARGETS = ("etc/hosts", "etc/resolv.conf", "etc/hostname", "etc/machine-id")


def artefact_path(cfg: BuildConfig, out_dir: Path) -> Path:
    return out_dir / f"{cfg.slug}.squashfs"


def assemble(job: AssembleJob) -> dict:
    missing = [p for p in BIND_TARGETS if not (job.root / p).is_file()]
    if missing:
        raise SohoError(f"role {job.cfg.role}: a container template needs {', '.join('/' + p for p in missing)} "
                        "in its tree (an empty file is enough: add it to the role's overlay)")
    with step(f"assemble: template {job.artefact.name}"):
        to_squashfs(job.root, job.artefact, job.epoch)
    return {"sizes": {"tree_bytes": tree_size(job.root), "squashfs_bytes": job.artefact.stat().st_size}}
