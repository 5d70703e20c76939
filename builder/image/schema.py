"""Typed, frozen config objects and the validator that builds them from YAML.

The dataclasses *are* the schema: field names are the YAML keys (one
spelling: snake_case), field types are checked, unknown keys are errors.
Every error names the file and line of the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ..errors import ConfigError
from .yamlsrc import KeyPath, Origin

ARCHES = ("amd64", "arm64")


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Distro:
    name: Literal["debian"]
    suite: str
    mirror: str
    components: tuple[str, ...] = ("main",)
    variant: Literal["apt", "essential", "minbase"] = "apt"
    # Security fixes and stable updates are part of every image.
    security_mirror: str = "http://deb.debian.org/debian-security"
    updates: bool = True


@dataclass(frozen=True)
class Services:
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()
    # Services that get the common sandbox (SANDBOX_DROPIN, from the hardened overlay); what one needs
    # beyond it (its capabilities, the paths it writes) is in its own drop-in.
    sandbox: tuple[str, ...] = ()
    # The highest `systemd-analyze security` exposure (0 safe .. 10 unsafe) each service the role runs
    # may have: the build measures the finished tree and fails on any service above its level.
    exposure: dict[str, float] = field(default_factory=dict)

    def run(self) -> tuple[str, ...]:
        """The services the role runs: those enabled, and those its enabled timers start."""
        return tuple(u for u in self.enable if u.endswith(".service")) + tuple(
            u.removesuffix(".timer") + ".service" for u in self.enable if u.endswith(".timer"))


@dataclass(frozen=True)
class Port:
    """A socket the role serves (or, under `clients`, a client socket it keeps)."""

    zone: str
    proto: Literal["tcp", "udp"]
    port: int
    service: str
    # any: every address of the zone. site: the site's own nodes only (their addresses from the
    # seed), never a DHCP lease or a VPN client: a cluster's internal ports.
    peers: Literal["any", "site"] = "any"


@dataclass(frozen=True)
class Protocol:
    """An IP protocol without ports the role takes from the site's nodes only (e.g. the ESP of
    encrypted overlay networks)."""

    zone: str
    proto: Literal["esp"]
    service: str


@dataclass(frozen=True)
class Forward:
    src: str  # YAML key: from
    to: str


@dataclass(frozen=True)
class Firewall:
    ports: tuple[Port, ...] = ()
    clients: tuple[Port, ...] = ()
    forward: tuple[Forward, ...] = ()
    masquerade: tuple[str, ...] = ()
    protocols: tuple[Protocol, ...] = ()

    def open_to(self, peers: str) -> tuple[Port, ...]:
        return tuple(p for p in self.ports if p.peers == peers)


@dataclass(frozen=True)
class SysctlException:
    value: int | str
    reason: str


@dataclass(frozen=True)
class ModuleException:
    """A module a layer below blacklists that this role needs, and why."""
    reason: str


@dataclass(frozen=True)
class AuditAnswer:
    """A finding of the security audit (Lynis: a test id, or test:item) this role does not act on, and why."""
    reason: str


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    shell: str = "/bin/bash"
    sudo_nopasswd: bool = False
    uid: int | None = None
    system: bool = False  # a service account: uid below 1000, no skeleton files
    home: str | None = None  # default /home/<name>


# Site services a role can provide or use (see Profile.provides/uses and
# builder/fleet.py, which writes each one's seed sections).
SERVICES = ("cluster", "desktops", "git", "ldap", "logs", "metrics", "nas", "pxe", "time")


@dataclass(frozen=True)
class ContainerConfig:
    """The OCI image config of a container role."""

    cmd: tuple[str, ...] = ("/bin/sh",)
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    working_dir: str = "/"


@dataclass(frozen=True)
class ImageRef:
    role: str
    target: str


@dataclass(frozen=True)
class DataDisk:
    name: str
    serial: str  # the guest sees /dev/disk/by-id/virtio-<serial>
    size: str


@dataclass(frozen=True)
class FileMode:
    mode: str
    owner: str = "root:root"


@dataclass(frozen=True)
class ConfigEdit:
    """Set `KEY<sep>VALUE` lines in an existing config file (e.g. login.defs)."""

    file: str
    set: dict[str, str]
    separator: str = " "


@dataclass(frozen=True)
class NetIface:
    dhcp4: bool = False
    addresses: tuple[str, ...] = ()
    gateway4: str | None = None


@dataclass(frozen=True)
class Profile:
    """A resolved role: the merge of its `extends:` chain."""

    name: str
    description: str
    distro: Distro
    abstract: bool = False
    # The site's gateway role: DHCP/DNS for the LAN and the way out; a site has
    # exactly one such node, its seed lists every node, and it boots first.
    gateway: bool = False
    packages: tuple[str, ...] = ()
    dpkg_exclude: tuple[str, ...] = ()
    dpkg_include: tuple[str, ...] = ()
    kernel_modules: tuple[str, ...] = ()
    module_blacklist: tuple[str, ...] = ()
    module_exceptions: dict[str, ModuleException] = field(default_factory=dict)
    modules_load: tuple[str, ...] = ()
    services: Services = Services()
    overlays: tuple[str, ...] = ()
    interfaces: tuple[str, ...] = ()
    network: dict[str, NetIface] = field(default_factory=dict)
    firewall: Firewall = Firewall()
    sysctl: dict[str, int | str] = field(default_factory=dict)
    sysctl_exceptions: dict[str, SysctlException] = field(default_factory=dict)
    # Lynis suggestions not acted on, each with its reason: `sohocloud fleet audit` prints them and
    # fails on any suggestion that is neither acted on nor answered here.
    audit_answers: dict[str, AuditAnswer] = field(default_factory=dict)
    audit_min_index: int = 0  # the Lynis hardening index a node of this role reaches at least
    users: tuple[User, ...] = ()
    modes: dict[str, FileMode] = field(default_factory=dict)
    edits: tuple[ConfigEdit, ...] = ()
    strip_paths: tuple[str, ...] = ()
    # strip: no file of the image keeps a setuid or setgid bit (nothing run in it can gain privileges
    # from a file; the desktop template's lockdown). keep: as the packages made them.
    setid: Literal["keep", "strip"] = "keep"
    vars: dict[str, Any] = field(default_factory=dict)
    # Site services (capabilities, not roles) this role serves / consumes:
    # `sohocloud fleet build` finds each service's node through `provides` and
    # puts its address and the client credentials into the seeds of the nodes
    # that `use` it. Names: see builder/fleet.py SERVICES.
    provides: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()  # the site must have a provider (fleet build says so otherwise)
    may_use: tuple[str, ...] = ()  # used when the site has a provider (e.g. a log sink)

    def consumes(self, service: str) -> bool:
        return service in self.uses or service in self.may_use
    # Membership of the site's container cluster.
    cluster: Literal["none", "manager", "worker"] = "none"
    # node: boots (kernel, firstboot, services); container: a userland for an OCI image.
    kind: Literal["node", "container"] = "node"
    container: ContainerConfig = ContainerConfig()
    # Extra drives the role's machine has (the fleet attaches them on QEMU).
    disks: tuple[DataDisk, ...] = ()
    # Free space in the root fs beyond the target's root_free (e.g. container images).
    extra_root_free: str = "0M"
    # Other images this role's nodes use (e.g. the desktop template): built with the site.
    images: tuple[ImageRef, ...] = ()

    def effective_module_blacklist(self) -> tuple[str, ...]:
        return tuple(m for m in self.module_blacklist if m not in self.module_exceptions)

    def effective_sysctl(self) -> dict[str, str]:
        out = {k: str(v) for k, v in self.sysctl.items()}
        out.update({k: str(e.value) for k, e in self.sysctl_exceptions.items()})
        return out


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class QemuSpec:
    """How QEMU runs images of this target (for a board: the machine that stands in for it in tests)."""

    binary: str
    machine: str
    firmware_code: str = ""  # UEFI firmware (empty: direct kernel boot only)
    firmware_vars: str = ""
    cpu: str = "max"
    # The CPU under TCG (no usable KVM), if not *cpu*: emulated SIMD is slow, and `max` offers the
    # guest AVX2 paths (OpenSSL, Go, glibc pick them) that TCG runs several times slower than plain ones.
    tcg_cpu: str = ""
    console: str = "ttyS0"
    nic_device: str = "virtio-net-pci"
    nic_addrs: tuple[str, ...] = ()  # PCI addr of NIC n; pairs with Target.nic_paths
    # Kernel command line words added when QEMU starts the kernel directly (a board's
    # own console is not the emulated machine's).
    append: str = ""
    # The machine's screen, a QEMU display device (e.g. virtio-vga); empty: headless. No window
    # opens either way: tests read the screen with a monitor screendump.
    display: str = ""


@dataclass(frozen=True)
class ArchSpec:
    # Empty for container targets (no kernel, no boot loader).
    kernel_package: str = ""
    boot_packages: tuple[str, ...] = ()
    efi_loader: str = ""  # path of the UEFI loader inside the boot-package tree
    efi_fallback: str = ""  # where firmware looks for it on the ESP
    busybox: str = ""  # static busybox inside the boot-package tree (for the initrd)
    cmdline: str = ""  # kernel command line words of this arch (its serial console, say), after the target's
    qemu: QemuSpec | None = None


@dataclass(frozen=True)
class Partition:
    name: str
    # esp: UEFI system partition; boot: a board's FAT partition (firmware, kernel, seed); root: /
    type: Literal["esp", "boot", "root"]
    fs: Literal["vfat", "ext4"]
    size: str  # "64M" or "auto"
    bootable: bool = False  # MBR active flag (U-Boot's distro boot scans it first)
    mount: str = ""  # where a node mounts it (e.g. /boot/firmware); root is always /


@dataclass(frozen=True)
class RawBlob:
    """A boot loader blob written at a fixed place of the disk, outside any partition."""

    file: str  # path inside the boot-package tree
    sector: int  # 512-byte sector where it starts


@dataclass(frozen=True)
class BootFile:
    """A file for the boot partition: src is a path (or glob) below the tree named by the list
    it is in; dest is its path on the partition (ending in / for "into this directory")."""

    src: str
    dest: str


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arches: dict[str, ArchSpec]
    outputs: tuple[Literal["qcow2", "img.xz", "oci", "pxe", "squashfs"], ...]
    # node: a bootable machine image; container: a userland only (roles of the same kind).
    kind: Literal["node", "container"] = "node"
    partitions: tuple[Partition, ...] = ()
    # systemd-boot: loader + entry on the ESP. files: the board's firmware or U-Boot reads
    # the boot partition's files (boot_files, dtb_files, kernel, initrd, boot_templates).
    # ipxe: no disk; iPXE loads boot.ipxe (from boot_templates), kernel and initrd over HTTP
    # and the initrd runs the root squashfs under a tmpfs overlay.
    bootloader: Literal["systemd-boot", "files", "ipxe", "none"] = "none"
    cmdline: str = ""
    kernel_modules: tuple[str, ...] = ()
    initrd_modules: tuple[str, ...] = ()
    nic_paths: tuple[str, ...] = ()
    partition_table: Literal["gpt", "mbr"] = "gpt"
    partitions_start: str = "1M"  # the first partition starts here (after raw_blobs)
    raw_blobs: tuple[RawBlob, ...] = ()
    boot_files: tuple[BootFile, ...] = ()  # src below the boot-package tree
    dtb_files: tuple[BootFile, ...] = ()  # src below the kernel's DTB directory (/usr/lib/linux-image-<ver>)
    boot_templates: str = ""  # a folder below images/: its files (*.j2 rendered) go onto the boot partition
    kernel_file: str = "vmlinuz"  # names of kernel and initrd on the boot partition / ESP
    initrd_file: str = "initrd.img"
    grow_root: bool = False  # firstboot grows the root partition and fs to fill the disk (MBR)
    # A node reads its NoCloud seed files here: below a partition's mount (a card), or for a
    # netboot target below /run, where the initrd put what it fetched.
    seed_dir: str = ""
    # Extra archive components for the boot packages (e.g. non-free-firmware for the Pi's firmware).
    boot_components: tuple[str, ...] = ()
    root_free: str = "192M"
    # Extra tmpfs mounts (fstab), e.g. for a netboot root: container engines cannot keep their
    # layers on an overlay root, so /var/lib/docker gets a filesystem of its own.
    tmpfs: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    vars: dict[str, Any] = field(default_factory=dict)  # for boot_templates

    @property
    def netboot(self) -> bool:
        """No disk: the root comes over the network (squashfs under a tmpfs overlay)."""
        return self.bootloader == "ipxe"

    def seed_partition(self) -> Partition | None:
        """The partition whose mount holds seed_dir (a card's FAT boot partition), if any."""
        for p in self.partitions:
            if self.seed_dir and p.mount and (self.seed_dir + "/").startswith(p.mount.rstrip("/") + "/"):
                return p
        return None


# --------------------------------------------------------------------------- validator

_ALIASES = {"from": "src"}


def _field_name(key: str) -> str:
    return _ALIASES.get(key, key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is str:
        return "a string"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return str(tp)


def _same_shape(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or origin is dict
    if isinstance(value, list):
        return origin is tuple
    return False


def _fmt_path(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


class Validator:
    """Builds dataclass instances from plain data, reporting errors with origins."""

    def __init__(self, origins: dict[KeyPath, Origin], fallback: Origin):
        self.origins = origins
        self.fallback = fallback

    def where(self, path: KeyPath) -> Origin:
        for n in range(len(path), -1, -1):
            o = self.origins.get(tuple(path[:n]))
            if o is not None:
                return o
        return self.fallback

    def fail(self, path: KeyPath, msg: str) -> typing.NoReturn:
        raise ConfigError(f"{self.where(path)}: {_fmt_path(path)}: {msg}")

    def build(self, tp: Any, value: Any, path: KeyPath) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if origin in (Union, types.UnionType):
            alts = typing.get_args(tp)
            # A value shaped like exactly one alternative (a mapping for a dataclass, say)
            # gets that alternative's precise error instead of a generic "expected X or Y".
            shaped = [a for a in alts if _same_shape(a, value)]
            if len(shaped) == 1:
                return self.build(shaped[0], value, path)
            for alt in alts:
                try:
                    return self.build(alt, value, path)
                except ConfigError:
                    pass
            self.fail(path, f"expected {_type_name(tp)}, got {value!r}")
        if tp is type(None):
            if value is not None:
                self.fail(path, f"expected null, got {value!r}")
            return None
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"expected an integer, got {value!r}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"expected a number, got {value!r}")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                self.fail(path, f"expected a string, got {value!r}")
            return value
        if origin is Literal:
            if value not in typing.get_args(tp):
                self.fail(path, f"expected {_type_name(tp)}, got {value!r}")
            return value
        if origin is tuple:
            if not isinstance(value, list):
                self.fail(path, f"expected {_type_name(tp)}, got {value!r}")
            (item_tp, _ellipsis) = typing.get_args(tp)
            return tuple(self.build(item_tp, v, path + (i,)) for i, v in enumerate(value))
        if origin is dict:
            if not isinstance(value, dict):
                self.fail(path, f"expected a mapping, got {value!r}")
            key_tp, val_tp = typing.get_args(tp)
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    self.fail(path + (k,), f"keys must be strings, got {k!r}")
                out[k] = self.build(val_tp, v, path + (k,))
            return out
        if dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, value, path)
        raise TypeError(f"schema type not supported: {tp}")

    def build_dataclass(self, cls: Any, value: Any, path: KeyPath, extra: dict[str, Any] | None = None) -> Any:
        if not isinstance(value, dict):
            self.fail(path, f"expected {_type_name(cls)}, got {value!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = dict(extra or {})
        for key, v in value.items():
            name = _field_name(str(key))
            if name not in fields or name in (extra or {}):
                known = sorted(k for k in fields if k not in (extra or {}))
                hint = difflib.get_close_matches(name, known, n=1)
                tip = f"; did you mean '{hint[0]}'?" if hint else f" (known keys: {', '.join(known)})"
                self.fail(path + (key,), f"unknown key '{key}'{tip}")
            kwargs[name] = self.build(hints[name], v, path + (key,))
        for name, f in fields.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(path, f"missing required key '{name}' ({_type_name(hints[name])})")
        return cls(**kwargs)


SIZE_RE = re.compile(r"^(\d+)([KMG])$")


def parse_size(text: str) -> int:
    """'64M' -> bytes.  Sizes in config are always K/M/G suffixed integers."""
    m = SIZE_RE.match(text)
    if not m:
        raise ValueError(f"expected a size like 64M or 2G, got {text!r}")
    return int(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
