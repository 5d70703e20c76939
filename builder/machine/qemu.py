"""Booting images in QEMU: accelerator choice, NIC wiring, direct-kernel or UEFI boot.

Everything about an image comes from its manifest (the QEMU machine and firmware, where its
kernel, initrd and command line are, its NICs), never from the YAML it was built from. Direct
boot (default) takes the kernel, initrd and command line from the image's own boot partition,
skipping ~15 s of OVMF + loader under TCG; `--firmware uefi` boots the same disk through
OVMF and systemd-boot.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Aborted, SohoError
from ..image.s6_manifest import MANIFEST_SUFFIX, read_manifest
from ..image.schema import QemuSpec, Validator
from ..image.yamlsrc import Origin
from ..proc import run
from ..seed import read_cidata, write_seed_to_fat
from .console import HYPERVISOR_HICCUPS, console_report, systemd_failures

log = logging.getLogger("sohocloud.vm")

DISK_ADDR_BASE = 0x10  # virtio-blk devices start here; NICs use the target's addresses


def usable_kvm() -> bool:
    """KVM only when a real kvm_intel/kvm_amd module backs /dev/kvm.

    On this workplace /dev/kvm is a nested PVM hypervisor under which stock
    Debian kernels hang, and it has no kvm_intel/kvm_amd module loaded.
    SOHOCLOUD_ACCEL=kvm|tcg overrides the probe.
    """
    forced = os.environ.get("SOHOCLOUD_ACCEL")
    if forced:
        return forced == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return any(Path(f"/sys/module/{m}").is_dir() for m in ("kvm_intel", "kvm_amd"))


def accel_args(arch: str) -> list[str]:
    host_arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine)
    if arch == host_arch and usable_kvm():
        return ["-accel", "kvm"]
    return ["-accel", "tcg,thread=multi"]


@dataclass(frozen=True)
class Nic:
    """One NIC. kind 'user': QEMU user-net (no host traffic with restrict); 'tap': a tap device."""

    kind: str
    ifname: str = ""
    net: str = ""  # user-net subnet, e.g. 10.44.0.0/24
    host: str = ""  # user-net's own address in that subnet
    hostfwd: tuple[str, ...] = ()  # e.g. "tcp:127.0.0.1:2222-10.44.0.1:22"
    mac: str = ""

    def netdev(self, nid: str) -> str:
        if self.kind == "tap":
            return f"tap,id={nid},ifname={self.ifname},script=no,downscript=no"
        opts = [f"user,id={nid}", "restrict=on", "ipv6=off"]
        if self.net:
            opts += [f"net={self.net}", f"host={self.host}"]
        opts += [f"hostfwd={h}" for h in self.hostfwd]
        return ",".join(opts)


@dataclass
class BootFiles:
    kernel: Path
    initrd: Path
    cmdline: str


def qemu_argv(spec: QemuSpec, arch: str, disk: Path | None, *, nics: list[Nic], seed: Path | None = None,
              boot: BootFiles | None = None, uefi_vars: Path | None = None, memory: int = 1024, smp: int = 2,
              serial: str = "mon:stdio", extra_disks: tuple[tuple[Path, str], ...] = (),
              netboot: bool = False, monitor: Path | None = None) -> list[str]:
    """The QEMU command line (pure: no side effects). *netboot*: no disk, the first NIC boots
    (its iPXE ROM under the machine's own BIOS, or UEFI when *uefi_vars* is given)."""
    accel = accel_args(arch)
    cpu = spec.tcg_cpu if spec.tcg_cpu and accel[-1].startswith("tcg") else spec.cpu
    argv = [spec.binary, "-machine", spec.machine, *accel, "-cpu", cpu,
            "-smp", str(smp), "-m", str(memory), "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", serial, "-device", "virtio-rng-pci"]
    if spec.display:
        argv += ["-device", spec.display]
    if monitor is not None:
        argv += ["-qmp", f"unix:{monitor},server=on,wait=off"]
    if boot is not None:
        argv += ["-kernel", str(boot.kernel), "-initrd", str(boot.initrd), "-append", boot.cmdline]
    elif uefi_vars is not None:
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={spec.firmware_code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={uefi_vars}"]
    elif not netboot:
        raise ValueError("UEFI boot needs a writable copy of the firmware variables")
    # (path, format, read-only, serial): data disks carry the serial the role names them by.
    disks = ([(disk, "qcow2", False, "")] if disk is not None else []) + \
        [(d, "qcow2", False, serial) for d, serial in extra_disks]
    if seed is not None:
        disks.append((seed, "raw", True, ""))
    for i, (path, fmt, ro, ser) in enumerate(disks):
        argv += ["-drive", f"if=none,id=d{i},file={path},format={fmt}" + (",readonly=on" if ro else ""),
                 "-device", f"virtio-blk-pci,drive=d{i},addr={hex(DISK_ADDR_BASE + i)}"
                 + (f",serial={ser}" if ser else "")]
    for i, nic in enumerate(nics):
        if i >= len(spec.nic_addrs):
            raise SohoError(f"the target has {len(spec.nic_addrs)} NIC slots, {len(nics)} NICs asked for")
        mac = nic.mac or f"52:54:00:5c:00:{i + 1:02x}"
        argv += ["-netdev", nic.netdev(f"n{i}"),
                 "-device", f"{spec.nic_device},netdev=n{i},mac={mac},addr={spec.nic_addrs[i]}"
                 + (",bootindex=1" if netboot and uefi_vars is not None and i == 0 else "")]
    if netboot and uefi_vars is None:
        # SeaBIOS: the NIC's ROM first (it ignores a NIC's bootindex), and a failed boot starts
        # over, as a PC set to network boot keeps trying.
        argv += ["-boot", "order=n,reboot-timeout=5000"]
    return argv


# --------------------------------------------------------------------------- image inspection


def image_info(image: Path) -> dict:
    m = read_manifest(image)
    if m is None:
        raise SohoError(f"{image}: no manifest ({image.name}.manifest.json) next to it; was it built by sohocloud?")
    return m


def qemu_spec(manifest: dict) -> QemuSpec:
    """How QEMU runs the image, as its build recorded it (never read again from images/*.yaml)."""
    recorded = manifest.get("qemu")
    name = manifest.get("artefact", "the image")
    if not isinstance(recorded, dict):
        raise SohoError(f"{name}: its manifest does not say how QEMU runs it (a container image, or one built "
                        "by an older sohocloud: rebuild it)")
    return Validator({}, Origin(Path(name + MANIFEST_SUFFIX), 1)).build_dataclass(QemuSpec, recorded, ("qemu",))


def make_overlay(base: Path, disk: Path, size: str | None = None) -> None:
    """A copy-on-write qcow2 *disk* over *base* (grown to *size* if given)."""
    # qemu-img resolves a relative backing file from the overlay's folder, not from ours.
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk_format(base), "-b", base.resolve(), disk,
         *([size] if size else [])])


def disk_format(image: Path) -> str:
    return "qcow2" if image.name.endswith(".qcow2") else "raw"


def unpack_card_image(image: Path, dest: Path) -> Path:
    """A raw disk from an SD card image (.img.xz): `bmaptool copy` writes only the mapped
    blocks (a sparse file) and checks each range against the .bmap's sha256."""
    bmap = image.with_name(image_info(image).get("bmap", image.name + ".bmap"))
    if not bmap.is_file():
        raise SohoError(f"{image}: its block map {bmap.name} is missing")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    run(["bmaptool", "-q", "copy", "--bmap", bmap, image, tmp])
    os.replace(tmp, dest)
    return dest


def boot_partition(manifest: dict) -> dict:
    """The partition holding kernel and initrd (the ESP, or a board's boot partition)."""
    name = manifest.get("boot", {}).get("partition")
    part = next((p for p in manifest["partitions"] if p["name"] == name or (name is None and p["type"] == "esp")),
                None)
    if part is None:
        raise SohoError(f"{manifest['artefact']}: no boot partition in its manifest")
    return part


def extract_boot_files(disk: Path, manifest: dict, dest: Path, append: str = "") -> BootFiles:
    """Kernel, initrd and command line from the image's own boot partition (the manifest names
    them; older images: the systemd-boot entry). *disk*: the qcow2, or a board image's raw disk."""
    part = boot_partition(manifest)
    mib = 1 << 20
    raw = dest / "boot.raw"
    run(["qemu-img", "dd", "-f", disk_format(disk), "-O", "raw", f"bs={mib}", f"skip={part['start'] // mib}",
         f"count={part['size'] // mib}", f"if={disk}", f"of={raw}"])
    env = {"MTOOLS_SKIP_CHECK": "1"}
    boot = manifest.get("boot")
    if boot and "kernel" in boot:
        entry = {"linux": boot["kernel"], "initrd": boot["initrd"], "options": boot["cmdline"]}
    else:
        entry_dir = dest / "entries"
        entry_dir.mkdir(exist_ok=True)
        run(["mcopy", "-i", raw, "-n", "::/loader/entries/sohocloud.conf", entry_dir / "sohocloud.conf"], env=env)
        entry = parse_bls_entry((entry_dir / "sohocloud.conf").read_text())
    kernel, initrd = dest / "vmlinuz", dest / "initrd.img"
    run(["mcopy", "-i", raw, "-n", f"::{entry['linux']}", kernel], env=env)
    run(["mcopy", "-i", raw, "-n", f"::{entry['initrd']}", initrd], env=env)
    raw.unlink()
    return BootFiles(kernel, initrd, " ".join(w for w in (entry["options"], append) if w))


def parse_bls_entry(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and not key.startswith("#"):
            out[key] = value.strip()
    for k in ("linux", "initrd", "options"):
        if k not in out:
            raise SohoError(f"boot entry lacks '{k}'")
    return out


# --------------------------------------------------------------------------- running


@dataclass
class VM:
    """A booted image. Disk writes go to a throwaway overlay unless *disk* is given."""

    image: Path
    nics: list[Nic]
    seed: Path | None = None
    firmware: str = "direct"
    memory: int = 1024
    smp: int = 2
    netns: str | None = None
    serial_log: Path | None = None
    disk: Path | None = None  # persistent overlay (kept between boots)
    extra_disks: tuple[tuple[Path, str], ...] = ()  # (qcow2, serial), kept by the caller
    disk_size: str | None = None  # a bigger disk than the image (e.g. "2G": a card larger than its image)
    monitor: Path | None = None  # a QMP socket (screendumps of the machine's screen)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sohocloud-vm.")))
    proc: subprocess.Popen | None = None
    started: float = 0.0

    def base_disk(self, manifest: dict) -> Path:
        """What the overlay sits on: the qcow2 itself, or a board image unpacked to a raw disk
        (next to a persistent overlay, so a kept disk keeps its base). A card carries its seed
        as files on its boot partition: written there, as `sohocloud flash --seed` does."""
        if disk_format(self.image) == "qcow2":
            return self.image.resolve()
        base = (self.disk.with_name(self.disk.stem + ".base.raw") if self.disk else self.workdir / "base.raw")
        if self.disk is None or not base.exists() or not self.disk.exists():
            unpack_card_image(self.image, base)
            if self.seed is not None and "seed_partition" in manifest:
                where = manifest["seed_partition"]
                part = next(p for p in manifest["partitions"] if p["name"] == where["name"])
                write_seed_to_fat(base, part["start"], read_cidata(self.seed), where["folder"])
        return base

    def seed_volume(self, manifest: dict) -> Path | None:
        """The seed as a cidata volume, unless it went onto the card's boot partition."""
        if disk_format(self.image) != "qcow2" and "seed_partition" in manifest:
            return None
        return self.seed

    def netboot_argv(self, manifest: dict, spec: QemuSpec) -> list[str]:
        """A diskless PC: its firmware (bios: SeaBIOS, uefi: OVMF) boots the first NIC; a PXE
        server on that LAN does the rest."""
        if self.firmware not in ("bios", "uefi"):
            raise SohoError(f"{self.image.name}: a netboot set boots from the LAN with firmware bios or uefi, "
                            f"not {self.firmware!r} (and needs a PXE server there: sohocloud fleet up)")
        uefi_vars = None
        if self.firmware == "uefi":
            uefi_vars = self.workdir / "efivars.fd"
            shutil.copyfile(spec.firmware_vars, uefi_vars)
        serial = f"file:{self.serial_log}" if self.serial_log else "mon:stdio"
        argv = qemu_argv(spec, manifest["arch"], None, nics=self.nics, uefi_vars=uefi_vars, memory=self.memory,
                         smp=self.smp, serial=serial, netboot=True, monitor=self.monitor)
        return argv

    @property
    def overlay(self) -> Path:
        """The throwaway copy-on-write disk over the image, used when no persistent *disk* is given
        (made on start when missing: removing it gives the next start a fresh root)."""
        return self.workdir / "overlay.qcow2"

    def argv(self) -> list[str]:
        manifest = image_info(self.image)
        spec = qemu_spec(manifest)
        if manifest.get("bootloader") == "ipxe":
            argv = self.netboot_argv(manifest, spec)
            return ["ip", "netns", "exec", self.netns] + argv if self.netns else argv
        disk = self.disk or self.overlay
        base = self.base_disk(manifest)
        if not disk.exists():
            make_overlay(base, disk, self.disk_size)
        boot = uefi_vars = None
        if self.firmware == "direct":
            boot = extract_boot_files(base, manifest, self.workdir, spec.append)
        else:
            if not spec.firmware_code:
                raise SohoError(f"{self.image.name}: target {manifest['target']} has no UEFI firmware for QEMU "
                                "(boot it with --firmware direct)")
            uefi_vars = self.workdir / "efivars.fd"
            shutil.copyfile(spec.firmware_vars, uefi_vars)
        serial = f"file:{self.serial_log}" if self.serial_log else "mon:stdio"
        argv = qemu_argv(spec, manifest["arch"], disk, nics=self.nics, seed=self.seed_volume(manifest), boot=boot,
                         uefi_vars=uefi_vars, memory=self.memory, smp=self.smp, serial=serial,
                         extra_disks=self.extra_disks, monitor=self.monitor)
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        return argv

    def start(self) -> None:
        argv = self.argv()
        if self.serial_log:
            self.serial_log.unlink(missing_ok=True)  # a stale log must not look like this boot's console
        log.info("boot: %s", shlex.join(argv))
        self.started = time.monotonic()
        # QEMU's own messages go to a file, not a pipe: a fleet's VMs outlive the command that started them.
        with open(self.workdir / "qemu.log", "wb") as qlog:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def console(self) -> str:
        if self.serial_log and self.serial_log.exists():
            return self.serial_log.read_text(errors="replace")
        return ""

    def console_tail(self, lines: int = 15) -> str:
        return "\n".join(self.console().splitlines()[-lines:]) or "(nothing on the console)"

    def boot_failures(self, lines: int = 12) -> list[str]:
        return systemd_failures(self.console(), lines)

    def console_report(self) -> str:
        return console_report(self.console(), self.serial_log)

    def panicked(self) -> bool:
        """Its kernel panicked: this boot will not come up (QEMU keeps running)."""
        return "Kernel panic - not syncing" in self.console()

    def hiccup(self) -> str | None:
        """What on the console shows the hypervisor, not the image, failed this boot (None: no sign)."""
        console = self.console()
        return next((m for m in HYPERVISOR_HICCUPS if m in console), None)


# --------------------------------------------------------------------------- the screen


@dataclass(frozen=True)
class Screen:
    """A screendump: RGB pixels, row by row."""

    width: int
    height: int
    pixels: bytes

    def share(self, rgb: str) -> float:
        """The fraction of pixels of colour *rgb* ("#1d2430")."""
        want = bytes.fromhex(rgb.lstrip("#"))
        count = sum(1 for i in range(0, len(self.pixels), 3) if self.pixels[i:i + 3] == want)
        return count / max(1, self.width * self.height)

    def png(self) -> bytes:
        """As a PNG (RGB, no filter): pure, for small screens."""
        row = self.width * 3
        raw = b"".join(b"\0" + self.pixels[y * row:(y + 1) * row] for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def screendump(monitor: Path, png: Path, timeout: float = 30) -> Screen:
    """What a running machine's screen shows, over its QMP socket, also saved as a PNG (under a
    temp name, then renamed). QEMU writes a PPM (Debian's 7.2 has no PNG output)."""
    ppm = png.with_name(png.name + ".ppm")
    try:
        qmp_command(monitor, "screendump", {"filename": str(ppm.resolve())}, timeout)
        screen = parse_ppm(ppm.read_bytes())
    finally:
        ppm.unlink(missing_ok=True)
    tmp = png.with_name(png.name + ".tmp")
    tmp.write_bytes(screen.png())
    os.replace(tmp, png)
    return screen


def qmp_command(monitor: Path, command: str, arguments: dict, timeout: float = 30) -> dict:
    """One QMP command on a fresh connection: greeting, capabilities, the command, its answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(monitor))
        except OSError as e:
            raise SohoError(f"{monitor}: no QEMU monitor there ({e.strerror}): is the machine running?") from e
        stream = s.makefile("rwb")
        replies = (json.loads(line) for line in stream)
        next(replies)  # the greeting
        reply: dict = {}
        for msg in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
            stream.write(json.dumps(msg).encode() + b"\n")
            stream.flush()
            reply = next(r for r in replies if "event" not in r)
            if "error" in reply:
                raise SohoError(f"QEMU {msg['execute']}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return", {})


def parse_ppm(ppm: bytes) -> Screen:
    """A binary 8-bit PPM (P6), as QEMU's screendump writes it."""
    # The header: magic, width, height, maxval, then exactly one whitespace byte before the pixels
    # (which may start with a byte that looks like whitespace).
    m = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", ppm)
    if m is None:
        raise SohoError("screendump: expected a binary 8-bit PPM from QEMU")
    width, height, pixels = int(m[1]), int(m[2]), ppm[m.end():]
    if len(pixels) < width * height * 3:
        raise SohoError("screendump: the PPM is shorter than its size says")
    return Screen(width, height, pixels[:width * height * 3])


def once_more_after_hiccup(vm: VM, wait: Callable[[], float], *, start: Callable[[], None] | None = None,
                           warn: Callable[[str], None]) -> float:
    """wait() for the started *vm*'s boot. If that fails and its console shows the hypervisor,
    not the image, failed the boot (HYPERVISOR_HICCUPS), power it on once more (start(), default
    vm.start; from a fresh overlay unless it has a disk of its own, which stays as after a power
    cut) and wait() again: a second failure is final. The first console is kept beside it."""
    try:
        return wait()
    except Aborted:
        raise
    except SohoError:
        hiccup = vm.hiccup()
        if not hiccup or vm.serial_log is None:
            raise
        kept = vm.serial_log.with_suffix(".hiccup.log")
        shutil.copyfile(vm.serial_log, kept)
        warn(f"{vm.serial_log.name}: {hiccup!r} on the console (the hypervisor starved the guest; that "
             f"console is kept in {kept}): powering it on once more")
        vm.stop()
        if vm.disk is None:
            vm.overlay.unlink(missing_ok=True)
        (start or vm.start)()
        return wait()
