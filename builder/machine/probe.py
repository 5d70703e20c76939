"""Probes of a booting VM from the host: its SSH banner, through QEMU user-net or from inside a
network namespace (a probe there is a small Python script run in the namespace)."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import subprocess
import sys
import time

from ..errors import SohoError


def probe_in_netns(netns: str, script: str, *args: str, timeout: float) -> str:
    """Run a small Python *script* (this interpreter) inside *netns*; its stdout. A probe, not
    a build step: a failure is an answer ("" or the script's output), never an exception."""
    try:
        r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script, *args],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ""
    return r.stdout


def wait_ssh_banner(host: str, port: int, timeout: float, *, netns: str | None = None,
                    alive=lambda: True) -> float:
    """Seconds until an SSH banner is read from host:port (inside *netns* if given).

    On a tap LAN (netns) a probe is exact: connect() fails at once until the
    guest listens, and a connection that succeeds waits for the banner.
    Through QEMU user-net every connect succeeds at once and is only then
    forwarded, so probes overlap a little (one more each second, three at
    most) lest one stuck in forwarding hide the moment sshd answers; few
    enough not to load the guest while it boots.
    """
    t0 = time.monotonic()
    if netns is not None:
        while time.monotonic() - t0 < timeout:
            if not alive():
                raise SohoError("the VM exited before SSH came up")
            if _banner_netns(host, port, netns, min(60.0, timeout)):
                return time.monotonic() - t0
            time.sleep(0.2)
        raise SohoError(f"no SSH banner from {host}:{port} within {timeout:.0f} s")
    with cf.ThreadPoolExecutor(max_workers=3) as pool:
        pending: set[cf.Future] = set()
        try:
            while time.monotonic() - t0 < timeout:
                if not alive():
                    raise SohoError("the VM exited before SSH came up")
                if len(pending) < 3:
                    pending.add(pool.submit(_banner_user_net, host, port))
                done, pending = cf.wait(pending, timeout=1.0, return_when=cf.FIRST_COMPLETED)
                if any(f.result() for f in done):
                    return time.monotonic() - t0
        finally:
            for f in pending:
                f.cancel()
    raise SohoError(f"no SSH banner from {host}:{port} within {timeout:.0f} s")


def _banner_user_net(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(8)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


_PROBE = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
    s.settimeout(float(sys.argv[3]))
    sys.stdout.write(s.recv(64).decode(errors="replace"))
except OSError:
    pass
"""


def _banner_netns(host: str, port: int, netns: str, wait: float) -> bool:
    """One probe from inside *netns*: returns as soon as the banner (or a refusal) arrives."""
    return probe_in_netns(netns, _PROBE, host, str(port), str(wait), timeout=wait + 10).startswith("SSH-")
