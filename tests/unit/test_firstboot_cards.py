"""Tier 1: what firstboot does for SD-card nodes: grow the root partition (MBR maths) and
take the seed's secrets off the card's boot partition once both phases are done."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
from sohocloud_firstboot import context, growroot, scrub
from sohocloud_firstboot import main as fb_main

MIB = 2048  # sectors


def mbr(*parts: tuple[int, int, int]) -> bytes:
    """An MBR with (type, start, size) primary entries."""
    b = bytearray(512)
    for i, (ptype, start, size) in enumerate(parts):
        off = 446 + 16 * i
        b[off + 4] = ptype
        b[off + 8:off + 16] = struct.pack("<II", start, size)
    b[510:512] = b"\x55\xaa"
    return bytes(b)


def entry(m: bytes, n: int) -> tuple[int, int]:
    return struct.unpack("<II", m[446 + 16 * (n - 1) + 8:446 + 16 * n])


def test_last_partition_grows_to_the_end_of_the_card() -> None:
    card = 8 * 1024 * MIB  # an 8 GiB card
    old = mbr((0x0C, 1 * MIB, 256 * MIB), (0x83, 257 * MIB, 600 * MIB))
    new = growroot.mbr_grow(old, 2, card)
    assert new is not None and len(new) == 512
    assert entry(new, 2) == (257 * MIB, card - 257 * MIB)
    assert entry(new, 1) == entry(old, 1)
    assert new[:446 + 16 + 12] == old[:446 + 16 + 12] and new[446 + 32:] == old[446 + 32:]  # only that field


def test_end_stays_on_a_mib_boundary() -> None:
    card = 8 * 1024 * MIB + 777  # odd card size
    new = growroot.mbr_grow(mbr((0x83, 16 * MIB, 100 * MIB)), 1, card)
    start, size = entry(new, 1)
    assert (start + size) % MIB == 0 and start + size <= card


def test_nothing_to_do() -> None:
    grown = mbr((0x83, 1 * MIB, 100 * MIB))
    assert growroot.mbr_grow(grown, 1, 101 * MIB + 100) is None  # less than 1 MiB to gain
    assert growroot.mbr_grow(mbr((0x83, 1 * MIB, 100 * MIB), (0x0C, 200 * MIB, 10 * MIB)), 1, 9999 * MIB) is None
    assert growroot.mbr_grow(mbr((0xEE, 1, 2**32 - 1)), 1, 9999 * MIB) is None  # a GPT's protective MBR
    assert growroot.mbr_grow(b"\0" * 512, 1, 9999 * MIB) is None  # no MBR signature
    assert growroot.mbr_grow(grown, 3, 9999 * MIB) is None  # empty entry


def test_grow_root_skipped_without_the_image_flag(tmp_path: Path) -> None:
    ctx = context.Ctx(root=tmp_path, system=True)
    (tmp_path / "etc/sohocloud").mkdir(parents=True)
    (tmp_path / "etc/sohocloud/image.json").write_text('{"grow_root": false}')
    growroot.grow_root(ctx)  # would need /dev and /sys otherwise: returns before touching them


def card_root(tmp_path: Path, mbr_bytes: bytes, disk_sectors: int) -> Path:
    """A fake root as grow_root sees a card: / on mmcblk0p2 (sysfs), the disk's MBR in dev/."""
    root = tmp_path / "root"
    (root / "etc/sohocloud").mkdir(parents=True)
    (root / "etc/sohocloud/image.json").write_text('{"grow_root": true}')
    part = root / "sys/devices/platform/mmc/mmcblk0/mmcblk0p2"
    part.mkdir(parents=True)
    (part / "partition").write_text("2\n")
    st = os.stat(root)
    (root / "sys/dev/block").mkdir(parents=True)
    (root / f"sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").symlink_to(part)
    (root / "sys/block/mmcblk0").mkdir(parents=True)
    (root / "sys/block/mmcblk0/size").write_text(f"{disk_sectors}\n")
    (root / "sys/class/block/mmcblk0p2").mkdir(parents=True)
    (root / "sys/class/block/mmcblk0p2/size").write_text(f"{disk_sectors - 257 * MIB}\n")
    (root / "dev").mkdir()
    (root / "dev/mmcblk0").write_bytes(mbr_bytes)
    return root


@pytest.mark.parametrize("already_grown", [False, True])
def test_root_growth_cut_by_a_power_cut_resumes_on_the_next_boot(tmp_path: Path, monkeypatch, already_grown) -> None:
    """The partition grows, then the filesystem. Power cut between the two: the next boot finds the
    partition grown, and still grows the filesystem (before, it did nothing: a small root for good)."""
    card = 8 * 1024 * MIB
    small = mbr((0x0C, 1 * MIB, 256 * MIB), (0x83, 257 * MIB, 600 * MIB))
    grown = growroot.mbr_grow(small, 2, card)
    root = card_root(tmp_path, grown if already_grown else small, card)
    ran: list[list[str]] = []
    monkeypatch.setattr(growroot, "tool", lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    growroot.grow_root(context.Ctx(root=root, system=True))
    assert (root / "dev/mmcblk0").read_bytes() == grown
    assert [c[0] for c in ran] == (["resize2fs"] if already_grown else ["partx", "resize2fs"])
    assert ran[-1] == ["resize2fs", "/dev/mmcblk0p2"]


def seed_dir(root: Path, iid: str) -> Path:
    d = root / "boot/firmware/sohocloud"
    d.mkdir(parents=True)
    (d / "meta-data").write_text(f"instance-id: {iid}\nlocal-hostname: pi1\n")
    (d / "user-data").write_text("#cloud-config\nsohocloud: {tls: {key: TOPSECRET-KEY}}\n")
    (d / "network-config").write_text("version: 2\n")
    (root / "etc/sohocloud").mkdir(parents=True, exist_ok=True)
    (root / "etc/sohocloud/seed-dirs").write_text("# the card's boot partition\n/boot/firmware/sohocloud\n")
    return d


def test_secrets_leave_the_card_once_both_phases_are_done(tmp_path: Path, capsys) -> None:
    d = seed_dir(tmp_path, "pi1-abc")
    ctx = context.Ctx(root=tmp_path, system=False)
    scrub.scrub_seed_dirs(ctx, "pi1-other")  # another instance's seed: left alone
    assert "TOPSECRET-KEY" in (d / "user-data").read_text()
    scrub.scrub_seed_dirs(ctx, "pi1-abc")
    text = (d / "user-data").read_text()
    assert "TOPSECRET" not in text and text.startswith("#cloud-config\n") and "pi1-abc" in text
    assert (d / "meta-data").read_text().startswith("instance-id: pi1-abc")  # later boots still match
    assert "TOPSECRET" not in capsys.readouterr().out
    assert (d / "user-data").stat().st_mode & 0o077 == 0


def test_online_phase_end_scrubs_and_the_next_boot_is_done(tmp_path: Path) -> None:
    d = seed_dir(tmp_path, "pi1-abc")
    ctx = context.Ctx(root=tmp_path, system=False)
    for marker in (context.MARKER, context.HANDOFF):
        (tmp_path / marker).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / marker).write_text("pi1-abc\n")
    assert fb_main.online_phase(ctx) == 0
    assert "TOPSECRET" not in (d / "user-data").read_text()
    assert fb_main.firstboot(context.Ctx(root=tmp_path, system=False), None, "all") == 0  # "already done"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop mount)")
def test_a_scrubbed_seed_leaves_no_key_material_on_the_disk_read_raw(tmp_path: Path, monkeypatch) -> None:
    """After the scrub, not a byte of the secret is left on the filesystem's disk (a rename alone
    leaves the old blocks, readable by anyone who images the card). ext4 on a loop device here: this
    host's kernel has no vfat; the fleet test reads a real card's FAT partition after its first boot.
    A power cut after the wipe leaves zeros: the next boot is still done, and scrubs again."""
    part = tmp_path / "boot.img"
    subprocess.run(["truncate", "-s", "32M", str(part)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(part)], check=True)
    root = tmp_path / "root"
    firmware = root / "boot/firmware"
    firmware.mkdir(parents=True)
    subprocess.run(["mount", "-o", "loop", str(part), str(firmware)], check=True)
    try:
        d = seed_dir(root, "pi1-abc")
        secret = "-----BEGIN PRIVATE KEY-----" + "K3Y" * 3000  # spans several blocks
        (d / "user-data").write_text(f"#cloud-config\nsohocloud: {{tls: {{key: '{secret}'}}}}\n")
        os.sync()
        ctx = context.Ctx(root=root, system=False)
        for marker in (context.MARKER, context.HANDOFF):
            (root / marker).parent.mkdir(parents=True, exist_ok=True)
            (root / marker).write_text("pi1-abc\n")

        def power_cut(*args, **kw):
            raise OSError(5, "power cut")
        with monkeypatch.context() as m:
            m.setattr(scrub, "write_atomic", power_cut)  # the power goes right after the wipe
            assert fb_main.online_phase(ctx) == 0
        assert (d / "user-data").read_bytes().strip(b"\0") == b""
        # The next boot: "already done (both phases)", and it scrubs what the power cut left.
        assert fb_main.firstboot(context.Ctx(root=root, system=False), None, "all") == 0
        assert (d / "user-data").read_text().startswith(scrub.SCRUBBED_HEAD)
    finally:
        subprocess.run(["umount", str(firmware)], check=True)
    raw = part.read_bytes()
    assert b"K3YK3Y" not in raw and b"BEGIN PRIVATE KEY" not in raw


def test_the_seed_volume_is_mounted_read_only_for_root_alone(tmp_path: Path, monkeypatch) -> None:
    """A cidata volume's keys are readable by root only while it is mounted: vfat with umask 0077,
    else iso9660 with mode 0400 (each type refuses the other's options, so one at a time)."""
    from sohocloud_firstboot import sources
    calls: list[list[str]] = []

    def tool(cmd):
        calls.append(cmd)
        if cmd[0] == "mount":
            mnt = Path(cmd[-1])
            (mnt / "meta-data").write_text("instance-id: x\n")
            ok = cmd[2] == "iso9660"  # a CD-ROM seed: vfat fails first
            return subprocess.CompletedProcess(cmd, 0 if ok else 32, "", "" if ok else "wrong fs type")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(sources, "tool", tool)
    files = sources.read_cidata_device(context.Ctx(root=tmp_path, system=False), "/dev/sr0")
    assert files is not None and files["meta-data"] == b"instance-id: x\n"
    mounts = [c for c in calls if c[0] == "mount"]
    assert [(c[2], c[4]) for c in mounts] == [("vfat", "ro,nosuid,nodev,noexec,umask=0077"),
                                              ("iso9660", "ro,nosuid,nodev,noexec,mode=0400,dmode=0500")]
    assert calls[-1][0] == "umount"
