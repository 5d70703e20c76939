"""Tier 1: the netboot (PXE) target as data, its files, the site's boot script, the diskless
VM's QEMU line, and the errors a bad netboot target file gets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.errors import ConfigError
from builder.fleet.pxe import site_boot_script
from builder.image.s5_assemble import artefact_path
from builder.image.s1_resolve import Repo, resolve
from builder.image.s3_customise import fstab
from builder.image.identity import identity
from builder.image.s5_assemble.bootloader import netboot_files
from builder.image.s5_assemble.fs import publish_dir
from builder.image.schema import QemuSpec
from builder.fleet.sitefile import Site, SiteNode
from builder.machine.qemu import Nic, qemu_argv
from repo_edit import edit  # tests/unit is on sys.path (prepend import mode)

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC = QemuSpec(binary="qemu-system-x86_64", machine="q35", firmware_code="/fw/CODE.fd", firmware_vars="/fw/VARS.fd",
                nic_addrs=("0x3",))


def test_pxe_set_path_and_target_data() -> None:
    cfg = resolve(Repo(REPO_ROOT), "workstation-host", target="pxe")
    assert cfg.target.netboot and cfg.target.outputs == ("pxe",) and not cfg.target.partitions
    assert artefact_path(cfg, Path("out")) == Path("out/pxe/workstation-host-debian-amd64")
    # The rootfs is the role's, whatever the target: the pxe set reuses the qemu image's tree.
    assert cfg.all_packages() == resolve(Repo(REPO_ROOT), "workstation-host").all_packages()
    assert {"squashfs", "overlay", "loop", "virtio_net"} <= set(cfg.target.initrd_modules)


def test_netboot_fstab_has_no_root_and_gives_container_engines_a_tmpfs() -> None:
    cfg = resolve(Repo(REPO_ROOT), "workstation-host", target="pxe")
    text = fstab(cfg, identity("ab" * 32, ()))
    entries = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    assert all(e[1] != "/" for e in entries) and "UUID=" not in text
    assert "tmpfs /var/lib/docker tmpfs" in text and "tmpfs /var/lib/containers tmpfs" in text


def test_boot_script_names_the_set_its_squashfs_sha_and_the_seed_by_mac(tmp_path: Path) -> None:
    ctx = {"name": "workstation-host-debian-amd64", "role": "workstation-host", "distro": "debian", "arch": "amd64",
           "inputs_hash": "f" * 64, "kernel_file": "vmlinuz", "initrd_file": "initrd.img", "cmdline": "quiet",
           "squashfs_sha256": "a" * 64, "vars": {}}
    files = netboot_files(REPO_ROOT / "images/pxe", ctx)
    script = files["boot.ipxe"].decode()
    assert script.startswith("#!ipxe\n")
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    assert "${base}/vmlinuz initrd=initrd.img quiet" in kernel
    assert f"sohocloud.squashfs=${{base}}/rootfs.squashfs sohocloud.squashfs_sha256={'a' * 64}" in kernel
    assert "ds=nocloud;s=${sohocloud-http}/seeds/${mac}/" in kernel and "BOOTIF=01-${mac:hexhyp}" in kernel
    assert "set base ${sohocloud-http}/pxe/workstation-host-debian-amd64" in script


def test_site_boot_script_sends_each_mac_to_its_set_and_others_unenrolled() -> None:
    nodes = (SiteNode("gw", "router", "10.44.0.1", "52:54:00:44:00:01"),
             SiteNode("pc1", "workstation-host", "10.44.0.21", "52:54:00:44:00:21", target="pxe"),
             SiteNode("pc2", "workstation-host", "10.44.0.22", "52:54:00:44:00:22", target="pxe"))
    site = Site("office", "office.lan", "10.44.0.0/24", ("ssh-ed25519 AAAA x",), nodes, gateway="gw")
    text = site_boot_script(site, "10.44.0.1", {"pc1": "ws-a", "pc2": "ws-b"})
    lines = text.splitlines()
    assert lines[0] == "#!ipxe" and "set sohocloud-http http://10.44.0.1" in lines
    assert "iseq ${mac} 52:54:00:44:00:21 && chain ${sohocloud-http}/pxe/ws-a/boot.ipxe ||" in lines
    assert "iseq ${mac} 52:54:00:44:00:22 && chain ${sohocloud-http}/pxe/ws-b/boot.ipxe ||" in lines
    assert "not enrolled" in lines[-2] and lines[-1] == "chain ${sohocloud-http}/pxe/ws-a/boot.ipxe"


def test_diskless_vm_boots_its_nic_under_bios_or_uefi(tmp_path: Path) -> None:
    nic = [Nic("tap", ifname="t-pc1", mac="52:54:00:44:00:21")]
    bios = qemu_argv(SPEC, "amd64", None, nics=nic, netboot=True)
    assert "-boot" in bios and bios[bios.index("-boot") + 1] == "order=n,reboot-timeout=5000"
    assert not any("pflash" in a or "virtio-blk" in a for a in bios)
    assert not any("bootindex" in a for a in bios)  # SeaBIOS ignores a NIC's bootindex
    uefi = qemu_argv(SPEC, "amd64", None, nics=nic, netboot=True, uefi_vars=tmp_path / "vars.fd")
    assert any("pflash" in a and "CODE.fd" in a for a in uefi) and "-boot" not in uefi
    assert any(a.startswith("virtio-net-pci,") and "bootindex=1" in a for a in uefi)
    with pytest.raises(ValueError):
        qemu_argv(SPEC, "amd64", tmp_path / "d.qcow2", nics=nic)  # a disk node without firmware or kernel


def test_publish_dir_replaces_the_whole_set(tmp_path: Path) -> None:
    dest = tmp_path / "pxe" / "set"
    dest.mkdir(parents=True)
    (dest / "old-only").write_text("old")
    stage = tmp_path / "pxe" / ".set.new"
    stage.mkdir()
    (stage / "boot.ipxe").write_text("new")
    publish_dir(stage, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["boot.ipxe"] and not stage.exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["set"]


@pytest.mark.parametrize("old, new, expected", [
    ("outputs: [pxe]", "outputs: [qcow2]", "outputs: bootloader ipxe writes the pxe set"),
    ("seed_dir: /run/sohocloud/netseed", "seed_dir: /boot/seed", "expected a path below /run/"),
    ("boot_templates: pxe", "boot_templates: nope", "holding boot.ipxe.j2"),
    ("tmpfs: [/var/lib/docker, /var/lib/containers]", "tmpfs: [/run, /var/lib/containers]",
     "tmpfs[0]: expected an absolute path below /"),
    ("bootloader: ipxe", "bootloader: ipxe\npartitions: [{name: root, type: root, fs: ext4, size: auto}]",
     "has no disk: expected no partitions"),
])
def test_bad_netboot_target_is_a_config_error(repo: Path, old: str, new: str, expected: str) -> None:
    f = repo / "images/pxe.yaml"
    edit(f, old, new)
    with pytest.raises(ConfigError) as ei:
        resolve(Repo(repo), "workstation-host", target="pxe")
    msg = str(ei.value)
    assert str(f) in msg and expected in msg, msg


def test_a_disk_target_cannot_write_the_pxe_set(repo: Path) -> None:
    edit(repo / "images/qemu.yaml", "outputs: [qcow2]", "outputs: [pxe]")
    with pytest.raises(ConfigError) as ei:
        resolve(Repo(repo), "workstation-host", target="qemu")
    assert "made by netboot targets" in str(ei.value)


def test_the_volume_serves_the_images_nodes_fetch_and_refuses_a_changed_one(tmp_path: Path) -> None:
    """http/images/<file> on the PXE volume (the desktop template), checked against SHA256SUMS;
    a site without diskless nodes gets a volume too, without a boot script."""
    import hashlib
    import subprocess

    from builder.errors import SohoError
    from builder.fleet.pxe import write_pxe_volume
    out = tmp_path / "out"
    out.mkdir()
    image = out / "desktop-debian-amd64-template.squashfs"
    image.write_bytes(b"squashfs" * 1000)
    (out / "SHA256SUMS").write_text(f"{hashlib.sha256(image.read_bytes()).hexdigest()}  {image.name}\n")
    gw = SiteNode("gw", "router", "10.44.0.1", "52:54:00:44:00:01")
    site = Site(name="office", domain="office.lan", lan="10.44.0.0/24", admin_ssh_keys=(), nodes=(gw,))
    volume = write_pxe_volume(site, gw, {}, {}, out, out / "office" / "pxe.img", [image])
    listing = subprocess.run(["debugfs", "-R", "ls -l /http/images", str(volume)], capture_output=True, text=True)
    assert image.name in listing.stdout and " 8000 " in listing.stdout
    root = subprocess.run(["debugfs", "-R", "ls /http", str(volume)], capture_output=True, text=True).stdout
    assert "boot.ipxe" not in root
    image.write_bytes(b"changed")
    with pytest.raises(SohoError, match="does not match .*SHA256SUMS"):
        write_pxe_volume(site, gw, {}, {}, out, out / "office" / "pxe.img", [image])


def test_the_netboot_seeds_are_never_readable_by_others_while_the_volume_is_made(tmp_path: Path, monkeypatch) -> None:
    """Even with umask 0: each seed file is 0600 when it is created (then 0640 for the server's
    www-data), the staging tree is 0700, and the volume file is 0600 before mkfs writes a byte."""
    import stat as st

    from builder.fleet import pxe
    from builder.seed import write_cidata
    out = tmp_path / "out"
    netboot = out / "pxe" / "workstation-host-debian-amd64"
    netboot.mkdir(parents=True)
    (netboot / "boot.ipxe").write_text("#!ipxe\n")
    (out / "SHA256SUMS").write_text(f"{pxe.sha256_file(netboot / 'boot.ipxe')}  pxe/{netboot.name}/boot.ipxe\n")
    seed = write_cidata({"meta-data": "instance-id: pc1-x\n", "user-data": "#cloud-config\nsecret: S3CR3T\n",
                         "network-config": "version: 2\n"}, tmp_path / "pc1.img")
    gw = SiteNode("gw", "router", "10.44.0.1", "52:54:00:44:00:01")
    pc1 = SiteNode("pc1", "workstation-host", "10.44.0.21", "52:54:00:44:00:21", target="pxe")
    site = Site(name="office", domain="office.lan", lan="10.44.0.0/24", admin_ssh_keys=(), nodes=(gw, pc1))
    seen: dict[str, int] = {}
    created: list[int] = []
    real_fchown, real_run = os.fchown, pxe.run

    def fchown(fd, uid, gid):  # the moment after creation, before the file is handed to www-data
        created.append(st.S_IMODE(os.fstat(fd).st_mode))
        real_fchown(fd, uid, gid)

    def run(argv, **kw):
        if argv[0] == "mkfs.ext4":
            volume_tmp, stage = Path(argv[-2]), Path(argv[argv.index("-d") + 1])
            seen["volume before mkfs"] = st.S_IMODE(volume_tmp.stat().st_mode)
            seen["seeds folder"] = st.S_IMODE((stage / "http/seeds" / pc1.mac).stat().st_mode)
            for f in (stage / "http/seeds" / pc1.mac).iterdir():
                seen[f.name] = st.S_IMODE(f.stat().st_mode)
        return real_run(argv, **kw)
    monkeypatch.setattr(pxe.os, "fchown", fchown)
    monkeypatch.setattr(pxe, "run", run)
    old_umask = os.umask(0)
    try:
        volume = pxe.write_pxe_volume(site, gw, {"pc1": netboot}, {"pc1": seed}, out, out / "office" / "pxe.img")
    finally:
        os.umask(old_umask)
    assert created == [0o600] * 3, created
    assert seen["user-data"] == seen["meta-data"] == 0o640 and seen["seeds folder"] == 0o750, seen
    assert seen["volume before mkfs"] == 0o600, seen
    assert st.S_IMODE(volume.stat().st_mode) == 0o600
