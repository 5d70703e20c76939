"""Tier 1: stage 4 (builder/s4_initrd.py): module closure, the newc writer and build_initrd on a fake tree."""

from __future__ import annotations

import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.errors import SohoError
from builder.image.s4_initrd import (Cpio, INIT_SCRIPT, UDHCPC_SCRIPT, build_initrd, find_kernel, module_closure,
                                     parse_modules_dep, parse_softdeps)

KVER = "6.1.0-99-amd64"

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/crypto/crc32c_generic.ko:
kernel/net/sched/sch-fq.ko.xz:
""".replace("\\\n", "")

MODULES_SOFTDEP = """\
# Soft dependencies extracted from modules themselves.
softdep ext4 pre: crc32c_generic
softdep virtio_blk pre: nosuch_optional post: also_missing
"""

MODULES_BUILTIN = "kernel/drivers/block/loop.ko\nkernel/fs/fat/vfat.ko\n"


def test_parse_modules_dep() -> None:
    dep = parse_modules_dep(MODULES_DEP + "garbage line without colon\n")
    assert dep["virtio"] == ("kernel/drivers/virtio/virtio.ko", [])
    assert dep["ext4"] == ("kernel/fs/ext4/ext4.ko",
                           ["kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko"])
    assert dep["virtio_pci"][1][-1] == "kernel/drivers/virtio/virtio.ko"
    assert dep["sch_fq"] == ("kernel/net/sched/sch-fq.ko.xz", [])  # '-' -> '_', compression suffix dropped
    assert len(dep) == 12


def test_parse_softdeps() -> None:
    sd = parse_softdeps(
        "# comment\n"
        "softdep ext4 pre: crc32c\n"
        "softdep a-b pre: c d post: e\n"
        "softdep x post: y\n"
        "options foo bar=1\n")
    assert sd == {"ext4": ["crc32c"], "a_b": ["c", "d"], "x": []}


def _closure(wanted: list[str], **kw) -> list[str]:
    dep = parse_modules_dep(MODULES_DEP)
    builtin = {"loop", "vfat"}
    return module_closure(wanted, dep, kw.get("builtin", builtin), kw.get("softdep"))


def _assert_deps_first(order: list[str]) -> None:
    dep = {v[0]: v[1] for v in parse_modules_dep(MODULES_DEP).values()}
    for i, path in enumerate(order):
        for d in dep[path]:
            assert d in order[:i], f"{d} must come before {path} in {order}"
    assert len(order) == len(set(order))


def test_module_closure_dependencies_first() -> None:
    order = _closure(["virtio_pci", "virtio_blk", "ext4"])
    _assert_deps_first(order)
    assert order == [
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
        "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
        "kernel/drivers/virtio/virtio_pci.ko",
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/lib/crc16.ko",
        "kernel/fs/mbcache.ko",
        "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/ext4/ext4.ko",
    ]


def test_module_closure_skips_builtin_and_accepts_dashes() -> None:
    assert _closure(["loop", "vfat"]) == []
    assert _closure(["sch-fq"]) == ["kernel/net/sched/sch-fq.ko.xz"]
    assert _closure(["ext4", "ext4", "jbd2"]) == _closure(["ext4"])


def test_module_closure_softdep_pre_loaded_first() -> None:
    sd = parse_softdeps(MODULES_SOFTDEP)
    order = _closure(["ext4"], softdep=sd)
    assert order[0] == "kernel/crypto/crc32c_generic.ko"
    assert order[-1] == "kernel/fs/ext4/ext4.ko"
    _assert_deps_first(order)


def test_module_closure_missing_softdep_is_ignored() -> None:
    sd = parse_softdeps(MODULES_SOFTDEP)
    order = _closure(["virtio_blk"], softdep=sd)
    assert order == ["kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
                     "kernel/drivers/block/virtio_blk.ko"]


def test_module_closure_missing_required_module() -> None:
    with pytest.raises(SohoError, match="'nosuch_module'"):
        _closure(["virtio_blk", "nosuch-module"])


def test_module_closure_missing_dependency() -> None:
    dep = parse_modules_dep("kernel/a.ko: kernel/b.ko\n")
    with pytest.raises(SohoError, match="'b'"):
        module_closure(["a"], dep, set())


def test_module_closure_required_module_missing_after_softdep() -> None:
    sd = {"ext4": ["crc32c_intel"]}
    with pytest.raises(SohoError, match="crc32c_intel"):
        _closure(["ext4", "crc32c_intel"], softdep=sd)


# --------------------------------------------------------------------------- newc parsing


@dataclass
class Entry:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    data: bytes
    rdev: tuple[int, int]
    offset: int


def parse_newc(blob: bytes) -> list[Entry]:
    """Strict reader for the 'newc' (070701) format; checks padding and the trailer."""
    assert len(blob) % 512 == 0, "archive not padded to 512 bytes"
    out: list[Entry] = []
    off = 0
    while True:
        assert off % 4 == 0
        assert blob[off:off + 6] == b"070701", f"bad magic at {off}: {blob[off:off + 6]!r}"
        f = [int(blob[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, filesize, _dmaj, _dmin, rmaj, rmin, namesize, check = f
        assert check == 0
        name_b = blob[off + 110: off + 110 + namesize]
        assert name_b.endswith(b"\0") and b"\0" not in name_b[:-1]
        pos = off + 110 + namesize
        pad = -pos % 4
        assert blob[pos:pos + pad] == b"\0" * pad
        pos += pad
        data = blob[pos:pos + filesize]
        pos += filesize
        pad = -pos % 4
        assert blob[pos:pos + pad] == b"\0" * pad
        e = Entry(name_b[:-1].decode(), ino, mode, uid, gid, nlink, mtime, data, (rmaj, rmin), off)
        out.append(e)
        off = pos + pad
        if e.name == "TRAILER!!!":
            break
    assert blob[off:] == b"\0" * (len(blob) - off)
    return out


def test_cpio_writer_format(tmp_path: Path) -> None:
    c = Cpio(mtime=1700000000)
    c.dir("bin")
    c.file("bin/hello", b"hello world", 0o755)
    c.symlink("bin/sh", "hello")
    c.chardev("dev/console", 5, 1)
    c.file("empty", b"")
    blob = c.bytes()
    entries = parse_newc(blob)
    assert [e.name for e in entries] == ["bin", "bin/hello", "bin/sh", "dev/console", "empty", "TRAILER!!!"]
    by = {e.name: e for e in entries}
    assert stat.S_ISDIR(by["bin"].mode) and stat.S_IMODE(by["bin"].mode) == 0o755
    assert stat.S_ISREG(by["bin/hello"].mode) and stat.S_IMODE(by["bin/hello"].mode) == 0o755
    assert by["bin/hello"].data == b"hello world"
    assert stat.S_ISLNK(by["bin/sh"].mode) and by["bin/sh"].data == b"hello"
    assert stat.S_ISCHR(by["dev/console"].mode) and by["dev/console"].rdev == (5, 1)
    assert stat.S_IMODE(by["dev/console"].mode) == 0o600
    assert all(e.uid == 0 and e.gid == 0 for e in entries)
    assert all(e.mtime == 1700000000 for e in entries[:-1])
    inos = [e.ino for e in entries[:-1]]
    assert len(set(inos)) == len(inos) and 0 not in inos
    assert by["TRAILER!!!"].mode == 0 and by["TRAILER!!!"].data == b""


def test_cpio_readable_by_host_cpio(tmp_path: Path) -> None:
    cpio = shutil.which("cpio")
    if not cpio:
        pytest.skip("cpio not installed")
    c = Cpio(mtime=0)
    c.dir("etc")
    c.file("etc/x", b"x\n")
    c.chardev("dev/null", 1, 3, 0o666)
    proc = subprocess.run([cpio, "-t", "--quiet"], input=c.bytes(), capture_output=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["etc", "etc/x", "dev/null"]


# --------------------------------------------------------------------------- build_initrd


def _fake_tree(tmp_path: Path) -> tuple[Path, Path]:
    root, boot = tmp_path / "root", tmp_path / "boot"
    mdir = root / "lib/modules" / KVER
    mdir.mkdir(parents=True)
    (mdir / "modules.dep").write_text(MODULES_DEP)
    (mdir / "modules.softdep").write_text(MODULES_SOFTDEP)
    (mdir / "modules.builtin").write_text(MODULES_BUILTIN)
    for line in MODULES_DEP.splitlines():
        rel = line.split(":", 1)[0]
        (mdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (mdir / rel).write_bytes(b"\x7fELF module " + rel.encode())
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{KVER}").write_bytes(b"kernel")
    (boot / "bin").mkdir(parents=True)
    (boot / "bin/busybox").write_bytes(b"\x7fELF busybox")
    return root, boot


def test_build_initrd(tmp_path: Path) -> None:
    root, boot = _fake_tree(tmp_path)
    out = tmp_path / "initrd.img"
    facts = build_initrd(root, boot, "bin/busybox", ["virtio_pci", "virtio_blk", "ext4", "vfat"], out, 1234)
    entries = parse_newc(out.read_bytes())
    by = {e.name: e for e in entries}

    order = (by["etc/modules-load"].data.decode()).splitlines()
    assert order == facts["initrd_modules"]
    assert facts["kernel"] == KVER
    assert order[0] == "kernel/drivers/virtio/virtio.ko"
    assert order.index("kernel/crypto/crc32c_generic.ko") < order.index("kernel/fs/ext4/ext4.ko")
    assert "kernel/fs/fat/vfat.ko" not in order  # builtin
    _assert_deps_first(order)

    assert by["init"].data == INIT_SCRIPT.read_bytes() and stat.S_IMODE(by["init"].mode) == 0o755
    # The netboot branch's DHCP lease script (busybox udhcpc).
    assert by["etc/udhcpc.script"].data == UDHCPC_SCRIPT.read_bytes()
    assert stat.S_IMODE(by["etc/udhcpc.script"].mode) == 0o755
    assert by["bin/busybox"].data == b"\x7fELF busybox" and stat.S_IMODE(by["bin/busybox"].mode) == 0o755
    assert stat.S_ISLNK(by["bin/sh"].mode) and by["bin/sh"].data == b"busybox"
    assert stat.S_ISCHR(by["dev/console"].mode) and by["dev/console"].rdev == (5, 1)
    assert by["dev/null"].rdev == (1, 3)
    for rel in order:
        e = by[f"lib/modules/{rel}"]
        assert e.data == b"\x7fELF module " + rel.encode()
        # every parent directory is in the archive before the file
        parts = Path(rel).parts
        for i in range(1, len(parts)):
            d = "lib/modules/" + "/".join(parts[:i])
            assert stat.S_ISDIR(by[d].mode) and by[d].offset < e.offset
    assert all(e.mtime == 1234 for e in entries[:-1])
    assert not list(tmp_path.glob("*.tmp"))


def test_build_initrd_is_reproducible(tmp_path: Path) -> None:
    root, boot = _fake_tree(tmp_path)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    build_initrd(root, boot, "bin/busybox", ["ext4", "virtio_blk"], a, 1700000000)
    build_initrd(root, boot, "bin/busybox", ["ext4", "virtio_blk"], b, 1700000000)
    assert a.read_bytes() == b.read_bytes()
    build_initrd(root, boot, "bin/busybox", ["ext4", "virtio_blk"], b, 1700000001)
    assert a.read_bytes() != b.read_bytes()  # the timestamp really is in the archive


def test_build_initrd_missing_busybox(tmp_path: Path) -> None:
    root, boot = _fake_tree(tmp_path)
    with pytest.raises(SohoError, match="busybox"):
        build_initrd(root, boot, "usr/bin/busybox", ["ext4"], tmp_path / "i.img", 0)
    assert not (tmp_path / "i.img").exists()


def test_build_initrd_missing_module(tmp_path: Path) -> None:
    root, boot = _fake_tree(tmp_path)
    with pytest.raises(SohoError, match="'btrfs'"):
        build_initrd(root, boot, "bin/busybox", ["ext4", "btrfs"], tmp_path / "i.img", 0)


def test_find_kernel(tmp_path: Path) -> None:
    root, _ = _fake_tree(tmp_path)
    k = find_kernel(root)
    assert k.version == KVER and k.vmlinuz.read_bytes() == b"kernel"
    (root / "lib/modules/6.2.0-other").mkdir()
    with pytest.raises(SohoError, match="exactly one kernel"):
        find_kernel(root)
    shutil.rmtree(root / "lib/modules/6.2.0-other")
    (root / "boot" / f"vmlinuz-{KVER}").unlink()
    with pytest.raises(SohoError, match="vmlinuz"):
        find_kernel(root)
