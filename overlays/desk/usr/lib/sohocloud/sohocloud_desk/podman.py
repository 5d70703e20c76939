"""The Runner of a real workstation host: each session is container.run_argv, run as the person.

Before the first start of a person on this host, their subordinate id range goes into /etc/subuid
and /etc/subgid (rootless podman's user namespace needs one, and the directory's people have none:
useradd only writes them for local accounts). Ranges start above useradd's (SUB_UID_MAX 600100000)
so they never overlap a local account's, 65536 ids each, as podman's keep-id needs.

The session's folder (0700, the person's) holds podman's state, the VNC socket's folder and the
session's own machine-id; it is removed when the session stops, and it is on tmpfs: a reboot loses
it with everything else.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import container, system

SUBID_BASE = 1_000_000_000
SUBID_COUNT = 65536
RUN_TIMEOUT = 60.0  # seconds for `podman run` to hand the container to its unit
START_TIMEOUT = 180.0  # seconds for the desktop's VNC socket to appear (an emulated host is slow)
STOP_TIMEOUT = 90.0  # seconds for the session's unit to stop
# The longest a start or a stop takes here before it fails with its own reason: the callers up the
# chain (the broker, the panel) wait longer than this (service.py).
START_BUDGET = RUN_TIMEOUT + START_TIMEOUT
STOP_BUDGET = STOP_TIMEOUT


def add_subids(person: str, file: Path) -> int:
    """The first id of *person*'s range in *file* (subuid or subgid), added if missing. Written whole
    (a temp file renamed) under a lock: two sessions starting at once cannot tear it."""
    with open(file.with_name(f".{file.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = file.read_text().splitlines() if file.exists() else []
        end = SUBID_BASE
        for line in lines:
            name, _, rest = line.partition(":")
            start, _, count = rest.partition(":")
            if not (start.isdigit() and count.isdigit()):
                continue
            if name == person:
                return int(start)
            end = max(end, int(start) + int(count))
        if end + SUBID_COUNT > 2**32:
            raise RuntimeError(f"{file}: no room left for another person's id range")
        tmp = file.with_name(f".{file.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines) + f"{person}:{end}:{SUBID_COUNT}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
        return end


def person_gid(person: str, uid: int) -> int:
    """The person's primary group from the host's directory (NSS: sssd over LDAP)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise RuntimeError(f"uid {uid} is not known on this host (is its directory reachable?)") from None
    if entry.pw_name != person:
        raise RuntimeError(f"uid {uid} is {entry.pw_name} on this host, not {person}")
    return entry.pw_gid


@dataclass
class PodmanRunner:
    template: str = container.TEMPLATE
    etc: Path = Path("/etc")
    run: system.Run = system.run
    start_timeout: float = START_TIMEOUT

    def start(self, s: container.Session) -> None:
        gid = person_gid(s.person, s.uid)
        if not os.path.isdir(s.home):  # looking triggers the NAS homes' automount
            raise RuntimeError(f"{s.person}'s home {s.home} is not there (is the NAS reachable?)")
        for name in ("subuid", "subgid"):
            add_subids(s.person, self.etc / name)
        folder = Path(s.session_dir)
        folder.parent.mkdir(mode=0o711, parents=True, exist_ok=True)  # the person passes through to theirs
        folder.mkdir(mode=0o700)
        (folder / "vnc").mkdir(mode=0o700)
        # dbus in the session wants a machine id; a fresh one per session links nothing across them.
        (folder / "machine-id").write_text(secrets.token_hex(16) + "\n")
        for p in (folder, folder / "vnc", folder / "machine-id"):
            os.chown(p, s.uid, gid)
        self.run(container.run_argv(s, gid, self.template), timeout=RUN_TIMEOUT)
        self._wait_for_desktop(s)

    def _wait_for_desktop(self, s: container.Session) -> None:
        sock = Path(s.session_dir) / "vnc" / "vnc.sock"
        deadline = time.monotonic() + self.start_timeout
        while not sock.exists():
            state = self.run(["systemctl", "is-active", container.unit_name(s)], check=False).stdout.strip()
            if state not in ("active", "activating"):
                log = self.run(["journalctl", "-u", container.unit_name(s), "-n", "5", "-o", "cat", "--no-pager"],
                               check=False).stdout.strip().replace("\n", " | ")
                raise RuntimeError(f"the desktop container stopped ({state}): {log[-300:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the desktop did not start within {self.start_timeout:.0f} s")
            time.sleep(0.2)

    def stop(self, s: container.Session) -> None:
        # The unit is the session: stopping it ends podman, the container and all in it. Then the
        # session's folder (podman's state, the socket, the machine id) goes.
        self.run(container.stop_argv(s), check=False, timeout=STOP_TIMEOUT)
        self.run(["systemctl", "reset-failed", container.unit_name(s)], check=False)
        shutil.rmtree(s.session_dir, ignore_errors=True)
