"""Tier 1: board targets and arm64 as data: layout maths (MBR, Rockchip offsets), boot files,
kernel module selection, block maps, and the errors a bad board file gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import ConfigError, SohoError
from builder.machine.flash import parse_bmap
from builder.image.s5_assemble.card import bmap_path
from builder.image.s5_assemble.rawdisk import seed_location
from builder.image.s1_resolve import Repo, resolve
from builder.image.distro.foreign import check_foreign_arch, is_foreign
from builder.image.s4_initrd import kernel_members, module_selected, parse_package_versions
from builder.image.identity import identity
from builder.image.s5_assemble.bootloader import board_boot_files
from builder.image.s5_assemble.partitions import place_blobs, plan_layout, sfdisk_script
from builder.image.schema import RawBlob
from repo_edit import edit  # tests/unit is on sys.path (prepend import mode)

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def config_error(repo: Path, **kw) -> str:
    with pytest.raises(ConfigError) as ei:
        resolve(Repo(repo), "router", arch="arm64", **kw)
    return str(ei.value)


@pytest.mark.parametrize("target", ["qemu", "rpi4", "rock64"])
def test_every_node_role_resolves_for_arm64(target) -> None:
    repo = Repo(REPO_ROOT)
    for role in ("router", "control", "storage", "workstation-host"):
        cfg = resolve(repo, role, target=target, arch="arm64")
        assert cfg.slug == f"{role}-debian-arm64-{target}"
        # The rootfs does not depend on the target: one arm64 tree per role serves every board.
        assert cfg.all_packages() == resolve(repo, role, target="qemu", arch="arm64").all_packages()


def test_list_shows_boards() -> None:
    from builder.image.s1_resolve import load_target

    repo = Repo(REPO_ROOT)
    assert {"rpi4", "rock64"} <= set(repo.targets())
    assert list(load_target(repo, "rpi4").arches) == ["arm64"]


def test_rock64_layout_leaves_room_for_u_boot() -> None:
    cfg = resolve(Repo(REPO_ROOT), "router", target="rock64", arch="arm64")
    t = cfg.target
    placed, size = plan_layout(t.partitions, {"root": 300 * MIB}, start=16 * MIB, tail=0)
    assert [(p.name, p.start) for p in placed] == [("boot", 16 * MIB), ("root", 272 * MIB)]
    assert size == 572 * MIB  # MBR: no backup table at the end
    script = sfdisk_script(placed, "arm64", identity("ab" * 32, ("boot", "root")), "mbr", frozenset({"boot"}))
    assert script.splitlines()[:2] == ["label: dos", "label-id: 0xabababab"]
    assert "start=32768, size=524288, type=c, bootable" in script
    assert "start=557056, size=614400, type=83" in script and script.count("bootable") == 1


def test_blobs_placed_at_their_sectors(tmp_path: Path) -> None:
    (tmp_path / "idb.img").write_bytes(b"i" * 100_000)
    (tmp_path / "u-boot.itb").write_bytes(b"u" * 900_000)
    blobs = place_blobs((RawBlob("u-boot.itb", 16384), RawBlob("idb.img", 64)), tmp_path, 16 * MIB)
    assert [(b.path.name, b.offset) for b in blobs] == [("idb.img", 32768), ("u-boot.itb", 8 * MIB)]


def test_blob_overlaps_and_overruns_are_refused(tmp_path: Path) -> None:
    (tmp_path / "big.img").write_bytes(b"x" * (8 * MIB))
    (tmp_path / "u-boot.itb").write_bytes(b"u" * 1000)
    with pytest.raises(SohoError, match="overlaps"):
        place_blobs((RawBlob("big.img", 64), RawBlob("u-boot.itb", 16384)), tmp_path, 16 * MIB)
    with pytest.raises(SohoError, match="raise partitions_start"):
        place_blobs((RawBlob("u-boot.itb", 16384),), tmp_path, 8 * MIB)
    with pytest.raises(SohoError, match="not in the boot packages"):
        place_blobs((RawBlob("missing.img", 64),), tmp_path, 16 * MIB)


# A bad board file: the error names the file (and line), the key and what was expected.
BAD_BOARDS = [
    ("rock64", "sector: 64}", "sector: 0}", ["raw_blobs[0].sector", "after the mbr table"]),
    ("rock64", "partitions_start: 16M", "partitions_start: 4M", ["raw_blobs[1].sector", "before partitions_start (8192)"]),
    ("rpi4", "seed_dir: /boot/firmware/sohocloud", "seed_dir: /srv/seed", ["seed_dir", "below no partition's mount"]),
    ("rpi4", "{name: boot, type: boot,", "{name: boot, type: esp,", ["bootloader 'files' needs a partition of type boot"]),
]


@pytest.mark.parametrize("board,old,new,expected", BAD_BOARDS, ids=["blob-in-table", "blob-past-start",
                                                                  "seed-dir-unmounted", "no-boot-partition"])
def test_bad_board_file_is_a_config_error(repo: Path, board, old, new, expected) -> None:
    f = repo / f"images/{board}.yaml"
    edit(f, old, new)
    msg = config_error(repo, target=board)
    assert f"{f}:" in msg
    for part in expected:
        assert part in msg, msg


def test_seed_location_on_the_card() -> None:
    t = resolve(Repo(REPO_ROOT), "router", target="rpi4", arch="arm64").target
    assert seed_location(t) == {"seed_dir": "/boot/firmware/sohocloud",
                                "seed_partition": {"name": "boot", "folder": "sohocloud"}}
    assert seed_location(resolve(Repo(REPO_ROOT), "router").target) == {}


def test_pi_boot_files_from_the_target_data(tmp_path: Path) -> None:
    cfg = resolve(Repo(REPO_ROOT), "router", target="rpi4", arch="arm64")
    boot, dtbs = tmp_path / "boot", tmp_path / "dtbs"
    for rel in ("usr/lib/raspi-firmware/start4.elf", "usr/lib/raspi-firmware/fixup4.dat"):
        (boot / rel).parent.mkdir(parents=True, exist_ok=True)
        (boot / rel).write_bytes(b"fw")
    (dtbs / "broadcom").mkdir(parents=True)
    for name in ("bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb"):
        (dtbs / "broadcom" / name).write_bytes(b"dtb")
    k, i = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    k.write_bytes(b"k")
    i.write_bytes(b"i")
    files = board_boot_files(cfg.target, boot, dtbs, k, i, "root=UUID=x ro", REPO_ROOT / "images/rpi4",
                             {"slug": cfg.slug, "role": "router"})
    assert {"start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "vmlinuz", "initrd.img", "config.txt",
            "cmdline.txt"} <= set(files)
    config = files["config.txt"].decode()
    assert "kernel=vmlinuz" in config and "initramfs initrd.img followkernel" in config
    assert files["cmdline.txt"] == b"root=UUID=x ro\n"
    (dtbs / "broadcom" / "bcm2711-rpi-400.dtb").unlink()
    with pytest.raises(SohoError, match="device tree broadcom/bcm2711-rpi-400.dtb: not found"):
        board_boot_files(cfg.target, boot, dtbs, k, i, "x", None, {})


def test_module_selection_matches_dpkg_filter_semantics() -> None:
    paths = ("drivers/virtio", "fs/mbcache.ko", "arch/*/crypto/chacha*")
    assert module_selected("drivers/virtio/virtio_pci.ko", paths)
    assert module_selected("fs/mbcache.ko", paths)
    assert module_selected("arch/arm64/crypto/chacha-neon.ko", paths)
    assert not module_selected("drivers/virtiox/a.ko", paths)
    assert not module_selected("sound/core/snd.ko", paths)
    names = ["./boot/vmlinuz-6.1", "./lib/modules/6.1/modules.order", "./lib/modules/6.1/kernel/sound/",
             "./lib/modules/6.1/kernel/sound/snd.ko", "./lib/modules/6.1/kernel/drivers/virtio/virtio.ko",
             "./usr/lib/linux-image-6.1/broadcom/x.dtb"]
    assert kernel_members(names, paths) == [names[0], names[1], names[4], names[5]]


def test_package_versions_from_apt_cache_show() -> None:
    text = "Package: linux-image-6.1.0-57-arm64\nVersion: 6.1.192-3\nPackage: linux-image-arm64\nVersion: 6.1.192-3\n"
    assert parse_package_versions(text) == {"linux-image-6.1.0-57-arm64": "6.1.192-3", "linux-image-arm64": "6.1.192-3"}


def test_bmap_parsing() -> None:
    bmap = parse_bmap("""<?xml version="1.0" ?><bmap version="2.0"><ImageSize> 8192000 </ImageSize>
        <BlockSize> 4096 </BlockSize><BlocksCount> 2000 </BlocksCount><ChecksumType> sha256 </ChecksumType>
        <BlockMap><Range chksum="aa"> 0 </Range><Range chksum="bb"> 256-1023 </Range></BlockMap></bmap>""")
    assert bmap.image_size == 8192000 and bmap.ranges == ((0, 0, "aa"), (256, 1023, "bb"))
    assert bmap.mapped_bytes == 769 * 4096
    with pytest.raises(SohoError, match="not a block map"):
        parse_bmap("<html>")
    assert bmap_path(Path("out/a-debian-arm64-rpi4.img.xz")) == Path("out/a-debian-arm64-rpi4.img.bmap")


def test_foreign_arch_needs_binfmt(monkeypatch, tmp_path: Path) -> None:
    assert is_foreign("arm64") and not is_foreign("amd64")
    check_foreign_arch("amd64")  # native: nothing to check
    import builder.image.distro.foreign as r

    real = Path
    monkeypatch.setattr(r, "Path", lambda p, *a: real(str(p).replace("/proc/sys/fs/binfmt_misc", str(tmp_path)), *a))
    with pytest.raises(SohoError, match="binfmt_misc, which is not mounted"):
        check_foreign_arch("arm64")
    (tmp_path / "status").write_text("enabled\n")
    with pytest.raises(SohoError, match="qemu-user-static binfmt-support"):
        check_foreign_arch("arm64")
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: P\n")
    with pytest.raises(SohoError, match="without the F"):
        check_foreign_arch("arm64")
    (tmp_path / "qemu-aarch64").write_text("enabled\nflags: PF\n")
    check_foreign_arch("arm64")
