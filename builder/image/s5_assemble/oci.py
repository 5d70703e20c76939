"""Output kind oci: a container role's tree as a one-layer OCI image, in one tar.

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...)
that also carries Docker's manifest.json pointing at the same blobs, so both
`podman load` and Debian's docker 20.10 `docker load` take it as is.
Deterministic: sorted entries, numeric owners, times clamped to SOURCE_DATE_EPOCH.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from ...progress import step
from ...proc import run
from ..cache import sha256_file
from ..config import BuildConfig
from ..schema import ContainerConfig
from .fs import tree_size
from .job import AssembleJob

# Never in a container layer: the runtime provides these.
LAYER_EXCLUDES = ("./dev/*", "./proc/*", "./sys/*", "./run/*", "./tmp/*", "./boot/*")


def artefact_path(cfg: BuildConfig, out_dir: Path) -> Path:
    return out_dir / f"{cfg.slug}.tar"


def assemble(job: AssembleJob) -> dict:
    cfg = job.cfg
    with step(f"assemble: OCI archive {job.artefact.name}"):
        return write_oci_archive(job.root, job.artefact, cfg.profile.container, cfg.arch, cfg.slug,
                                 f"sohocloud/{cfg.role}:latest", job.epoch, job.work)


def _tar(src: Path, out: Path, epoch: int, excludes: tuple[str, ...] = ()) -> None:
    run(["tar", "--sort=name", "--numeric-owner", f"--mtime=@{epoch}", "--clamp-mtime", "--format=posix",
         "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
         *[f"--exclude={x}" for x in excludes], "-C", str(src), "-cf", str(out), "."])


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return digest, len(data)


def image_config(container: ContainerConfig, arch: str, diff_id: str, epoch: int, title: str) -> dict:
    created = datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **container.env}
    cfg: dict = {"Env": [f"{k}={v}" for k, v in env.items()], "Cmd": list(container.cmd),
                 "WorkingDir": container.working_dir, "Labels": {"org.opencontainers.image.title": title}}
    if container.user:
        cfg["User"] = container.user
    return {"created": created, "architecture": arch, "os": "linux", "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [{"created": created, "created_by": f"sohocloud build ({title})"}]}


def write_oci_archive(root: Path, artefact: Path, container: ContainerConfig, arch: str, title: str, ref: str,
                      epoch: int, work: Path) -> dict:
    layout = work / "oci"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer_tar = work / "layer.tar"
    _tar(root, layer_tar, epoch, LAYER_EXCLUDES)
    diff_id = sha256_file(layer_tar)
    layer_gz = work / "layer.tar.gz"
    with open(layer_tar, "rb") as src, open(layer_gz, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=epoch) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
    layer_tar.unlink()
    layer_digest = sha256_file(layer_gz)
    layer_size = layer_gz.stat().st_size
    os.replace(layer_gz, blobs / layer_digest)

    config = json.dumps(image_config(container, arch, diff_id, epoch, title), sort_keys=True).encode()
    config_digest, config_size = _blob(blobs, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{config_digest}",
                   "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": f"sha256:{layer_digest}",
                    "size": layer_size}],
    }
    manifest_digest, manifest_size = _blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{manifest_digest}",
        "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1], "io.containerd.image.name": ref},
    }]}
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    # docker < 25 reads manifest.json (docker save format) from the same archive.
    (layout / "manifest.json").write_text(json.dumps([{
        "Config": f"blobs/sha256/{config_digest}", "RepoTags": [ref], "Layers": [f"blobs/sha256/{layer_digest}"]}]))
    tmp = artefact.with_name(f".{artefact.name}.tmp")
    try:
        _tar(layout, tmp, epoch)
        os.replace(tmp, artefact)
    finally:
        tmp.unlink(missing_ok=True)
    return {"image_ref": ref, "layer_digest": f"sha256:{layer_digest}", "manifest_digest": f"sha256:{manifest_digest}",
            "sizes": {"tree_bytes": tree_size(root), "layer_bytes": layer_size}}
