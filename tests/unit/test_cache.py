"""Tier 1: the stage cache (builder/cache.py), SHA256SUMS (builder/s6_manifest.py) and pipeline.up_to_date."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.image.cache import StageCache, digest, hash_tree, sha256_file
from builder.image.pipeline import up_to_date
from builder.image.s6_manifest import (manifest_path, read_manifest, recorded_sha256, update_sha256sums,
                                       write_json_atomic)

KEY = "5e" * 32


class Builder:
    """A stage build function that counts its calls."""

    def __init__(self, content: bytes = b"stage output\n", fail: bool = False):
        self.calls = 0
        self.content = content
        self.fail = fail

    def __call__(self, out: Path) -> None:
        self.calls += 1
        out.write_bytes(self.content)
        if self.fail:
            raise RuntimeError("build failed half-way")


def _stage_dir(cache: StageCache, stage: str) -> Path:
    return cache.root / "stages" / stage


def test_produce_builds_once_then_reuses(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    b = Builder()
    r1 = cache.produce("rootfs", KEY, "rootfs.tar", {"pkgs": "1"}, b)
    assert (r1.reused, b.calls) == (False, 1)
    assert r1.path.read_bytes() == b"stage output\n" and r1.key == KEY
    assert r1.path == _stage_dir(cache, "rootfs") / KEY / "rootfs.tar"
    meta = json.loads((r1.path.parent / "meta.json").read_text())
    assert meta == {"key": KEY, "inputs": {"pkgs": "1"}, "sha256": hashlib.sha256(b"stage output\n").hexdigest()}

    r2 = cache.produce("rootfs", KEY, "rootfs.tar", {"pkgs": "1"}, b)
    assert (r2.reused, b.calls) == (True, 1)
    assert r2.path == r1.path
    assert sorted(p.name for p in _stage_dir(cache, "rootfs").iterdir()) == [KEY]  # no temp dirs left


def test_produce_other_key_builds_again(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    b = Builder()
    cache.produce("rootfs", KEY, "rootfs.tar", {}, b)
    r = cache.produce("rootfs", "77" * 32, "rootfs.tar", {}, b)
    assert b.calls == 2 and not r.reused


def test_produce_use_cache_false_rebuilds(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    b = Builder()
    cache.produce("rootfs", KEY, "rootfs.tar", {}, b)
    b.content = b"new bytes"
    r = cache.produce("rootfs", KEY, "rootfs.tar", {}, b, use_cache=False)
    assert b.calls == 2 and not r.reused and r.path.read_bytes() == b"new bytes"
    assert cache.lookup("rootfs", KEY, "rootfs.tar") == r.path  # replaced entry is consistent


def test_corrupted_output_is_detected_and_rebuilt(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    b = Builder(b"A" * 1000)
    r1 = cache.produce("initrd", KEY, "initrd.img", {}, b)
    data = bytearray(r1.path.read_bytes())
    data[500] ^= 0x01  # one flipped bit, same size
    r1.path.write_bytes(bytes(data))

    assert cache.lookup("initrd", KEY, "initrd.img") is None
    assert not (_stage_dir(cache, "initrd") / KEY).exists()  # corrupt entry removed

    r2 = cache.produce("initrd", KEY, "initrd.img", {}, b)
    assert b.calls == 2 and not r2.reused
    assert r2.path.read_bytes() == b"A" * 1000


def test_missing_meta_is_a_miss(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    b = Builder()
    r1 = cache.produce("s", KEY, "out", {}, b)
    (r1.path.parent / "meta.json").unlink()
    assert cache.lookup("s", KEY, "out") is None
    assert not cache.produce("s", KEY, "out", {}, b).reused and b.calls == 2


def test_failing_build_leaves_nothing(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    b = Builder(fail=True)
    with pytest.raises(RuntimeError, match="half-way"):
        cache.produce("rootfs", KEY, "rootfs.tar", {}, b)
    assert list(_stage_dir(cache, "rootfs").iterdir()) == []
    assert cache.lookup("rootfs", KEY, "rootfs.tar") is None
    # and the next attempt really builds
    b.fail = False
    r = cache.produce("rootfs", KEY, "rootfs.tar", {}, b)
    assert b.calls == 2 and not r.reused


def test_build_that_writes_no_output_is_an_error(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        cache.produce("s", KEY, "out", {}, lambda out: None)
    assert list(_stage_dir(cache, "s").iterdir()) == []


def test_explain(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    assert cache.explain("image", "router-debian-amd64-qemu", {"a": "1", "b": "2"}) == ["first build of this slot"]
    assert cache.explain("image", "router-debian-amd64-qemu", {"a": "1", "b": "2"}) == []
    assert cache.explain("image", "router-debian-amd64-qemu", {"a": "1", "b": "3", "c": "9"}) == ["b", "c"]
    assert cache.explain("image", "router-debian-amd64-qemu", {"b": "3", "c": "9"}) == ["a"]
    # slots are independent
    assert cache.explain("image", "other-slot", {"b": "3"}) == ["first build of this slot"]


def test_cache_root_env(tmp_path: Path, monkeypatch) -> None:
    from builder.image.cache import cache_root

    monkeypatch.setenv("SOHOCLOUD_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert StageCache().root == tmp_path / "c"


def test_digest_is_stable_and_order_independent() -> None:
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert digest([1, 2]) != digest([2, 1])


# --------------------------------------------------------------------------- hash_tree


def _tree(root: Path) -> Path:
    (root / "etc/sub").mkdir(parents=True)
    (root / "etc/a.conf").write_text("a\n")
    (root / "etc/sub/b.conf").write_text("b\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o644)
    os.symlink("etc/a.conf", root / "link")
    return root


def test_hash_tree_stable(tmp_path: Path) -> None:
    a = hash_tree(_tree(tmp_path / "a"))
    assert a == hash_tree(tmp_path / "a")
    assert a == hash_tree(_tree(tmp_path / "b"))  # location-independent
    assert hash_tree(tmp_path / "missing") == hashlib.sha256().hexdigest()


@pytest.mark.parametrize("change", ["content", "exec_bit", "rename", "new_file", "symlink_target", "delete"])
def test_hash_tree_changes(tmp_path: Path, change: str) -> None:
    root = _tree(tmp_path / "t")
    before = hash_tree(root)
    if change == "content":
        (root / "etc/sub/b.conf").write_text("B\n")
    elif change == "exec_bit":
        os.chmod(root / "run.sh", 0o755)
    elif change == "rename":
        os.rename(root / "etc/sub/b.conf", root / "etc/sub/c.conf")
    elif change == "new_file":
        (root / "etc/new").write_text("")
    elif change == "symlink_target":
        os.unlink(root / "link")
        os.symlink("etc/sub/b.conf", root / "link")
    elif change == "delete":
        (root / "etc/a.conf").unlink()
    assert hash_tree(root) != before


def test_hash_tree_content_not_path_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x/ab").write_text("c")
    (tmp_path / "y").mkdir()
    (tmp_path / "y/a").write_text("bc")
    assert hash_tree(tmp_path / "x") != hash_tree(tmp_path / "y")


# --------------------------------------------------------------------------- SHA256SUMS / manifest


def _sums(out: Path) -> list[tuple[str, str]]:
    return [tuple(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines()]


def test_update_sha256sums_format_and_replace(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    a, b = out / "router-debian-amd64-qemu.qcow2", out / "router-debian-amd64-qemu.qcow2.manifest.json"
    a.write_bytes(b"disk v1")
    b.write_text("{}")
    update_sha256sums(out, [a, b])
    text = (out / "SHA256SUMS").read_text()
    assert text.endswith("\n")
    assert re.fullmatch(r"([0-9a-f]{64}  \S+\n)+", text)
    assert _sums(out) == sorted([(sha256_file(a), a.name), (sha256_file(b), b.name)], key=lambda r: r[1])

    other = out / "nas-debian-amd64-qemu.qcow2"
    other.write_bytes(b"other")
    update_sha256sums(out, [other])
    a.write_bytes(b"disk v2")
    update_sha256sums(out, [a])
    rows = dict((n, d) for d, n in _sums(out))
    assert rows == {a.name: sha256_file(a), b.name: sha256_file(b), other.name: sha256_file(other)}
    assert len(_sums(out)) == 3  # replaced, not appended
    assert recorded_sha256(out, a) == sha256_file(a)
    assert not list(out.glob(".SHA256SUMS.tmp"))


def test_update_sha256sums_drops_vanished_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    a, b = out / "a.qcow2", out / "b.qcow2"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    update_sha256sums(out, [a, b])
    b.unlink()
    update_sha256sums(out, [a])
    assert [n for _, n in _sums(out)] == ["a.qcow2"]
    assert recorded_sha256(out, b) is None


def test_sha256sums_verifies_with_coreutils(tmp_path: Path) -> None:
    if not shutil.which("sha256sum"):
        pytest.skip("sha256sum not installed")
    out = tmp_path / "out"
    out.mkdir()
    f = out / "x.qcow2"
    f.write_bytes(b"x" * 1000)
    update_sha256sums(out, [f])
    proc = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_manifest_roundtrip(tmp_path: Path) -> None:
    art = tmp_path / "r.qcow2"
    assert manifest_path(art) == tmp_path / "r.qcow2.manifest.json"
    assert read_manifest(art) is None
    write_json_atomic(manifest_path(art), {"inputs_hash": KEY})
    assert read_manifest(art) == {"inputs_hash": KEY}
    manifest_path(art).write_text("{not json")
    assert read_manifest(art) is None


def _built(tmp_path: Path, key: str = KEY) -> tuple[Path, Path]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    art = out / "router-debian-amd64-qemu.qcow2"
    art.write_bytes(b"qcow2 bytes")
    write_json_atomic(manifest_path(art), {"inputs_hash": key})
    update_sha256sums(out, [art, manifest_path(art)])
    return out, art


def test_up_to_date(tmp_path: Path) -> None:
    out, art = _built(tmp_path)
    assert up_to_date(art, out, KEY) is True
    assert up_to_date(art, out, "00" * 32) is False  # other inputs


def test_up_to_date_false_when_artefact_modified(tmp_path: Path) -> None:
    out, art = _built(tmp_path)
    art.write_bytes(b"qcow2 bytez")
    assert up_to_date(art, out, KEY) is False


def test_up_to_date_false_without_manifest_or_sums(tmp_path: Path) -> None:
    out, art = _built(tmp_path)
    (out / "SHA256SUMS").unlink()
    assert up_to_date(art, out, KEY) is False
    out, art = _built(tmp_path)
    manifest_path(art).unlink()
    assert up_to_date(art, out, KEY) is False
    out, art = _built(tmp_path)
    art.unlink()
    assert up_to_date(art, out, KEY) is False

