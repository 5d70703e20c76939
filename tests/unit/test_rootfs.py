"""Stage 2 helpers that run on the host: the native byte-compiling of a foreign-arch tree."""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
from pathlib import Path


from builder.image.distro import debian
from builder.image.cache import StageCache


def _tar(tree: Path, out: Path) -> None:
    subprocess.run(["tar", "--numeric-owner", "-cf", out, "-C", tree, "."], check=True)


def _names(tar: Path) -> list[str]:
    return subprocess.run(["tar", "-tf", tar], check=True, capture_output=True, text=True).stdout.splitlines()


def test_python_tag_from_member_names():
    names = ["./", "./usr/lib/python3/", "./usr/lib/python3.9/", "./usr/lib/python3.11/", "./usr/lib/python3.11/os.py"]
    assert debian.image_python_tag_from_names(names) == "cpython-311"
    assert debian.image_python_tag_from_names(["./", "./usr/lib/", "./usr/lib/python3/"]) is None


def test_compile_appends_checked_hash_pyc_for_stdlib_dist_packages_and_the_etc_link(tmp_path):
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    tree = tmp_path / "tree"
    stdlib = tree / f"usr/lib/python{ver}"
    dist = tree / "usr/lib/python3/dist-packages/pkg"
    etc = tree / f"etc/python{ver}"
    for d in (stdlib, dist, etc, tree / "usr/bin"):
        d.mkdir(parents=True)
    (stdlib / "mod.py").write_text("X = 1\n")
    (dist / "__init__.py").write_text("Y = 2\n")
    (etc / "sitecustomize.py").write_text("Z = 3\n")
    os.symlink(f"/etc/python{ver}/sitecustomize.py", stdlib / "sitecustomize.py")
    (tree / "usr/bin/tool").write_text("untouched\n")
    tar = tmp_path / "rootfs.tar"
    _tar(tree, tar)
    before = _names(tar)

    debian.compile_python_in_tar(tar, StageCache(tmp_path / "cache"))

    names = _names(tar)
    assert names[: len(before)] == before  # appended, nothing rewritten
    tag = sys.implementation.cache_tag
    added = set(names[len(before):])
    assert {f"./usr/lib/python{ver}/__pycache__/mod.{tag}.pyc",
            f"./usr/lib/python{ver}/__pycache__/sitecustomize.{tag}.pyc",
            f"./usr/lib/python3/dist-packages/pkg/__pycache__/__init__.{tag}.pyc"} <= added
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", tar, "-C", out], check=True)
    pyc = out / f"usr/lib/python{ver}/__pycache__/sitecustomize.{tag}.pyc"
    flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
    assert flags == 0b11  # checked hash, as py_compile writes it under SOURCE_DATE_EPOCH
    assert oct(pyc.stat().st_mode & 0o777) == "0o644"
    # The link's .pyc is compiled from the tree's /etc file (not the host's), named as the link.
    code = marshal.loads(pyc.read_bytes()[16:])
    assert "Z" in code.co_names
    assert code.co_filename == f"/usr/lib/python{ver}/sitecustomize.py"


def test_compile_leaves_a_tree_without_python_alone(tmp_path):
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_text("x\n")
    tar = tmp_path / "rootfs.tar"
    _tar(tree, tar)
    data = tar.read_bytes()
    debian.compile_python_in_tar(tar, StageCache(tmp_path / "cache"))
    assert tar.read_bytes() == data


NATIVE = debian.NATIVE_HELPERS


def _fake_deb(archives: Path, package: str, version: str) -> None:
    """A minimal .deb of `package` at `version` in the tree's apt archives."""
    src = archives.parent / f"src-{package}"
    (src / "DEBIAN").mkdir(parents=True)
    (src / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: arm64\nMaintainer: t <t@t>\nDescription: t\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", src, archives / f"{package}_{version}_arm64.deb"],
                   check=True, capture_output=True)


def test_shadow_hooks_leave_the_tree_emulated_when_host_and_image_versions_differ(tmp_path):
    # The host's dash or perl is used only for the very same upstream version; any other
    # version (or no .deb at all) must leave the tree's own interpreter in place, untouched.
    tree = tmp_path / "tree"
    archives = tree / "var/cache/apt/archives"
    archives.mkdir(parents=True)
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/dash").write_bytes(b"tree dash")
    (tree / "usr/bin/perl").write_bytes(b"tree perl")
    _fake_deb(archives, "dash", "0.0.1-1")
    _fake_deb(archives, "perl-base", "0.0.1-1")
    for hook, name in (("sh-shadow.sh", "dash"), ("perl-shadow.sh", "perl")):
        proc = subprocess.run(["sh", NATIVE / hook, tree], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert f"{name} stays emulated" in proc.stderr and "tree 0.0.1" in proc.stderr
        assert (tree / "usr/bin" / name).read_bytes() == f"tree {name}".encode()
    for undo in ("sh-shadow-undo.sh", "perl-shadow-undo.sh"):  # nothing diverted: a no-op
        subprocess.run(["sh", NATIVE / undo, tree], check=True)
    assert sorted(p.name for p in (tree / "usr/bin").iterdir()) == ["dash", "perl"]
    assert not (tree / ".sohocloud-native").exists()
