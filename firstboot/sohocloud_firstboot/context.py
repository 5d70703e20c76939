"""Where firstboot works (the root, its state files), how it speaks, and its one error type."""

from __future__ import annotations

import subprocess
import sys

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see main.py)
if TYPE_CHECKING:
    from pathlib import Path

PROG = "sohocloud-firstboot"

# State under the root, shared by the phases and the steps.
STATE_DIR = "var/lib/sohocloud"
MARKER = f"{STATE_DIR}/firstboot.done"
RUN_DIR = "run/sohocloud"
SEED_JSON = f"{RUN_DIR}/seed.json"
# Written by the early phase each boot for the online phase (see --phase).
HANDOFF = f"{RUN_DIR}/instance-id"
ONLINE_MARKER = f"{STATE_DIR}/online.done"
SEED_DIRS_LIST = "etc/sohocloud/seed-dirs"
# Left by the netboot initrd when the seed server answered 404 for this MAC.
NOT_ENROLLED = f"{RUN_DIR}/not-enrolled"


def info(msg: str) -> None:
    print(f"{PROG}: {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)


class StepError(Exception):
    """A problem with one seed item; the message is safe to log (no secrets)."""


def tool(cmd: list[str]) -> "subprocess.CompletedProcess[str] | None":
    """Run a system tool quietly; None if it is not installed. Discovery and
    udev helpers must not abort the run (host keys still have to happen)."""
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except OSError:
        return None


class Ctx:
    def __init__(self, root: Path, system: bool) -> None:
        self.root = root
        self.system = system
        self.errors: list[str] = []

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def error(self, msg: str) -> None:
        # One line per problem: the unit sends stderr to journal and console.
        self.errors.append(msg)
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
