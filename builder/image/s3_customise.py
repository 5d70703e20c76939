"""Stage 3 — customise: overlays, accounts, hardening, services, firstboot.

Everything here edits the unpacked tree with host tools or plain Python; no
command runs inside the (possibly foreign-arch) image, so arm64 costs the
same as amd64.  Roles differ only through their data (profile + overlays).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import py_compile
import re
import shutil
import stat
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jinja2

from ..errors import ConfigError
from ..proc import run
from .cache import digest, hash_tree
from .config import BuildConfig
from .distro import backend_for
from .exposure import install_sandbox
from .identity import fat_uuid
from .schema import User

log = logging.getLogger("sohocloud.customise")

TEMPLATE_SUFFIX = ".j2"


# --------------------------------------------------------------------------- inputs


def customise_inputs(cfg: BuildConfig) -> dict[str, str]:
    """Hashes of everything this stage reads (config slice, overlay trees, firstboot)."""
    p = cfg.profile
    slice_ = {k: v for k, v in asdict(p).items() if k not in ("packages", "dpkg_exclude", "dpkg_include")}
    out = {
        "profile": digest(slice_),
        "target": digest([cfg.target.nic_paths, [asdict(x) for x in cfg.target.partitions], cfg.target.seed_dir,
                          cfg.target.grow_root, cfg.target.bootloader, cfg.target.tmpfs]),
        "firstboot": hash_tree(cfg.repo.firstboot),
        "code": digest(Path(__file__).read_text()),
    }
    for name in p.overlays:
        out[f"overlay:{name}"] = hash_tree(cfg.repo.overlays / name)
    for f in cfg.extra_files:
        out[f"file:{f.dest}"] = digest([f.sha256, f.mode])
    return out


def install_extra_files(root: Path, files) -> None:
    """Copy each extra file in, checking its sha256 on the bytes actually copied."""
    for f in files:
        dest = root / f.dest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(f.src, "rb") as src, open(dest, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != f.sha256:
            dest.unlink()
            raise ConfigError(f"{f.src}: sha256 {h.hexdigest()} does not match the expected {f.sha256}")
        os.chmod(dest, f.mode)


# --------------------------------------------------------------------------- overlays


def template_context(cfg: BuildConfig, identity: dict[str, str]) -> dict[str, Any]:
    p = cfg.profile
    return {
        "role": cfg.role,
        "arch": cfg.arch,
        "target": cfg.target_name,
        "profile": p,
        "firewall": p.firewall,
        "interfaces": p.interfaces,
        "network": p.network,
        "sysctl": p.sysctl,
        "sysctl_exceptions": p.sysctl_exceptions,
        "module_blacklist": p.effective_module_blacklist(),
        "vars": p.vars,
        "identity": identity,
        "ports_by_zone": _ports_by_zone(p.firewall.open_to("any")),
        "site_ports_by_zone": _ports_by_zone(p.firewall.open_to("site")),
        "ssh_zone": _ssh_zone(cfg) if cfg.target.kind == "node" else None,
    }


def _ports_by_zone(ports) -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for port in ports:
        out.setdefault(port.zone, {}).setdefault(port.proto, [])
        if port.port not in out[port.zone][port.proto]:
            out[port.zone][port.proto].append(port.port)
    return out


def _ssh_zone(cfg: BuildConfig) -> str:
    zones = sorted({p.zone for p in cfg.profile.firewall.ports if p.service == "ssh"})
    if len(zones) != 1:
        raise ConfigError(f"role '{cfg.role}': firewall.ports must declare ssh in exactly one zone, found {zones}")
    return zones[0]


def render_overlay(src: Path, dest: Path, ctx: dict[str, Any]) -> list[str]:
    """Copy overlay *src* into the tree *dest*; render `*.j2`. Returns image paths written.

    Modes are not taken from the checkout: files land 0644, dirs 0755,
    owned by root; `modes:` in the profile sets anything else.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(src)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    written = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(src)
        target_dir = dest / rel_dir
        if not target_dir.is_dir():
            target_dir.mkdir(parents=True, mode=0o755)
            os.chown(target_dir, 0, 0)
        for name in sorted(filenames):
            s = Path(dirpath) / name
            rel = rel_dir / name
            if name.endswith(TEMPLATE_SUFFIX):
                rel = rel_dir / name[: -len(TEMPLATE_SUFFIX)]
                try:
                    content = env.get_template((rel_dir / name).as_posix()).render(**ctx)
                except jinja2.TemplateError as exc:
                    lineno = getattr(exc, "lineno", None)
                    where = f"{s}:{lineno}" if lineno else str(s)
                    raise ConfigError(f"{where}: template error: {exc}") from None
                data = content.encode()
            elif s.is_symlink():
                t = dest / rel
                if t.exists() or t.is_symlink():
                    t.unlink()
                os.symlink(os.readlink(s), t)
                written.append("/" + rel.as_posix())
                continue
            else:
                data = s.read_bytes()
            t = dest / rel
            if t.is_symlink() or t.exists():
                t.unlink()
            t.write_bytes(data)
            os.chmod(t, 0o644)
            os.chown(t, 0, 0)
            written.append("/" + rel.as_posix())
    return written


# --------------------------------------------------------------------------- accounts


def _read_db(path: Path) -> list[list[str]]:
    return [line.split(":") for line in path.read_text().splitlines() if line.strip()]


def _write_db(path: Path, rows: list[list[str]]) -> None:
    st = path.stat()
    tmp = path.with_name(path.name + "+")
    tmp.write_text("".join(":".join(r) + "\n" for r in rows))
    os.chmod(tmp, st.st_mode & 0o7777)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, path)


def add_user(root: Path, user: User) -> int:
    """Create *user* in passwd/shadow/group/gshadow of the tree; no password. Returns the uid."""
    etc = root / "etc"
    passwd, group = _read_db(etc / "passwd"), _read_db(etc / "group")
    if any(r[0] == user.name for r in passwd):
        return int(next(r[2] for r in passwd if r[0] == user.name))
    used = {int(r[2]) for r in passwd} | {int(r[2]) for r in group}
    ids = range(100, 1000) if user.system else range(1000, 60000)
    uid = user.uid or next(i for i in ids if i not in used)
    home = user.home or f"/home/{user.name}"
    passwd.append([user.name, "x", str(uid), str(uid), "", home, user.shell])
    group.append([user.name, "x", str(uid), ""])
    for g in user.groups:
        row = next((r for r in group if r[0] == g), None)
        if row is None:
            raise ConfigError(f"user {user.name}: group '{g}' does not exist in the image")
        members = [m for m in row[3].split(",") if m]
        if user.name not in members:
            members.append(user.name)
        row[3] = ",".join(members)
    _write_db(etc / "passwd", passwd)
    _write_db(etc / "group", group)
    shadow = _read_db(etc / "shadow")
    shadow.append([user.name, "*", "19000", "0", "99999", "7", "", "", ""])
    _write_db(etc / "shadow", shadow)
    gshadow = _read_db(etc / "gshadow")
    gshadow.append([user.name, "!", "", ""])
    for g in user.groups:
        for r in gshadow:
            if r[0] == g:
                members = [m for m in r[3].split(",") if m]
                if user.name not in members:
                    members.append(user.name)
                r[3] = ",".join(members)
    _write_db(etc / "gshadow", gshadow)
    h = root / home.lstrip("/")
    if not h.exists():
        skel = root / "etc/skel"
        if skel.is_dir() and not user.system:
            shutil.copytree(skel, h, symlinks=True)
        else:
            h.mkdir(parents=True)
        for dirpath, dirnames, filenames in os.walk(h):
            for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
                os.lchown(n, uid, uid)
        os.chmod(h, 0o750)
    if user.sudo_nopasswd:
        sudoers = root / "etc/sudoers.d" / f"90-{user.name}"
        sudoers.parent.mkdir(parents=True, exist_ok=True)
        sudoers.write_text(f"# key-only account without a password\n{user.name} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        os.chmod(sudoers, 0o440)
    return uid


def lock_passwords(root: Path) -> list[str]:
    """No account of a generic image has a usable password: '*' for any that might."""
    shadow = root / "etc/shadow"
    rows = _read_db(shadow)
    changed = []
    for r in rows:
        if not (r[1].startswith("*") or r[1].startswith("!")):
            r[1] = "*"
            changed.append(r[0])
    _write_db(shadow, rows)
    return changed


# --------------------------------------------------------------------------- files


def apply_edits(root: Path, edits) -> None:
    """Set `KEY<sep>VALUE` lines: replace an existing (even commented) key or append."""
    for edit in edits:
        path = root / edit.file.lstrip("/")
        if not path.is_file():
            raise ConfigError(f"edits: {edit.file} does not exist in the image")
        lines = path.read_text().splitlines()
        for key, value in edit.set.items():
            pat = re.compile(rf"^\s*#?\s*{re.escape(key)}\b")
            new = f"{key}{edit.separator}{value}"
            idx = [i for i, line in enumerate(lines) if pat.match(line) and not line.lstrip().startswith("#")]
            if not idx:
                idx = [i for i, line in enumerate(lines) if pat.match(line)][:1]
            if idx:
                lines[idx[0]] = new
                for i in reversed(idx[1:]):
                    del lines[i]
            else:
                lines.append(new)
        path.write_text("\n".join(lines) + "\n")


def apply_modes(root: Path, modes) -> int:
    """Apply `modes:` (glob on image paths -> mode + owner) to files in the tree."""
    count = 0
    for pattern, fm in modes.items():
        user, _, group = fm.owner.partition(":")
        uid, gid = _lookup_id(root, "passwd", user), _lookup_id(root, "group", group or user)
        base = pattern.split("*", 1)[0].rsplit("/", 1)[0] or "/"
        start = root / base.lstrip("/")
        if not start.exists():
            continue
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                p = Path(dirpath) / name
                image_path = "/" + p.relative_to(root).as_posix()
                if fnmatch.fnmatchcase(image_path, pattern) and not p.is_symlink():
                    os.chown(p, uid, gid)
                    os.chmod(p, int(fm.mode, 8))
                    count += 1
    return count


def _lookup_id(root: Path, db: str, name: str) -> int:
    for r in _read_db(root / "etc" / db):
        if r[0] == name:
            return int(r[2])
    raise ConfigError(f"modes: unknown {'user' if db == 'passwd' else 'group'} '{name}' in the image")


def strip(root: Path, patterns) -> None:
    for pattern in patterns:
        for p in root.glob(pattern.lstrip("/")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def clear_setid(root: Path) -> list[str]:
    """Clear every setuid and setgid bit of regular files below *root*; the paths it cleared."""
    cleared = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
                cleared.append("/" + os.path.relpath(path, root))
    return sorted(cleared)


def remove_machine_identity(root: Path) -> None:
    """A generic image holds no host keys, machine-id or random seed: nodes make their own."""
    for p in (root / "etc/ssh").glob("ssh_host_*"):
        p.unlink()
    mid = root / "etc/machine-id"
    if mid.exists() or mid.is_symlink():
        mid.unlink()
    # Empty, not "uninitialized": systemd makes a new id at boot and commits it once / is
    # writable, but does not treat the boot as its first. On a first boot it would run
    # preset-all over every unit file (4 s of an emulated boot, before any unit starts);
    # the build applies the preset itself (apply_preset).
    mid.write_text("")
    os.chmod(mid, 0o444)
    # The build host's name and resolver must not leak into nodes: firstboot names
    # the node, DHCP/seeds give it DNS.
    for rel, content in (("etc/hostname", "sohocloud\n"),
                         ("etc/resolv.conf", "# DNS servers come from the seed or DHCP on this node.\n")):
        p = root / rel
        if p.is_symlink() or p.exists():
            p.unlink()
        p.write_text(content)
        os.chmod(p, 0o644)
    for rel in ("var/lib/dbus/machine-id", "var/lib/systemd/random-seed"):
        p = root / rel
        if p.exists() and not p.is_symlink():
            p.unlink()


# --------------------------------------------------------------------------- firstboot

FIRSTBOOT_DIR = "usr/lib/sohocloud"
FIRSTBOOT_LAUNCHER = "sohocloud-firstboot"  # what the units run; the package sohocloud_firstboot/ beside it
FIRSTBOOT_PACKAGE = "sohocloud_firstboot"
HOOKS_MODULE = "sohocloud_hooks.py"  # the role hooks' helpers (they put FIRSTBOOT_DIR on their path)


def image_python_tag(root: Path) -> str | None:
    """cache_tag of the image's python3 (e.g. cpython-311), from its stdlib directory."""
    found = sorted(root.glob("usr/lib/python3.[0-9]*"))
    if not found:
        return None
    major, minor = found[-1].name.removeprefix("python").split(".")[:2]
    return f"cpython-{major}{minor}"


def install_module(src: Path, root: Path, dest: str) -> None:
    """Copy a Python module to *dest* (a path in the image), with its bytecode when our Python
    matches the image's (else the node compiles it on first boot, on the path to SSH)."""
    module = root / dest.lstrip("/")
    module.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, module)
    tag = image_python_tag(root)
    if tag == sys.implementation.cache_tag:
        # Unchecked hash: valid whatever the file times in the image; the
        # image is rebuilt, never edited in place.
        py_compile.compile(str(module), cfile=str(module.parent / "__pycache__" / f"{module.stem}.{tag}.pyc"),
                           dfile="/" + dest.lstrip("/"), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    else:
        log.info("firstboot: image Python %s differs from ours (%s): %s compiled on first boot",
                 tag, sys.implementation.cache_tag, dest)


def install_firstboot(firstboot: Path, root: Path) -> None:
    """The node program: its launcher, its package and the hooks' helper module, byte-compiled
    (compiling them costs about a second of an emulated first boot), and its units."""
    d = root / FIRSTBOOT_DIR
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(firstboot / FIRSTBOOT_LAUNCHER, d / FIRSTBOOT_LAUNCHER)  # its mode: the base profile's modes
    for src in sorted((firstboot / FIRSTBOOT_PACKAGE).glob("*.py")):
        install_module(src, root, f"{FIRSTBOOT_DIR}/{FIRSTBOOT_PACKAGE}/{src.name}")
    install_module(firstboot / HOOKS_MODULE, root, f"{FIRSTBOOT_DIR}/{HOOKS_MODULE}")
    for unit in sorted(firstboot.glob("*.service")):
        shutil.copyfile(unit, root / "usr/lib/systemd/system" / unit.name)


# --------------------------------------------------------------------------- network


def network_units(cfg: BuildConfig) -> dict[str, str]:
    """systemd .link files naming NICs by role order, and default .network files.

    The role's `interfaces` take the target's NIC paths in order; a seed's
    network-config (written by firstboot as 10-seed-*) takes precedence.
    """
    files: dict[str, str] = {}
    for i, name in enumerate(cfg.profile.interfaces):
        files[f"etc/systemd/network/20-sohocloud-{name}.link"] = (
            f"# NIC {i + 1} of target '{cfg.target_name}' is the role's '{name}' interface\n"
            f"[Match]\nPath={cfg.target.nic_paths[i]}\n\n[Link]\nName={name}\n"
        )
        net = cfg.profile.network.get(name)
        if net is None:
            continue
        lines = [f"[Match]\nName={name}\n", "[Network]", "LinkLocalAddressing=no", "IPv6AcceptRA=no"]
        if net.dhcp4:
            lines.append("DHCP=ipv4")
        lines += [f"Address={a}" for a in net.addresses]
        if net.gateway4:
            lines.append(f"Gateway={net.gateway4}")
        if net.addresses and not net.dhcp4:
            lines.append("ConfigureWithoutCarrier=yes")
        if net.dhcp4:
            lines += ["", "[DHCPv4]", "UseDNS=yes", "UseNTP=no", "SendHostname=no"]
        files[f"etc/systemd/network/50-sohocloud-{name}.network"] = "\n".join(lines) + "\n"
    return files


# --------------------------------------------------------------------------- services


def write_preset(root: Path, services) -> None:
    """A preset that enables exactly the role's services and nothing else.

    Debian ships no 'disable *', so without this a `systemctl preset-all` on a
    node (or a first boot of systemd's own) could switch on every installed unit
    (ssh.service on all interfaces, say).
    """
    d = root / "usr/lib/systemd/system-preset"
    d.mkdir(parents=True, exist_ok=True)
    lines = ["# sohocloud: the role's services; everything else stays as built."]
    lines += [f"enable {u}" for u in services.enable]
    lines += [f"disable {u}" for u in services.disable] + ["disable *"]
    (d / "00-sohocloud.preset").write_text("\n".join(lines) + "\n")


def apply_preset(root: Path) -> None:
    """What systemd's first boot would do (preset-all, enable-only), done here with the
    host's systemctl on the offline tree, so the node's boot need not (see
    remove_machine_identity)."""
    run(["systemctl", f"--root={root}", "--quiet", "--preset-mode=enable-only", "preset-all"])


def set_services(root: Path, services) -> None:
    """enable/disable/mask with the host's systemctl on the offline tree."""
    for verb, units in (("disable", services.disable), ("enable", services.enable), ("mask", services.mask)):
        for unit in units:
            # An instance (name@inst.service) exists when its template (name@.service) does.
            file = re.sub(r"@[^.]+\.", "@.", unit)
            unit_known = any((root / d / file).exists() for d in ("usr/lib/systemd/system", "etc/systemd/system"))
            if not unit_known and verb != "mask":
                if verb == "disable":
                    continue
                raise ConfigError(f"services.enable: unit '{unit}' does not exist in the image")
            run(["systemctl", f"--root={root}", "--quiet", verb, unit])


# --------------------------------------------------------------------------- stage


def install_node_parts(cfg: BuildConfig, root: Path, identity: dict[str, str]) -> None:
    """What only a booting machine has: firstboot, its units and hook helpers, network files, fstab."""
    install_firstboot(cfg.repo.firstboot, root)
    for rel, content in network_units(cfg).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    (root / "etc/fstab").write_text(fstab(cfg, identity))
    t = cfg.target
    if t.seed_dir:
        # The seed files live on a partition the node mounts (a board's FAT): firstboot
        # looks there, after that mount. Wants, not Requires: without the partition a node
        # still boots (and says that it found no seed).
        (root / "etc/sohocloud").mkdir(parents=True, exist_ok=True)
        (root / "etc/sohocloud/seed-dirs").write_text(f"# NoCloud seed files (target {t.name})\n{t.seed_dir}\n")
        part = t.seed_partition()
        if part is not None:  # else (netboot) the initrd wrote it into /run before switching root
            unit = mount_unit(part.mount)
            dropin = root / "usr/lib/systemd/system/sohocloud-firstboot.service.d/seed-dir.conf"
            dropin.parent.mkdir(parents=True, exist_ok=True)
            dropin.write_text(f"# the seed directory {t.seed_dir} is on this mount\n[Unit]\nWants={unit}\n"
                              f"After={unit}\n")


def mount_unit(path: str) -> str:
    """systemd's unit name for a mount point (systemd-escape --path --suffix=mount)."""
    parts = [re.sub(r"[^A-Za-z0-9:_.]", lambda m: "".join(f"\\x{b:02x}" for b in m.group().encode()), p)
             for p in path.strip("/").split("/")]
    return "-".join(parts) + ".mount"


def fstab(cfg: BuildConfig, identity: dict[str, str]) -> str:
    """Root by UUID, and each FAT partition the target mounts (root-only: a board's seed carries secrets)."""
    lines = ["# <fs> <mountpoint> <type> <options> <dump> <pass>"]
    if cfg.target.netboot:
        # The initrd mounted / (squashfs under a tmpfs overlay): nothing to check or remount.
        lines.append("# / is the netboot squashfs under a tmpfs overlay (see images/pxe.yaml)")
    else:
        lines.append(f"UUID={identity['root_fs_uuid']} / ext4 defaults,errors=remount-ro 0 1")
    for path in cfg.target.tmpfs:
        lines.append(f"tmpfs {path} tmpfs mode=0711,nosuid,nodev 0 0")
    for p in cfg.target.partitions:
        if p.mount and p.fs == "vfat":
            lines.append(f"UUID={fat_uuid(identity['esp_vol_id'])} {p.mount} vfat "
                         "rw,nosuid,nodev,noexec,umask=0077,quiet,nofail 0 0")
    return "\n".join(lines) + "\n"



def customise(cfg: BuildConfig, root: Path, identity: dict[str, str]) -> dict[str, str]:
    """Turn the base tree at *root* into the role's tree. Returns its packages (name -> version)."""
    p = cfg.profile
    ctx = template_context(cfg, identity)
    for user in p.users:
        add_user(root, user)
    written: list[str] = []
    for name in p.overlays:
        written += render_overlay(cfg.repo.overlays / name, root, ctx)
    if cfg.target.kind == "node":
        install_node_parts(cfg, root, identity)
    install_extra_files(root, cfg.extra_files)
    apply_edits(root, p.edits)
    if cfg.target.kind == "node":
        install_sandbox(root, p.services.sandbox)
        set_services(root, p.services)
        write_preset(root, p.services)
        apply_preset(root)
    locked = lock_passwords(root)
    if locked:
        log.info("customise: locked password field of %s", ", ".join(locked))
    remove_machine_identity(root)
    strip(root, p.strip_paths)
    if p.setid == "strip":
        cleared = clear_setid(root)
        log.info("customise: cleared setuid/setgid bits of %d files", len(cleared))
    journal = root / "var/log/journal"
    journal.mkdir(parents=True, exist_ok=True)
    os.chmod(journal, 0o2755)
    n = apply_modes(root, p.modes)
    info = {
        "role": cfg.role,
        "distro": cfg.distro,
        "arch": cfg.arch,
        "target": cfg.target_name,
        "interfaces": list(p.interfaces),
        "ports": [asdict(x) for x in p.firewall.ports],
        "clients": [asdict(x) for x in p.firewall.clients],
        "grow_root": cfg.target.grow_root,
    }
    (root / "etc/sohocloud").mkdir(parents=True, exist_ok=True)
    (root / "etc/sohocloud/image.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info("customise: %d overlay files, %d mode rules applied", len(written), n)
    return backend_for(cfg.distro).installed_packages(root)
