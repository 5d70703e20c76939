"""Stage 1 — resolve: YAML layers + target + arch -> one frozen BuildConfig.

Everything downstream reads only the BuildConfig.  All validation happens
here, before anything is downloaded.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .config import BuildConfig, ExtraFile, Repo
from .schema import ARCHES, SERVICES, Profile, Target, Validator, parse_size
from .yamlsrc import KeyPath, Located, Origin, load_yaml

# Keys that belong to one file and are not inherited through `extends:`.
_NOT_INHERITED = ("extends", "abstract", "description")
# Lists that a later layer replaces instead of extending (order carries meaning).
_REPLACED: tuple[KeyPath, ...] = (("interfaces",),)
# The distros sohocloud knows; those with a backend (stage 2: distro.BACKENDS) can be built, and
# stage 2's check, before any work, says which are not supported yet.
DISTROS = ("debian", "alpine")


def buildable(repo: Repo) -> list[tuple[str, str, str]]:
    """(role, target, arch) of every image that can be built: each role with each target of its kind."""
    targets = {name: load_target(repo, name) for name in repo.targets()}
    return [(role, name, arch) for role in repo.roles() for name, t in targets.items()
            if t.kind == load_profile(repo, role).kind for arch in t.arches]


def gateway_roles(repo: Repo) -> list[str]:
    """Roles marked `gateway: true` (a site has exactly one node of such a role)."""
    return [r for r in repo.roles() if load_profile(repo, r).gateway]


# --------------------------------------------------------------------------- merging


def _merge(base: Any, base_o: dict[KeyPath, Origin], over: Any, over_o: dict[KeyPath, Origin],
           path: KeyPath, out_o: dict[KeyPath, Origin]) -> Any:
    """Merge *over* onto *base*: mappings recursively, lists appended, scalars replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = {}
        for k in list(base) + [k for k in over if k not in base]:
            p = path + (k,)
            if k in base and k in over:
                if path == ("sysctl",) and str(base[k]) != str(over[k]):
                    raise ConfigError(
                        f"{over_o.get(p, '?')}: sysctl.{k}: changes {base[k]!r} set at {base_o.get(p, '?')} "
                        f"to {over[k]!r}; a role may only relax a hardening sysctl under "
                        f"'sysctl_exceptions' with a 'reason'"
                    )
                out_o[p] = over_o.get(p) or base_o.get(p)
                merged[k] = _merge(base[k], base_o, over[k], over_o, p, out_o)
            elif k in base:
                _copy_prefix(base_o, p, p, out_o)
                merged[k] = base[k]
            else:
                _copy_prefix(over_o, p, p, out_o)
                merged[k] = over[k]
        return merged
    if isinstance(base, list) and isinstance(over, list) and path not in _REPLACED:
        merged_list = list(base)
        for i, _ in enumerate(base):
            _copy_prefix(base_o, path + (i,), path + (i,), out_o)
        for i, item in enumerate(over):
            if isinstance(item, (str, int)) and item in merged_list:
                continue  # union for plain lists (packages, modules)
            _copy_prefix(over_o, path + (i,), path + (len(merged_list),), out_o)
            merged_list.append(item)
        return merged_list
    _copy_prefix(over_o, path, path, out_o)
    return over


def _copy_prefix(src_o: dict[KeyPath, Origin], old: KeyPath, new: KeyPath, out_o: dict[KeyPath, Origin]) -> None:
    n = len(old)
    for p, o in src_o.items():
        if p[:n] == old:
            out_o[new + p[n:]] = o


def load_layers(repo: Repo, name: str, *, chain: tuple[str, ...] = (), referrer: Origin | None = None
                ) -> list[Located]:
    """The `extends:` chain of profile *name*, base first."""
    path = repo.profiles / f"{name}.yaml"
    if name in chain:
        raise ConfigError(f"{referrer}: extends: cycle {' -> '.join(chain + (name,))}")
    if not path.is_file():
        if referrer is None:
            known = ", ".join(repo.roles()) or "none"
            raise ConfigError(f"unknown role '{name}': no {path} (known roles: {known})")
        raise ConfigError(f"{referrer}: extends: no profile '{name}' (expected {path})")
    doc = load_yaml(path)
    ext = doc.data.get("extends", [])
    if isinstance(ext, str):
        ext = [ext]
    if not isinstance(ext, list) or not all(isinstance(e, str) for e in ext):
        raise ConfigError(f"{doc.origin(('extends',))}: extends: expected a profile name or a list of names")
    layers: list[Located] = []
    for i, parent in enumerate(ext):
        where = doc.origins.get(("extends", i)) or doc.origin(("extends",))
        for layer in load_layers(repo, parent, chain=chain + (name,), referrer=where):
            if all(layer.file != seen.file for seen in layers):
                layers.append(layer)
    layers.append(doc)
    return layers


def merge_layers(layers: list[Located]) -> tuple[dict, dict[KeyPath, Origin]]:
    data: dict = {}
    origins: dict[KeyPath, Origin] = {}
    for _i, layer in enumerate(layers):
        own = {k: v for k, v in layer.data.items() if k not in _NOT_INHERITED}
        own_o = {p: o for p, o in layer.origins.items() if p[0] not in _NOT_INHERITED}
        new_o: dict[KeyPath, Origin] = {}
        data = _merge(data, origins, own, own_o, (), new_o)
        origins = new_o
    last = layers[-1]
    for key in _NOT_INHERITED:
        if key in last.data and key != "extends":
            data[key] = last.data[key]
            _copy_prefix(last.origins, (key,), (key,), origins)
    return data, origins


# --------------------------------------------------------------------------- loading


def load_profile(repo: Repo, role: str) -> Profile:
    layers = load_layers(repo, role)
    data, origins = merge_layers(layers)
    data.setdefault("description", "")
    v = Validator(origins, Origin(layers[-1].file, 1))
    profile = v.build_dataclass(Profile, data, (), extra={"name": role})
    _check_profile(profile, v, repo)
    return profile


def _check_services(p: Profile, v: Validator) -> None:
    """Every service a role runs declares the exposure it may have (the build measures it)."""
    runs = p.services.run()
    for unit, level in p.services.exposure.items():
        if not unit.endswith(".service"):
            v.fail(("services", "exposure", unit), "expected a .service unit name")
        if not 0 <= level <= 10:
            v.fail(("services", "exposure", unit), f"expected an exposure level from 0 to 10, got {level}")
    for i, unit in enumerate(p.services.sandbox):
        if unit not in runs:
            v.fail(("services", "sandbox", i), f"'{unit}' is not a service the role runs "
                   f"(services.enable, or the service of an enabled timer)")
    if p.abstract or p.kind != "node":
        return
    missing = [u for u in runs if u not in p.services.exposure]
    if missing:
        v.fail(("services", "exposure"), f"no exposure level declared for {', '.join(missing)}: each service "
               f"the role runs needs `UNIT: LEVEL` (the most `systemd-analyze security` may report)")


def _check_profile(p: Profile, v: Validator, repo: Repo) -> None:
    zones = set(p.interfaces)
    for i, port in enumerate(p.firewall.ports):
        if port.zone not in zones:
            v.fail(("firewall", "ports", i, "zone"),
                   f"zone '{port.zone}' is not one of the role's interfaces {sorted(zones)}")
        if not 0 < port.port < 65536:
            v.fail(("firewall", "ports", i, "port"), f"expected a port 1-65535, got {port.port}")
    for i, proto in enumerate(p.firewall.protocols):
        if proto.zone not in zones:
            v.fail(("firewall", "protocols", i, "zone"),
                   f"zone '{proto.zone}' is not one of the role's interfaces {sorted(zones)}")
    for i, fw in enumerate(p.firewall.forward):
        for key, zone in (("from", fw.src), ("to", fw.to)):
            if zone not in zones:
                v.fail(("firewall", "forward", i, key), f"zone '{zone}' is not one of the role's interfaces")
    for i, zone in enumerate(p.firewall.masquerade):
        if zone not in zones:
            v.fail(("firewall", "masquerade", i), f"zone '{zone}' is not one of the role's interfaces")
    for name in p.network:
        if name not in zones:
            v.fail(("network", name), f"'{name}' is not one of the role's interfaces {sorted(zones)}")
    for section in ("sysctl", "sysctl_exceptions"):
        for key in getattr(p, section):
            if not re.fullmatch(r"[a-z0-9_]+(\.[A-Za-z0-9_*-]+)+", key):
                v.fail((section, key), "expected a dotted sysctl name like net.ipv4.ip_forward "
                       "(slashes would let a role set a hardened key under a second spelling)")
    for key, exc in p.sysctl_exceptions.items():
        if not exc.reason.strip():
            v.fail(("sysctl_exceptions", key, "reason"), "a sysctl exception needs a non-empty reason")
    for key, ans in p.audit_answers.items():
        if not re.fullmatch(r"[A-Z]{3,4}-[0-9]{4}|LYNIS", key):  # LYNIS: its note on its own version
            v.fail(("audit_answers", key), "expected a Lynis test id like FILE-6310")
        if not ans.reason.strip():
            v.fail(("audit_answers", key, "reason"), "an answer needs a non-empty reason")
    _check_services(p, v)
    for key, mexc in p.module_exceptions.items():
        if key not in p.module_blacklist:
            v.fail(("module_exceptions", key), f"'{key}' is not in any layer's module_blacklist: nothing to except")
        if not mexc.reason.strip():
            v.fail(("module_exceptions", key, "reason"), "a module exception needs a non-empty reason")
    try:
        parse_size(p.extra_root_free)
    except ValueError as exc:
        v.fail(("extra_root_free",), str(exc))
    for key in ("provides", "uses", "may_use"):
        for i, svc in enumerate(getattr(p, key)):
            if svc not in SERVICES:
                v.fail((key, i), f"unknown site service '{svc}' (known: {', '.join(SERVICES)})")
    for i, name in enumerate(p.overlays):
        if not (repo.overlays / name).is_dir():
            v.fail(("overlays", i), f"no overlay directory {repo.overlays / name}")
    for i, pkg in enumerate(p.packages):
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?", pkg):
            v.fail(("packages", i), f"'{pkg}' is not a valid Debian package name")
    for key, fm in p.modes.items():
        if not re.fullmatch(r"0?[0-7]{3,4}", fm.mode):
            v.fail(("modes", key, "mode"), f"expected an octal mode like 0644, got {fm.mode!r}")


def load_target(repo: Repo, name: str) -> Target:
    path = repo.images / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown target '{name}': no {path} (known targets: {', '.join(repo.targets())})")
    doc = load_yaml(path)
    v = Validator(doc.origins, Origin(path, 1))
    data = dict(doc.data)
    data.setdefault("description", "")
    target = v.build_dataclass(Target, data, (), extra={"name": name})
    for arch in target.arches:
        if arch not in ARCHES:
            v.fail(("arches", arch), f"unknown arch '{arch}' (expected one of {', '.join(ARCHES)})")
    for i, part in enumerate(target.partitions):
        if part.size != "auto":
            try:
                parse_size(part.size)
            except ValueError as exc:
                v.fail(("partitions", i, "size"), str(exc))
    try:
        parse_size(target.root_free)
    except ValueError as exc:
        v.fail(("root_free",), str(exc))
    for arch, spec in target.arches.items():
        if spec.qemu is not None and len(spec.qemu.nic_addrs) < len(target.nic_paths):
            v.fail(("arches", arch, "qemu", "nic_addrs"), "needs one PCI address per entry of nic_paths")
    for i, path in enumerate(target.tmpfs):
        if not path.startswith("/") or path.rstrip("/") in ("", "/run", "/proc", "/sys", "/dev"):
            v.fail(("tmpfs", i), f"expected an absolute path below / (not /, /run, /proc, /sys, /dev), got {path!r}")
    if target.kind == "node" and target.netboot:
        _check_netboot(target, v, repo)
    elif target.kind == "node":
        _check_disk_layout(target, v, repo)
    return target


def _check_netboot(t: Target, v: Validator, repo: Repo) -> None:
    """A netboot target has no disk, writes the pxe set, and has its boot script template."""
    if t.partitions:
        v.fail(("partitions",), "a netboot target (bootloader: ipxe) has no disk: expected no partitions")
    if t.outputs != ("pxe",):
        v.fail(("outputs",), "bootloader ipxe writes the pxe set: expected outputs: [pxe]")
    if t.seed_dir and not t.seed_dir.startswith("/run/"):
        v.fail(("seed_dir",), f"a netboot node's seed is fetched by its initrd into RAM: expected a path below "
                              f"/run/, got {t.seed_dir!r}")
    if not (t.boot_templates and (repo.images / t.boot_templates / "boot.ipxe.j2").is_file()):
        v.fail(("boot_templates",), f"expected a folder below {repo.images} holding boot.ipxe.j2")


def _check_disk_layout(t: Target, v: Validator, repo: Repo) -> None:
    """A node target's partitions, blobs, boot files and seed place fit together."""
    types = [p.type for p in t.partitions]
    if "pxe" in t.outputs:
        v.fail(("outputs",), "the pxe set is made by netboot targets (bootloader: ipxe), not from a disk")
    if types.count("root") != 1:
        v.fail(("partitions",), "expected exactly one partition of type root")
    if t.bootloader == "systemd-boot" and "esp" not in types:
        v.fail(("bootloader",), "systemd-boot needs a partition of type esp")
    if t.bootloader == "files" and "boot" not in types:
        v.fail(("bootloader",), "bootloader 'files' needs a partition of type boot (vfat) for the boot files")
    for i, p in enumerate(t.partitions):
        if p.type in ("esp", "boot") and p.fs != "vfat":
            v.fail(("partitions", i, "fs"), f"a partition of type {p.type} must be vfat")
        if p.mount and not p.mount.startswith("/"):
            v.fail(("partitions", i, "mount"), f"expected an absolute path, got {p.mount!r}")
    if t.partition_table == "mbr" and len(t.partitions) > 4:
        v.fail(("partitions",), "an MBR holds at most 4 primary partitions")
    try:
        start = parse_size(t.partitions_start)
    except ValueError as exc:
        v.fail(("partitions_start",), str(exc))
    if start % (1 << 20):
        v.fail(("partitions_start",), "expected a whole number of MiB")
    # GPT: the primary header and entries fill sectors 1-33; MBR: sector 0 only.
    first_free = 34 if t.partition_table == "gpt" else 1
    for i, b in enumerate(t.raw_blobs):
        if b.sector < first_free or b.sector * 512 >= start:
            v.fail(("raw_blobs", i, "sector"), f"expected a sector from {first_free} (after the {t.partition_table} "
                   f"table) to before partitions_start ({start // 512}), got {b.sector}")
    if t.grow_root and t.partition_table != "mbr":
        v.fail(("grow_root",), "growing the root partition on first boot is implemented for MBR disks")
    if t.grow_root and t.partitions and t.partitions[-1].type != "root":
        v.fail(("grow_root",), "the root partition must be the last one to grow into the free space")
    if t.seed_dir and t.seed_partition() is None:
        v.fail(("seed_dir",), f"{t.seed_dir} is below no partition's mount (e.g. mount: /boot/firmware)")
    if t.boot_templates and not (repo.images / t.boot_templates).is_dir():
        v.fail(("boot_templates",), f"no folder {repo.images / t.boot_templates}")


def resolve(repo: Repo, role: str, *, target: str = "qemu", arch: str = "amd64",
            distro: str = "debian", extra_files: tuple[ExtraFile, ...] = ()) -> BuildConfig:
    """Load and check everything a build of (role, target, arch, distro) needs."""
    if arch not in ARCHES:
        raise ConfigError(f"unknown arch '{arch}' (expected one of {', '.join(ARCHES)})")
    if distro not in DISTROS:
        raise ConfigError(f"unknown distro '{distro}' (expected one of {', '.join(DISTROS)})")
    profile = load_profile(repo, role)
    if profile.abstract:
        raise ConfigError(f"{repo.profiles / (role + '.yaml')}: '{role}' is a layer (abstract: true), not a role")
    tgt = load_target(repo, target)
    if arch not in tgt.arches:
        raise ConfigError(
            f"{repo.images / (target + '.yaml')}: arches: target '{target}' has no arch '{arch}' "
            f"(it has: {', '.join(tgt.arches)})")
    if profile.kind != tgt.kind:
        raise ConfigError(
            f"{repo.images / (target + '.yaml')}: kind: target '{target}' makes {tgt.kind} images, role '{role}' "
            f"is a {profile.kind} (targets of that kind: "
            f"{', '.join(t for t in repo.targets() if load_target(repo, t).kind == profile.kind)})")
    if tgt.kind == "node":
        spec = tgt.arches[arch]
        needed = ("kernel_package", "busybox", "qemu") + (("efi_loader",) if tgt.bootloader == "systemd-boot" else ())
        missing = [k for k in needed if not getattr(spec, k)]
        if missing or not (tgt.partitions or tgt.netboot) or tgt.bootloader == "none":
            raise ConfigError(f"{repo.images / (target + '.yaml')}: arches.{arch}: a node target needs "
                              f"{', '.join(needed)}, partitions and a bootloader "
                              f"(missing: {', '.join(missing) or 'partitions/bootloader'})")
    if profile.kind == "node" and len(profile.interfaces) > len(tgt.nic_paths):
        raise ConfigError(
            f"{repo.images / (target + '.yaml')}: nic_paths: role '{role}' needs {len(profile.interfaces)} NICs "
            f"({', '.join(profile.interfaces)}), target '{target}' has {len(tgt.nic_paths)}")
    return BuildConfig(role=role, distro=distro, arch=arch, target_name=target, profile=profile,
                       target=tgt, arch_spec=tgt.arches[arch], repo=repo, extra_files=extra_files)
