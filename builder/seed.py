"""NoCloud seeds: render meta-data/user-data/network-config and pack a 'cidata' volume.

The node side is firstboot/sohocloud_firstboot (the program that applies a seed on a
node's first boot). The rules both sides share (key format, host name, instance-id,
the files and their headers) are one copy, in sohocloud_firstboot.seedrules; keep
the rest in step (the same YAML subset).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from sohocloud_firstboot.seedrules import (
    ADMIN,
    HOSTNAME_RE,  # noqa: F401 (re-exported: other code takes it from here)
    IFACE_ID_RE,
    NETWORK_CONFIG_KEYS,
    NETWORK_CONFIG_VERSION,
    SEED_FILES,  # noqa: F401 (re-exported)
    SSH_KEY_TYPES,  # noqa: F401 (re-exported)
    USER_DATA_HEADER,
    is_public_key,
    valid_hostname,
    valid_instance_id,
)

from builder.errors import SohoError
from builder.proc import CommandError, run

CIDATA_LABEL = "CIDATA"  # FAT labels are upper case; firstboot looks for each of seedrules.CIDATA_LABELS
# mtools refuses images whose geometry it dislikes unless told not to check.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}
# FAT cannot store 1970; a fixed, valid date keeps the image reproducible.
DEFAULT_EPOCH = 946684800  # 2000-01-01


# --------------------------------------------------------------------------- validation


def _looks_private(text: str) -> bool:
    return "PRIVATE KEY" in text or text.lstrip().startswith(("-----BEGIN", "PuTTY-User-Key-File"))


def check_hostname(hostname: str) -> str:
    if not valid_hostname(hostname):
        raise SohoError(
            f"seed: hostname {hostname!r} is not a valid host name: expected one RFC 1123 label "
            "(1-63 letters, digits or '-', not starting or ending with '-', no dots)"
        )
    return hostname.lower()


def check_ssh_keys(keys: list[str], key_file: str | os.PathLike[str] | None = None) -> list[str]:
    where = f" from {os.fspath(key_file)}" if key_file is not None else ""
    if not keys:
        raise SohoError(f"seed: no SSH public key given{where}: the admin account is key-only")
    out: list[str] = []
    for i, k in enumerate(keys, 1):
        if not isinstance(k, str):
            raise SohoError(f"seed: SSH key #{i}{where} is not a string")
        if _looks_private(k):
            raise SohoError(f"seed: SSH key #{i}{where} is a PRIVATE key; pass the .pub file")
        k = k.strip()
        if not is_public_key(k):
            raise SohoError(
                f"seed: SSH key #{i}{where} is not an OpenSSH public key "
                "(expected e.g. 'ssh-ed25519 AAAA... comment' on one line)"
            )
        if k not in out:
            out.append(k)
    return out


def check_network(network: Mapping[str, Any] | None) -> dict[str, Any]:
    """Shape check of a netplan v2 subset; firstboot does the per-field checks."""
    if network is None:
        # No ethernets: the node keeps the image's own networkd defaults
        # (a catch-all DHCP here would override e.g. the router's LAN setup).
        return {"version": NETWORK_CONFIG_VERSION, "ethernets": {}}
    if not isinstance(network, Mapping):
        raise SohoError("seed: network must be a mapping (netplan version 2)")
    net = dict(network)
    if isinstance(net.get("network"), Mapping):
        net = dict(net["network"])
    net.setdefault("version", NETWORK_CONFIG_VERSION)
    if net["version"] != NETWORK_CONFIG_VERSION:
        raise SohoError(f"seed: network.version must be {NETWORK_CONFIG_VERSION}, got {net['version']!r}")
    unknown = sorted(set(net) - NETWORK_CONFIG_KEYS)
    if unknown:
        raise SohoError(f"seed: network: unsupported key(s) {', '.join(unknown)} (only 'ethernets')")
    eths = net.get("ethernets") or {}
    if not isinstance(eths, Mapping):
        raise SohoError("seed: network.ethernets must be a mapping of name -> settings")
    for name, conf in eths.items():
        if not isinstance(name, str) or not IFACE_ID_RE.fullmatch(name):
            raise SohoError(f"seed: network.ethernets: {name!r} is not a simple interface id")
        if not isinstance(conf, Mapping):
            raise SohoError(f"seed: network.ethernets.{name} must be a mapping")
    net["ethernets"] = {k: dict(v) for k, v in eths.items()}
    return net


def check_sohocloud(block: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise SohoError("seed: the sohocloud block must be a mapping")
    try:
        # firstboot hands it to role hooks as JSON.
        json.dumps(block)
    except (TypeError, ValueError) as e:
        raise SohoError(f"seed: the sohocloud block must be JSON-compatible ({e})") from None
    return dict(block)


# --------------------------------------------------------------------------- rendering


def _dump(data: Any) -> str:
    # Wide lines: never fold an SSH key or token across lines.
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1 << 16, allow_unicode=True)


def default_instance_id(hostname: str, body: Mapping[str, Any]) -> str:
    """hostname + hash of everything else: stable for the same seed (so a
    rebuilt identical seed does not re-run firstboot), new when anything changes."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return f"{hostname}-{hashlib.sha256(canon.encode()).hexdigest()[:12]}"


def render_seed(
    hostname: str,
    ssh_keys: list[str],
    *,
    instance_id: str | None = None,
    network: dict[str, Any] | None = None,
    sohocloud: dict[str, Any] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """Return {'meta-data', 'user-data', 'network-config'} file contents.

    *key_file* only makes error messages name where the keys came from.
    """
    host = check_hostname(hostname)
    keys = check_ssh_keys(ssh_keys, key_file)
    net = check_network(network)
    block = check_sohocloud(sohocloud)

    user: dict[str, Any] = {
        "hostname": host,
        "users": [{"name": ADMIN, "ssh_authorized_keys": keys}],
    }
    if block is not None:
        user["sohocloud"] = block
    if instance_id is None:
        instance_id = default_instance_id(host, {"user": user, "network": net})
    elif not isinstance(instance_id, str) or not valid_instance_id(instance_id):
        raise SohoError(f"seed: instance-id {instance_id!r} must be a non-empty one-line string")
    return {
        "meta-data": _dump({"instance-id": instance_id, "local-hostname": host}),
        "user-data": USER_DATA_HEADER + "\n" + _dump(user),
        "network-config": _dump(net),
    }


def read_ssh_keys(path: str | os.PathLike[str]) -> list[str]:
    """Public keys from *path*, one per line; blank and '#' lines ignored."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SohoError(f"{p}: SSH public key file not found") from None
    except UnicodeDecodeError:
        raise SohoError(f"{p}: not a text file; expected an OpenSSH public key (.pub)") from None
    except OSError as e:
        raise SohoError(f"{p}: cannot read SSH public key file: {e.strerror}") from None
    if _looks_private(text):
        # Never echo the content: it is a secret.
        raise SohoError(f"{p}: this looks like a PRIVATE key; pass the public key (usually {p.name}.pub)")
    keys: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not is_public_key(line):
            raise SohoError(
                f"{p}: line {n} is not an OpenSSH public key (expected e.g. 'ssh-ed25519 AAAA... comment')"
            )
        keys.append(line)
    if not keys:
        raise SohoError(f"{p}: no SSH public key in the file")
    return keys


# --------------------------------------------------------------------------- cidata volume


def _tool(name: str, package: str) -> str:
    # mkfs.vfat lives in /usr/sbin, often missing from a normal user's PATH.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise SohoError(f"{name} not found: install the '{package}' package on the build host")
    return found


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SohoError(f"seed: file name {name!r} is not allowed on the cidata volume")


def _mcopy_files(mcopy: str, image: str, prefix: str, payload: Mapping[str, bytes], epoch: int,
                 env: Mapping[str, str]) -> None:
    """Copy *payload* (name -> bytes) to ::/<prefix><name> of a FAT image, each file timed *epoch*."""
    with tempfile.TemporaryDirectory(prefix="sohocloud-seed-") as src_dir:
        for name, data in payload.items():
            src = Path(src_dir) / name
            src.write_bytes(data)
            os.utime(src, (epoch, epoch))
            run([mcopy, "-m", "-o", "-i", image, src, f"::/{prefix}{name}"], env=env)


def write_cidata(files: Mapping[str, str], out: str | os.PathLike[str]) -> Path:
    """Pack *files* into a FAT volume labelled CIDATA at *out* (mode 0600: it holds
    keys and role secrets). Built under a temp name beside *out* and renamed, so
    a failure leaves nothing and a reader never sees half an image."""
    out = Path(out)
    for name in files:
        _check_name(name)
    mkfs = _tool("mkfs.vfat", "dosfstools")
    mcopy = _tool("mcopy", "mtools")
    payload = {name: text.encode() for name, text in files.items()}
    # Room for the data with slack for FAT/directory overhead; 1 MiB minimum
    # keeps mkfs.vfat on plain FAT12 with sane defaults.
    need_kib = sum(len(d) // 1024 + 4 for d in payload.values())
    size_kib = max(1024, 2 * need_kib + 256)
    digest = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH)), 315705600)  # >= 1980-01-03
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmpname = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    tmp = Path(tmpname)
    try:
        os.ftruncate(fd, size_kib * 1024)
        os.close(fd)
        fd = -1
        # Volume id from the content and --invariant: the same seed gives the same bytes.
        run([mkfs, "--invariant", "-i", digest[:8], "-n", CIDATA_LABEL, tmp])
        _mcopy_files(mcopy, str(tmp), "", payload, epoch, MTOOLS_ENV)
        os.chmod(tmp, 0o600)
        os.replace(tmp, out)
    except CommandError as e:
        raise SohoError(f"{out}: could not build the cidata volume: {e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
    return out


def read_cidata(path: str | os.PathLike[str]) -> dict[str, str]:
    """All top-level files of a cidata FAT volume, by name (for tests and `seed --check`)."""
    p = Path(path)
    if not p.is_file():
        raise SohoError(f"{p}: cidata image not found")
    mdir = _tool("mdir", "mtools")
    mcopy = _tool("mcopy", "mtools")
    try:
        listing = run([mdir, "-b", "-i", p, "::/"], env=MTOOLS_ENV, capture=True).stdout
        out: dict[str, str] = {}
        for line in listing.splitlines():
            line = line.strip()
            if not line.startswith("::/") or line.endswith("/"):
                continue
            name = line[3:]
            out[name] = run([mcopy, "-n", "-i", p, f"::/{name}", "-"], env=MTOOLS_ENV, capture=True).stdout
    except CommandError as e:
        raise SohoError(f"{p}: not a readable FAT cidata volume: {e}") from None
    return out


def write_seed_to_fat(target: str | os.PathLike[str], offset: int, files: Mapping[str, str], folder: str) -> None:
    """Put seed files into *folder* of the FAT volume at byte *offset* of *target* (a disk image
    or a card's block device): what `flash --seed` does, and what a node's firstboot reads from
    its boot partition. Fixed file times: the same seed gives the same bytes."""
    for name in files:
        _check_name(name)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", folder):
        raise SohoError(f"seed folder {folder!r} is not a plain folder name")
    mcopy, mmd, mdir = _tool("mcopy", "mtools"), _tool("mmd", "mtools"), _tool("mdir", "mtools")
    image = f"{os.fspath(target)}@@{offset}"
    epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH)), 315705600)
    env = dict(MTOOLS_ENV, SOURCE_DATE_EPOCH=str(epoch))  # mtools stamps new entries with it
    try:
        if run([mdir, "-b", "-i", image, f"::/{folder}"], env=env, capture=True, check=False).returncode:
            run([mmd, "-i", image, f"::/{folder}"], env=env)
        _mcopy_files(mcopy, image, folder + "/", {n: t.encode() for n, t in files.items()}, epoch, env)
    except CommandError as e:
        raise SohoError(f"{target}: could not write the seed onto its FAT partition: {e}") from None


def read_seed_from_fat(target: str | os.PathLike[str], offset: int, folder: str) -> dict[str, str]:
    """The seed files in *folder* of the FAT volume at *offset* of *target* (to check a write)."""
    mdir, mcopy = _tool("mdir", "mtools"), _tool("mcopy", "mtools")
    image = f"{os.fspath(target)}@@{offset}"
    listing = run([mdir, "-b", "-i", image, f"::/{folder}"], env=MTOOLS_ENV, capture=True).stdout
    out = {}
    for line in listing.splitlines():
        name = line.strip().rsplit("/", 1)[-1]
        if name and not line.strip().endswith("/"):
            out[name] = run([mcopy, "-n", "-i", image, f"::/{folder}/{name}", "-"], env=MTOOLS_ENV, capture=True).stdout
    return out


def write_admin_seed(hostname: str, ssh_key_file: Path, out: Path, *, lan_address: str | None = None) -> Path:
    """`sohocloud seed`: a seed for one node with the admin's keys from *ssh_key_file* and, if given,
    a static LAN address (CIDR) for the interface named lan."""
    network = None
    if lan_address:
        network = {"version": 2, "ethernets": {"lan": {"match": {"name": "lan"}, "addresses": [lan_address]}}}
    return write_cidata(render_seed(hostname, read_ssh_keys(ssh_key_file), network=network), out)
