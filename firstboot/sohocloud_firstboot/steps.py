"""The seed's steps on the root: host name, SSH host key, the admin's keys, write_files."""

from __future__ import annotations

import base64
import binascii
import os
import subprocess
from pathlib import PurePosixPath

from .context import StepError, info, warn
from .files import fsync_dir, read_group, read_passwd, write_atomic
from .seedrules import ADMIN, is_public_key, valid_hostname

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see main.py)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from .context import Ctx
    from .seed import Seed

HOST_KEY = "etc/ssh/ssh_host_ed25519_key"


# --------------------------------------------------------------------------- step 1: hostname


def apply_hostname(ctx: Ctx, seed: Seed) -> None:
    name = seed.hostname
    if name is None:
        info("hostname: none in seed, left unchanged")
        return
    if not valid_hostname(name):
        raise StepError(
            f"{seed.hostname_key} {name!r} is not a valid host name "
            "(1-63 letters, digits, '-', not starting or ending with '-')"
        )
    name = name.lower()
    write_atomic(ctx.path("etc/hostname"), f"{name}\n".encode(), 0o644)
    hosts = ctx.path("etc/hosts")
    try:
        lines = hosts.read_text().splitlines()
    except FileNotFoundError:
        lines = ["127.0.0.1\tlocalhost", "::1\t\tlocalhost ip6-localhost ip6-loopback"]
    entry = f"127.0.1.1\t{name}"
    out, placed = [], False
    for line in lines:
        if line.split()[:1] == ["127.0.1.1"]:
            if not placed:
                out.append(entry)
                placed = True
            continue  # drop duplicate 127.0.1.1 lines from older seeds
        out.append(line)
    if not placed:
        # After the IPv4 localhost line keeps the conventional Debian layout.
        idx = next((i + 1 for i, ln in enumerate(out) if ln.split()[:1] == ["127.0.0.1"]), 0)
        out.insert(idx, entry)
    write_atomic(hosts, ("\n".join(out) + "\n").encode(), 0o644)
    if ctx.system:
        # sethostname(2) directly: the hostname binary is not essential in newer Debian.
        # lazy: socket builds its enums on import (start-up time); only a live node names itself
        import socket

        socket.sethostname(name)
    info(f"hostname: {name}")


# --------------------------------------------------------------------------- step 2: host keys


def ensure_host_key(ctx: Ctx) -> None:
    """One ed25519 host key per node, generated on the node (never in the image)."""
    key = ctx.path(HOST_KEY)
    pub = key.with_name(key.name + ".pub")
    if key.is_file():
        if not pub.is_file():
            # The private key is the truth; rebuild a lost .pub from it.
            r = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise StepError(f"ssh host key: cannot derive {HOST_KEY}.pub (ssh-keygen exit {r.returncode})")
            write_atomic(pub, r.stdout.encode(), 0o644)
        info(f"ssh host key: /{HOST_KEY} present")
        return
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    # Fixed temp names in the same directory: a leftover from a power cut is
    # removed here, and the renames below are atomic. The private key is
    # renamed last because its existence is what marks the step done.
    tmp = key.with_name(".sohocloud-hostkey.tmp")
    tmp_pub = tmp.with_name(tmp.name + ".pub")
    for p in (tmp, tmp_pub):
        p.unlink(missing_ok=True)
    r = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(tmp)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )
    if r.returncode != 0:
        for p in (tmp, tmp_pub):
            p.unlink(missing_ok=True)
        raise StepError(f"ssh host key: ssh-keygen failed (exit {r.returncode}): {r.stderr.strip()}")
    for p, mode in ((tmp, 0o600), (tmp_pub, 0o644)):
        os.chmod(p, mode)
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp_pub, pub)
    os.replace(tmp, key)
    fsync_dir(key.parent)
    info(f"ssh host key: generated /{HOST_KEY}")


# --------------------------------------------------------------------------- step 3: admin keys


def collect_admin_keys(user: dict[str, Any]) -> list[str]:
    """Top-level ssh_authorized_keys + the 'admin' entry of users; bad keys are
    skipped with a warning that names their position, never their content."""
    sources: list[tuple[str, Any]] = [("ssh_authorized_keys", user.get("ssh_authorized_keys"))]
    users = user.get("users")
    if users is not None and not isinstance(users, list):
        raise StepError("user-data: 'users' must be a list")
    for i, u in enumerate(users or []):
        if isinstance(u, str):
            continue  # cloud-init's "default" and friends: nothing to do here
        if not isinstance(u, dict):
            warn(f"user-data: users[{i}] is not a mapping, ignored")
            continue
        if u.get("name") == ADMIN:
            sources.append((f"users[{i}].ssh_authorized_keys", u.get("ssh_authorized_keys")))
        else:
            warn(f"user-data: users[{i}] ignored: only the '{ADMIN}' account is managed")
    keys: list[str] = []
    for where, val in sources:
        if val is None:
            continue
        if not isinstance(val, list):
            warn(f"user-data: {where} must be a list, ignored")
            continue
        for j, k in enumerate(val):
            k = k.strip() if isinstance(k, str) else None
            if k is None or not is_public_key(k):
                warn(f"user-data: {where}[{j}] is not an OpenSSH public key, skipped")
            elif k not in keys:
                keys.append(k)
    return keys


def apply_admin_keys(ctx: Ctx, seed: Seed) -> None:
    if seed.user is None:
        info("admin keys: no readable user-data, authorized_keys left unchanged")
        return
    keys = collect_admin_keys(seed.user)
    if not keys:
        # Writing an empty file would lock the admin out of a node it can reach
        # today; an empty seed is far more likely a mistake than a revocation.
        warn("admin keys: no valid key in user-data, authorized_keys left unchanged")
        return
    pw = read_passwd(ctx, ADMIN)
    if pw is None:
        raise StepError(f"admin keys: user '{ADMIN}' not found in /etc/passwd of the image")
    uid, gid, home = pw
    ssh_dir = ctx.path(home) / ".ssh"
    if ssh_dir.is_symlink():
        raise StepError(f"admin keys: {home}/.ssh is a symlink, refusing to write through it")
    as_root = os.geteuid() == 0
    for d, mode in ((ssh_dir.parent, 0o700), (ssh_dir, 0o700)):
        if not d.exists():
            d.mkdir(parents=True, mode=mode)
            if as_root:
                os.chown(d, uid, gid)
    os.chmod(ssh_dir, 0o700)
    if as_root:
        os.chown(ssh_dir, uid, gid)
    data = "".join(k + "\n" for k in keys).encode()
    write_atomic(ssh_dir / "authorized_keys", data, 0o600, uid, gid)
    info(f"admin keys: {len(keys)} key(s) written to {home}/.ssh/authorized_keys")


# --------------------------------------------------------------------------- step 5: write_files (4: network.py)


def safe_target(ctx: Ctx, path: Any) -> Path:
    """Map an absolute in-image path under ROOT; refuse anything that could
    land outside it ('..', or a symlinked directory leading out)."""
    if not isinstance(path, str) or not path:
        raise StepError("'path' missing")
    p = PurePosixPath(path)
    if not p.is_absolute() or len(p.parts) < 2:
        raise StepError(f"path {path!r} must be an absolute file path")
    if ".." in p.parts:
        raise StepError(f"path {path!r} contains '..' and could escape the root, refused")
    target = ctx.root.joinpath(*p.parts[1:])
    root_real = os.path.realpath(ctx.root)
    anc = target.parent
    while not os.path.lexists(anc):
        anc = anc.parent
    real = os.path.realpath(anc)
    if os.path.commonpath([real, root_real]) != root_real:
        raise StepError(f"path {path!r} leads outside the root through a symlink, refused")
    if target.is_dir() and not target.is_symlink():
        raise StepError(f"path {path!r} is a directory")
    return target


def parse_mode(val: Any) -> int:
    if val is None:
        return 0o644
    if isinstance(val, bool):
        raise StepError("'permissions' must be an octal string such as '0640'")
    try:
        # Unquoted 0644 is already an int in YAML 1.1; strings are octal.
        mode = val if isinstance(val, int) else int(str(val).removeprefix("0o"), 8)
    except ValueError:
        raise StepError(f"'permissions' {val!r} is not an octal mode such as '0640'") from None
    if not 0 <= mode <= 0o7777:
        raise StepError(f"'permissions' {val!r} is out of range")
    return mode


def parse_owner(ctx: Ctx, val: Any) -> tuple[int, int]:
    if val is None:
        return 0, 0
    if not isinstance(val, str) or not val:
        raise StepError("'owner' must be 'user:group'")
    user, _, group = val.partition(":")
    pw = read_passwd(ctx, user)
    if pw is None:
        raise StepError(f"owner user {user!r} not found in /etc/passwd")
    gid = pw[1]
    if group:
        g = read_group(ctx, group)
        if g is None:
            raise StepError(f"owner group {group!r} not found in /etc/group")
        gid = g
    return pw[0], gid


def write_one(ctx: Ctx, entry: Any) -> str:
    if not isinstance(entry, dict):
        raise StepError("must be a mapping with 'path' and 'content'")
    target = safe_target(ctx, entry.get("path"))
    content = entry.get("content", "")
    enc = entry.get("encoding")
    if isinstance(content, bytes):
        data = content  # YAML !!binary
    elif not isinstance(content, str):
        raise StepError("'content' must be a string")
    elif enc in (None, "text/plain"):
        data = content.encode()
    elif enc in ("b64", "base64"):
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise StepError("'content' is not valid base64") from None
    else:
        raise StepError(f"encoding {enc!r} not supported (use none or 'b64')")
    for k in sorted(set(entry) - {"path", "content", "encoding", "permissions", "owner"}):
        warn(f"user-data: write_files '{entry['path']}': '{k}' not supported, ignored")
    mode = parse_mode(entry.get("permissions"))
    uid, gid = parse_owner(ctx, entry.get("owner"))
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    write_atomic(target, data, mode, uid, gid)
    return f"{entry['path']} ({mode:04o})"


def apply_write_files(ctx: Ctx, seed: Seed) -> None:
    if seed.user is None:
        return
    entries = seed.user.get("write_files")
    if entries is None:
        return
    if not isinstance(entries, list):
        raise StepError("user-data: 'write_files' must be a list")
    written = 0
    for i, e in enumerate(entries):
        try:
            desc = write_one(ctx, e)
        except StepError as x:
            ctx.error(f"user-data: write_files[{i}]: {x}")
            continue
        info(f"write_files: {desc}")  # path and mode only, never content
        written += 1
    info(f"write_files: {written} of {len(entries)} file(s) written")
