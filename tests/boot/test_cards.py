"""Tier 2: SD card images (Raspberry Pi 4, ROCK64) as built, and `sohocloud flash` on loop devices.

Structure: the partition table, the boot files and everything they name (config.txt,
cmdline.txt, extlinux.conf paths exist on the card), the boot loader blobs equal to
Debian's own files at the Rockchip offsets. Booting the cards' kernels and roots on
QEMU's virt machine is in test_router.py (the Pi 4 card is arm64's router A) and in
the fleet test (the storage node is a ROCK64).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from builder.image.cache import StageCache
from builder.machine.flash import check_device, parse_bmap
from builder.proc import run
from builder.seed import read_seed_from_fat, render_seed, write_cidata, write_seed_to_fat
from bootkit import REPO, build_image, disk_raw, partition_raw  # tests/boot is on sys.path (prepend import mode)

pytestmark = pytest.mark.boot
BOARDS = ["rpi4", "rock64"]


def manifest_of(image: Path) -> dict:
    return json.loads(Path(str(image) + ".manifest.json").read_text())


@pytest.fixture(scope="module", params=BOARDS)
def card(request, tmp_path_factory) -> dict:
    image = build_image("router", request.param, "arm64")
    work = tmp_path_factory.mktemp(f"card-{request.param}")
    return {"board": request.param, "image": image, "manifest": manifest_of(image), "raw": disk_raw(image, work)}


def fat_files(raw: Path, offset: int) -> set[str]:
    out = run(["mdir", "-/", "-b", "-i", f"{raw}@@{offset}", "::/"], env={"MTOOLS_SKIP_CHECK": "1"},
              capture=True).stdout
    return {line.strip().removeprefix("::/") for line in out.splitlines() if not line.strip().endswith("/")}


def fat_read(raw: Path, offset: int, path: str) -> bytes:
    return subprocess.run(["mcopy", "-n", "-i", f"{raw}@@{offset}", f"::/{path}", "-"], capture_output=True,
                          check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout


def debian_file(package: str, path: str, tmp: Path) -> bytes:
    """A file straight from the archive's .deb in the package cache (not from our build)."""
    debs = sorted((StageCache().root / "packages" / "debian-bookworm-arm64" / "debs").glob(f"{package}_*.deb"))
    assert debs, f"{package} not in the package cache"
    run(["dpkg-deb", "-x", debs[-1], tmp])
    return (tmp / path).read_bytes()


def test_mbr_layout(card):
    table = json.loads(run(["sfdisk", "-J", card["raw"]], capture=True).stdout)["partitiontable"]
    assert table["label"] == "dos"
    parts = table["partitions"]
    m = card["manifest"]
    assert [p["type"] for p in parts] == ["c", "83"]
    assert parts[0].get("bootable") is True and not parts[1].get("bootable")
    assert [p["start"] * 512 for p in parts] == [p["start"] for p in m["partitions"]]
    first = {"rpi4": 1 << 20, "rock64": 16 << 20}[card["board"]]
    assert m["partitions"][0]["start"] == first
    assert card["raw"].stat().st_size == m["sizes"]["disk_bytes"]


def test_boot_files_and_their_references(card):
    m, raw = card["manifest"], card["raw"]
    off = m["partitions"][0]["start"]
    files = fat_files(raw, off)
    assert {"vmlinuz", "initrd.img"} <= files
    cmdline = m["boot"]["cmdline"]
    root_uuid = run(["blkid", "-p", "-O", str(m["partitions"][1]["start"]), "-o", "value", "-s", "UUID", raw],
                    capture=True).stdout.strip()
    assert f"root=UUID={root_uuid}" in cmdline.split()
    if card["board"] == "rpi4":
        assert {"start4.elf", "fixup4.dat", "config.txt", "cmdline.txt", "bcm2711-rpi-4-b.dtb"} <= files
        config = fat_read(raw, off, "config.txt").decode()
        refs = [re.search(r"^kernel=(\S+)", config, re.M).group(1),
                re.search(r"^initramfs (\S+)", config, re.M).group(1),
                *re.findall(r"^device_tree=(\S+)", config, re.M),
                re.search(r"^cmdline=(\S+)", config, re.M).group(1)]
        assert "arm_64bit=1" in config.splitlines()
        assert fat_read(raw, off, "cmdline.txt").decode().strip() == cmdline
    else:
        conf = fat_read(raw, off, "extlinux/extlinux.conf").decode()
        refs = [re.search(rf"^\s*{k}\s+/(\S+)", conf, re.M).group(1) for k in ("linux", "initrd", "fdt")]
        assert "rk3328-rock64.dtb" in refs[2]
        assert re.search(r"^\s*append\s+(.*)$", conf, re.M).group(1).strip() == cmdline
    missing = [r for r in refs if r not in files]
    assert not missing, f"the boot config names files not on the card: {missing}"


def test_boot_blobs_are_debians_at_their_offsets(card, tmp_path):
    m, raw = card["manifest"], card["raw"]
    data = raw.read_bytes()[: m["partitions"][0]["start"]]
    if card["board"] == "rock64":
        for name, sector in (("idbloader.img", 64), ("u-boot.itb", 16384)):
            blob = debian_file("u-boot-rockchip", f"usr/lib/u-boot/rock64-rk3328/{name}", tmp_path / name)
            assert data[sector * 512: sector * 512 + len(blob)] == blob, f"{name} is not at sector {sector}"
        assert [b["offset"] for b in m["raw_blobs"]] == [64 * 512, 16384 * 512]
    else:
        off = m["partitions"][0]["start"]
        for name in ("start4.elf", "fixup4.dat"):
            blob = debian_file("raspi-firmware", f"usr/lib/raspi-firmware/{name}", tmp_path / name)
            assert fat_read(raw, off, name) == blob


def test_card_sha256sums_and_bmap(card):
    image, m = card["image"], card["manifest"]
    sums = (image.parent / "SHA256SUMS").read_text()
    for name in (image.name, m["bmap"], image.name + ".manifest.json"):
        assert re.search(rf"^[0-9a-f]{{64}}  {re.escape(name)}$", sums, re.M), name
    bmap = parse_bmap((image.parent / m["bmap"]).read_text())
    assert bmap.image_size == m["sizes"]["disk_bytes"] and 0 < bmap.mapped_bytes < bmap.image_size


# --------------------------------------------------------------------------- flash, on loop devices


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def loopdev(tmp_path):
    made = []

    def make(size: int) -> Path:
        f = tmp_path / f"card{len(made)}.raw"
        with open(f, "wb") as fh:
            fh.truncate(size)
        dev = run(["losetup", "--find", "--show", f], capture=True).stdout.strip()
        made.append(dev)
        return Path(dev)

    yield make
    for dev in made:
        subprocess.run(["umount", "-l", dev], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture(scope="module")
def pi_card():
    return build_image("router", "rpi4", "arm64")


@pytest.fixture(scope="module")
def seed_img(tmp_path_factory, test_key) -> Path:
    d = tmp_path_factory.mktemp("flash-seed")
    return write_cidata(render_seed("pi-flashed", [test_key.with_suffix(".pub").read_text().strip()]),
                        d / "seed.img")


def test_flash_refuses_a_non_removable_device(pi_card, loopdev, seed_img):
    dev = loopdev(manifest_of(pi_card)["sizes"]["disk_bytes"])
    r = cli("flash", str(pi_card), str(dev), "--seed", str(seed_img))
    assert r.returncode == 2 and "not removable media" in r.stderr and "--force" in r.stderr
    assert run(["blkid", "-p", dev], check=False).returncode != 0  # still blank


def test_flash_refuses_a_mounted_device_even_with_force(pi_card, loopdev, tmp_path):
    dev = loopdev(64 << 20)
    run(["mkfs.ext4", "-q", dev])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", dev, mnt])
    try:
        r = cli("flash", str(pi_card), str(dev), "--force")
        assert r.returncode == 2 and "mounted at" in r.stderr, r.stderr
    finally:
        run(["umount", mnt])


def test_flash_refuses_a_partition_and_a_plain_file(pi_card, loopdev, tmp_path):
    dev = loopdev(64 << 20)
    run(["sfdisk", "--quiet", dev], input="label: dos\n,32M,83\n")
    run(["partx", "-a", dev], check=False)
    r = cli("flash", str(pi_card), f"{dev}p1", "--force")
    assert r.returncode == 2 and "a partition of" in r.stderr, r.stderr
    plain = tmp_path / "not-a-device"
    plain.write_bytes(b"")
    r = cli("flash", str(pi_card), str(plain), "--force")
    assert r.returncode == 2 and "not a block device" in r.stderr


def test_flash_refuses_the_running_root_disk():
    # Read-only: check_device only stats and reads sysfs/procfs; nothing is opened for writing.
    st = os.stat("/")
    sysfs = Path(os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
    if os.major(st.st_dev) == 0 or not (sysfs / "dev").is_file():
        pytest.skip("/ is not on a block device here (overlay, tmpfs)")
    disk = sysfs.parent.name if (sysfs / "partition").exists() else sysfs.name
    with pytest.raises(Exception, match="holds the running system's root filesystem"):
        check_device(Path(f"/dev/{disk}"), force=True)


def test_flash_too_small_a_card(pi_card, loopdev):
    dev = loopdev(64 << 20)
    r = cli("flash", str(pi_card), str(dev), "--force")
    assert r.returncode == 2 and "the image needs" in r.stderr


def test_flashed_card_equals_image_plus_seed(pi_card, loopdev, seed_img, tmp_path):
    m = manifest_of(pi_card)
    size = m["sizes"]["disk_bytes"]
    dev = loopdev(size + (64 << 20))  # a card larger than the image
    r = cli("flash", str(pi_card), str(dev), "--seed", str(seed_img), "--force")
    assert r.returncode == 0, r.stderr
    assert "writing 100%" in r.stderr and "verifying 100%" in r.stderr and "safe to remove" in r.stderr
    # What the card must hold: the image's bytes with the seed written onto its boot partition.
    expected = disk_raw(pi_card, tmp_path)
    from builder.seed import read_cidata

    where = m["seed_partition"]
    start = next(p["start"] for p in m["partitions"] if p["name"] == where["name"])
    write_seed_to_fat(expected, start, read_cidata(seed_img), where["folder"])
    with open(dev, "rb") as got, open(expected, "rb") as want:
        pos = 0
        while pos < size:
            n = min(1 << 22, size - pos)
            a, b = got.read(n), want.read(n)
            assert len(a) == n and a == b, f"card and image differ in the 4 MiB at byte {pos}"
            pos += n
        assert got.read(1 << 20) == b"\0" * (1 << 20)  # nothing written past the image
    assert read_seed_from_fat(dev, start, where["folder"])["meta-data"].startswith("instance-id:")


def debugfs(raw: Path, request: str) -> str:
    return run(["debugfs", "-R", request, str(raw)], capture=True).stdout


@pytest.mark.parametrize("role,allowed", [("storage", True), ("router", False)])
def test_usb_storage_is_on_the_nas_card_only(role, allowed, tmp_path):
    """The NAS's card ships usb-storage (and all it needs, by modules.dep) and does not blacklist it
    (a board's data disks are USB disks); every other role's card blocks it and lacks it."""
    image = build_image(role, "rock64", "arm64")
    raw = partition_raw(image, "root", tmp_path)
    modules = f"/lib/modules/{manifest_of(image)['kernel']}"
    deps = {line.split(":")[0]: line.split(":")[1].split() for line in
            debugfs(raw, f"cat {modules}/modules.dep").splitlines() if ":" in line}
    blacklist = debugfs(raw, "cat /etc/modprobe.d/sohocloud-blacklist.conf")
    assert "blacklist cramfs" in blacklist  # the right file
    usb_storage = "kernel/drivers/usb/storage/usb-storage.ko"
    if allowed:
        assert usb_storage in deps and "kernel/drivers/scsi/sd_mod.ko" in deps
        for dep in deps[usb_storage] + deps["kernel/drivers/scsi/sd_mod.ko"]:
            assert dep in deps, f"{dep} (needed by usb-storage or sd_mod) is not on the card"
        assert "usb-storage" not in blacklist
    else:
        assert usb_storage not in deps
        assert "blacklist usb-storage\ninstall usb-storage /bin/true" in blacklist
