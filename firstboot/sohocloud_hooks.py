"""Helpers for role hooks (firstboot.d / online.d): settings, checked values, files, commands.

Stdlib only: it runs on minimal nodes. The seed's rules (key format, names) are
sohocloud_firstboot.seedrules, the package installed beside this module
(/usr/lib/sohocloud). Every path goes through ROOT so hooks
can be exercised against a fake root on the build host (SOHOCLOUD_ROOT).
Secrets from the seed go to files (0600) or stdin, never to argv or the log.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
import socket
import subprocess
import sys
from pathlib import Path

from sohocloud_firstboot import seedrules

TYPE_CHECKING = False  # typing costs a few tenths of a second of an emulated boot; annotations only
if TYPE_CHECKING:
    from typing import Any

ROOT = Path(os.environ.get("SOHOCLOUD_ROOT", "/"))
LIVE = ROOT == Path("/")  # hooks touch the running system (systemctl, mount) only on a real node
TLS_DIR = "etc/sohocloud/tls"

NAME_RE = seedrules.LABEL_RE
DOMAIN_RE = seedrules.DOMAIN_RE
PEM_RE = re.compile(r"-----BEGIN ([A-Z ]+)-----\n[A-Za-z0-9+/=\n]+-----END \1-----\n?")
SSH_KEY_TYPES = seedrules.SSH_KEY_TYPES


class Refused(SystemExit):
    pass


def tag() -> str:
    return Path(sys.argv[0]).name


def say(msg: str) -> None:
    print(f"sohocloud-firstboot: {tag()}: {msg}", file=sys.stderr, flush=True)


def check(ok: bool, what: str) -> None:
    """Seed values become config lines: anything not of the expected form is refused."""
    if not ok:
        raise Refused(f"sohocloud-firstboot: {tag()}: seed value refused: {what}")


def settings() -> dict[str, Any]:
    path = os.environ.get("SOHOCLOUD_SEED_JSON", "")
    check(bool(path) and Path(path).is_file(), "no role settings (SOHOCLOUD_SEED_JSON)")
    data = json.loads(Path(path).read_text())
    check(isinstance(data, dict), "role settings are not a mapping")
    return data


def section(data: dict[str, Any], key: str, required: bool = True) -> dict[str, Any]:
    value = data.get(key)
    if value is None and not required:
        return {}
    check(isinstance(value, dict), f"'{key}' missing or not a mapping")
    return value


# --------------------------------------------------------------------------- value checks


def name(value: Any, what: str) -> str:
    check(isinstance(value, str) and bool(NAME_RE.fullmatch(value)), f"{what}: expected a lowercase name")
    return value


def domain(value: Any, what: str = "domain") -> str:
    check(isinstance(value, str) and bool(DOMAIN_RE.fullmatch(value)) and len(value) <= 253,
          f"{what}: expected a DNS domain")
    return value


def ip(value: Any, what: str) -> str:
    text = str(value)
    check("%" not in text and " " not in text and text.isprintable(), f"{what}: expected an IP address")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        check(False, f"{what}: expected an IP address")
        raise


def network(value: Any, what: str) -> str:
    text = str(value)
    check("%" not in text and " " not in text and text.isprintable(), f"{what}: expected a network")
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        check(False, f"{what}: expected a network")
        raise


def integer(value: Any, what: str, lo: int, hi: int) -> int:
    check(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
          f"{what}: expected an integer {lo}..{hi}")
    return value


def pem(value: Any, what: str) -> str:
    check(isinstance(value, str) and bool(PEM_RE.fullmatch(value.strip() + "\n")), f"{what}: expected PEM")
    return value.strip() + "\n"


def secret(value: Any, what: str) -> str:
    """A generated secret: printable, no whitespace or quotes (it lands in config files)."""
    check(isinstance(value, str) and 16 <= len(value) <= 256 and bool(re.fullmatch(r"[A-Za-z0-9_.+/=-]+", value)),
          f"{what}: expected a generated secret")
    return value


def ssh_key(value: Any, what: str) -> str:
    """An OpenSSH public key line, as firstboot and `sohocloud seed` accept it (any comment, one line)."""
    check(isinstance(value, str) and seedrules.is_public_key(value.strip()), f"{what}: expected an SSH public key")
    return value.strip()


# --------------------------------------------------------------------------- files


def path(rel: str) -> Path:
    return ROOT / rel.lstrip("/")


def write(rel: str, text: str | bytes, mode: int = 0o644, owner: str | None = None, group: str | None = None) -> Path:
    """Write atomically (temp + rename) with the mode set before any byte lands."""
    p = path(rel)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    # Some targets sit in directories their service account owns: never follow
    # a link planted there, never reuse a file someone else made.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fchmod(f.fileno(), mode)
        if os.geteuid() == 0 and (owner is not None or group is not None):
            os.fchown(f.fileno(), -1 if owner is None else lookup_uid(owner),
                      -1 if group is None else lookup_gid(group))
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p


def chown(p: Path, owner: str | int | None, group: str | int | None) -> None:
    if os.geteuid() != 0 or (owner is None and group is None):
        return
    uid = -1 if owner is None else (owner if isinstance(owner, int) else lookup_uid(owner))
    gid = -1 if group is None else (group if isinstance(group, int) else lookup_gid(group))
    os.chown(p, uid, gid)


def lookup_uid(user: str) -> int:
    if LIVE:
        return pwd.getpwnam(user).pw_uid
    for line in path("etc/passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == user:
            return int(f[2])
    raise KeyError(user)


def lookup_gid(group: str) -> int:
    if LIVE:
        return grp.getgrnam(group).gr_gid
    for line in path("etc/group").read_text().splitlines():
        f = line.split(":")
        if f[0] == group:
            return int(f[2])
    raise KeyError(group)


def set_managed_block(rel: str, marker: str, lines: list[str], mode: int = 0o644) -> None:
    """Replace (or append) the lines between '# BEGIN marker' and '# END marker'."""
    p = path(rel)
    old = p.read_text().splitlines() if p.exists() else []
    begin, end = f"# BEGIN {marker}", f"# END {marker}"
    out, skip = [], False
    for line in old:
        if line == begin:
            skip = True
        elif line == end:
            skip = False
        elif not skip:
            out.append(line)
    out += [begin, *lines, end]
    write(rel, "\n".join(out) + "\n", mode)


def install_tls(data: dict[str, Any]) -> None:
    """The site CA and this node's key + certificate (from the seed) in /etc/sohocloud/tls."""
    tls = section(data, "tls")
    write(f"{TLS_DIR}/ca.crt", pem(data.get("ca_cert"), "ca_cert"))
    write(f"{TLS_DIR}/node.crt", pem(tls.get("cert"), "tls.cert"))
    write(f"{TLS_DIR}/node.key", pem(tls.get("key"), "tls.key"), 0o600)


# --------------------------------------------------------------------------- commands


def run(argv: list[str], *, stdin: str | None = None, check_rc: bool = True,
        quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command; argv never carries a secret (those go through stdin or files)."""
    if not quiet:
        say("$ " + " ".join(argv))
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check_rc and p.returncode != 0:
        raise SystemExit(f"sohocloud-firstboot: {tag()}: {argv[0]} failed (exit {p.returncode}): "
                         f"{p.stderr.strip()[-400:]}")
    return p


def systemctl(*args: str) -> None:
    if LIVE:
        run(["systemctl", *args])


def start_if_down(unit: str) -> str:
    """*unit*'s state; a unit that is not running (systemd gave up on it: its start limit,
    hit on a starved guest) is started again in the background (the hook's next try looks again)."""
    if not LIVE:
        return "active"
    state = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True).stdout.strip()
    if state not in ("active", "activating", "reloading"):
        subprocess.run(["systemctl", "reset-failed", unit], capture_output=True)
        subprocess.run(["systemctl", "start", "--no-block", unit], capture_output=True)
        say(f"{unit} was {state or 'unknown'}: started it again")
    return state


# sssd asked for people it did not find, in this boot (a count: every few, it is restarted).
SSSD_MISSES = "run/sohocloud/sssd-misses"
SSSD_RESTART_EVERY = 4


def nudge_sssd() -> None:
    """People the directory should know are not found through sssd: ask it to go online now
    (USR2), and every few misses restart it. On a starved boot (seen on the emulated NAS) sssd's
    responders can fail to register with its backend ("timed out before identification", then
    "Unable to register client with DP" for good): it answers nothing until it is restarted."""
    if not LIVE or start_if_down("sssd.service") != "active":
        return
    try:
        misses = int(path(SSSD_MISSES).read_text()) + 1
    except (OSError, ValueError):
        misses = 1
    write(SSSD_MISSES, f"{misses}\n")
    if misses % SSSD_RESTART_EVERY == 0:
        subprocess.run(["systemctl", "restart", "--no-block", "sssd.service"], capture_output=True)
        say(f"sssd found nobody {misses} times: restarted it")
    else:
        subprocess.run(["systemctl", "kill", "-s", "USR2", "sssd.service"], capture_output=True)


def lan_address() -> str | None:
    """This node's LAN address, from the network file firstboot wrote from the seed."""
    for p in sorted(path("etc/systemd/network").glob("*lan*.network")):
        for line in p.read_text().splitlines():
            if line.startswith("Address="):
                return line.split("=", 1)[1].split("/")[0]
    return None


# --------------------------------------------------------------------------- docker engine API


def unix_http_connection(sock_path: str, timeout: float = 60):
    """An HTTPConnection over a unix socket. http.client is imported here, not at the
    top: it pulls in email and ssl (~2 s of an emulated first boot), and only the
    cluster hooks talk HTTP."""
    import http.client

    class UnixHTTPConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            s.connect(sock_path)
            self.sock = s

    return UnixHTTPConnection("localhost", timeout=timeout)


def docker(method: str, url: str, body: Any = None, sock: str = "/run/docker.sock") -> tuple[int, Any]:
    """One Docker Engine API call (secrets such as join tokens travel in the body, not argv)."""
    conn = unix_http_connection(sock)
    try:
        payload = None if body is None else json.dumps(body)
        conn.request(method, url, body=payload, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = raw.decode(errors="replace")
    return resp.status, data
