"""Tier 1: container roles as OCI archives (builder/image/s5_assemble/oci.py) and their target checks."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from builder.errors import ConfigError
from builder.image.s1_resolve import Repo, resolve
from builder.image.s5_assemble.oci import image_config, write_oci_archive
from builder.image.schema import ContainerConfig

REPO = Path(__file__).resolve().parents[2]
EPOCH = 1_700_000_000
REF = "sohocloud/desktop:latest"


def make_tree(root: Path) -> Path:
    """A tiny userland: files, an executable, a symlink, an empty dir, and runtime dirs with content."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("desktop\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "usr/bin/tool", 0o755)
    (root / "bin").symlink_to("usr/bin")
    (root / "var/empty").mkdir(parents=True)
    for d in ("dev", "proc", "tmp"):
        (root / d).mkdir()
        (root / d / "leftover").write_text("from the build host\n")
    return root


def build(tmp_path: Path, name: str, container: ContainerConfig) -> tuple[Path, dict]:
    """A fresh tree and work dir each time, as a rebuild has."""
    base = tmp_path / name
    tree = make_tree(base / "tree")
    (base / "work").mkdir()
    artefact = base / f"{name}.tar"
    facts = write_oci_archive(tree, artefact, container, "amd64", "desktop-debian-amd64-oci", REF, EPOCH,
                              base / "work")
    return artefact, facts


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tf:
        return {m.name.removeprefix("./"): tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def desktop() -> ContainerConfig:
    return resolve(Repo(REPO), "desktop", target="oci").profile.container


@pytest.fixture
def archive(tmp_path, desktop) -> tuple[dict[str, bytes], dict]:
    artefact, facts = build(tmp_path, "a", desktop)
    return members(artefact), facts


def test_layout_and_docker_manifest(archive):
    files, facts = archive
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (docker,) = json.loads(files["manifest.json"])
    assert docker["RepoTags"] == [REF]
    assert docker["Config"] in files and all(layer in files for layer in docker["Layers"])
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "latest", "io.containerd.image.name": REF}
    manifest_blob = files["blobs/sha256/" + entry["digest"].removeprefix("sha256:")]
    assert entry["size"] == len(manifest_blob) and entry["digest"] == facts["manifest_digest"]
    manifest = json.loads(manifest_blob)
    assert "blobs/sha256/" + manifest["config"]["digest"].removeprefix("sha256:") == docker["Config"]
    assert ["blobs/sha256/" + la["digest"].removeprefix("sha256:") for la in manifest["layers"]] == docker["Layers"]
    assert manifest["config"]["size"] == len(files[docker["Config"]])
    assert manifest["layers"][0]["size"] == len(files[docker["Layers"][0]])
    assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert manifest["layers"][0]["digest"] == facts["layer_digest"]


def test_blobs_are_named_by_their_sha256(archive):
    files, _ = archive
    blobs = {k: v for k, v in files.items() if k.startswith("blobs/sha256/")}
    assert len(blobs) == 3  # config, layer, manifest
    for name, data in blobs.items():
        assert name.removeprefix("blobs/sha256/") == hashlib.sha256(data).hexdigest()


def test_config_diff_id_and_cmd(archive, desktop):
    files, _ = archive
    (docker,) = json.loads(files["manifest.json"])
    config = json.loads(files[docker["Config"]])
    layer = gzip.decompress(files[docker["Layers"][0]])
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["created"] == "2023-11-14T22:13:20Z"  # EPOCH, not the build time
    assert desktop.cmd == ("/usr/local/bin/sohocloud-desktop",)
    assert config["config"]["Cmd"] == ["/usr/local/bin/sohocloud-desktop"]
    assert "LANG=C.UTF-8" in config["config"]["Env"] and config["config"]["WorkingDir"] == "/"
    assert "User" not in config["config"]


def test_layer_holds_the_tree_without_runtime_dirs(archive):
    files, _ = archive
    (docker,) = json.loads(files["manifest.json"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(files[docker["Layers"][0]]))) as tf:
        entries = {m.name: m for m in tf.getmembers()}
        assert tf.extractfile("./etc/hostname").read() == b"desktop\n"
        assert tf.extractfile("./usr/bin/tool").read() == b"#!/bin/sh\necho hi\n"
    assert entries["./usr/bin/tool"].mode == 0o755
    assert entries["./bin"].issym() and entries["./bin"].linkname == "usr/bin"
    assert entries["./var/empty"].isdir()
    for d in ("dev", "proc", "tmp"):
        assert not [n for n in entries if n.startswith(f"./{d}/")], d  # the runtime provides these
    assert {m.mtime for m in entries.values()} == {EPOCH}


def test_two_builds_are_byte_identical(tmp_path, desktop):
    a, facts_a = build(tmp_path, "a", desktop)
    b, facts_b = build(tmp_path, "b", desktop)
    assert a.read_bytes() == b.read_bytes()
    assert facts_a["layer_digest"] == facts_b["layer_digest"]


def test_image_config_user_and_env():
    cfg = image_config(ContainerConfig(cmd=("/bin/app", "--serve"), env={"A": "1"}, user="1000:1000",
                                       working_dir="/srv"), "arm64", "ab" * 32, EPOCH, "t")["config"]
    assert cfg["Cmd"] == ["/bin/app", "--serve"] and cfg["User"] == "1000:1000" and cfg["WorkingDir"] == "/srv"
    assert cfg["Env"][0].startswith("PATH=/usr/local/sbin:") and cfg["Env"][1:] == ["A=1"]


def test_desktop_role_refused_on_the_qemu_target():
    with pytest.raises(ConfigError) as exc:
        resolve(Repo(REPO), "desktop", target="qemu")
    assert "container" in str(exc.value) and "oci" in str(exc.value)  # names the kind and the right target
