"""A WireGuard peer for `fleet test`: a VPN client in a network namespace of its own.

This host's kernel may have no WireGuard, so the peer is wireguard-go (Debian's userspace
implementation), run in the peer's own namespace. That namespace has one wire, a veth pair to the
gateway's WAN bridge in the site's namespace (`fleet up`'s stand-in for the internet), and its
default route is the tunnel. Whatever the peer reaches, it reaches through the office's router,
and no packet leaves the namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SohoError
from ..proc import run
from .running import WAN_BRIDGE, WAN_GATEWAY

UAPI_DIR = Path("/var/run/wireguard")


PEER_WAN = "192.0.2.9"  # the peer's address on the WAN side (RFC 5737, routed nowhere)


@dataclass
class VpnPeer:
    site_netns: str  # the site's namespace (its WAN bridge)
    netns: str  # the peer's own namespace (created here, deleted by close())
    ifname: str
    process: subprocess.Popen | None = None

    @classmethod
    def start(cls, site_netns: str, private_key: str, address: str, router_public: str, endpoint: str) -> VpnPeer:
        """A peer with *private_key* and tunnel *address*, connected to the router (*router_public*)
        at *endpoint* (its WAN address:port)."""
        missing = [t for t in ("wireguard-go", "wg") if shutil.which(t) is None]
        if missing:
            raise SohoError(f"the VPN check needs {' and '.join(missing)} on this host "
                            "(apt install wireguard-go wireguard-tools)")
        peer = cls(site_netns, f"{site_netns}-vpn", f"wgp{os.getpid() % 100000}")
        try:
            peer._up(private_key, address, router_public, endpoint)
        except BaseException:
            peer.close()
            raise
        return peer

    def _up(self, private_key: str, address: str, router_public: str, endpoint: str) -> None:
        outer, inner = f"{self.ifname}o", f"{self.ifname}i"
        run(["ip", "netns", "add", self.netns])
        run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        run(["ip", "-n", self.site_netns, "link", "add", outer, "type", "veth", "peer", "name", inner,
             "netns", self.netns])
        run(["ip", "-n", self.site_netns, "link", "set", outer, "master", WAN_BRIDGE, "up"])
        # The wire reaches the router's WAN address only; all else (the WAN side too) is the tunnel's.
        run(["ip", "-n", self.netns, "addr", "add", f"{PEER_WAN}/32", "dev", inner])
        run(["ip", "-n", self.netns, "link", "set", inner, "up"])
        run(["ip", "-n", self.netns, "route", "add", f"{WAN_GATEWAY}/32", "dev", inner])
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
        self.process = subprocess.Popen(["ip", "netns", "exec", self.netns, "wireguard-go", self.ifname],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not (UAPI_DIR / f"{self.ifname}.sock").exists():
            if self.process.poll() is not None:
                raise SohoError(f"wireguard-go did not start: {self.process.stdout.read().decode()[-300:]}")
            if time.monotonic() > deadline:
                raise SohoError("wireguard-go did not start in 20 s")
            time.sleep(0.2)
        # The key goes through a 0600 file, never argv.
        with tempfile.NamedTemporaryFile("w", prefix="wgkey", delete=True) as key:
            os.chmod(key.name, 0o600)
            key.write(private_key + "\n")
            key.flush()
            run(["ip", "netns", "exec", self.netns, "wg", "set", self.ifname, "private-key", key.name,
                 "peer", router_public, "endpoint", endpoint, "allowed-ips", "0.0.0.0/0",
                 "persistent-keepalive", "5"])
        run(["ip", "-n", self.netns, "addr", "add", f"{address}/32", "dev", self.ifname])
        run(["ip", "-n", self.netns, "link", "set", self.ifname, "up"])
        # Everything but the WAN side itself goes into the tunnel: what the router lets through is all
        # the peer reaches.
        run(["ip", "-n", self.netns, "route", "add", "default", "dev", self.ifname])

    def exec(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def handshake_age(self) -> float | None:
        """Seconds since the last handshake with the router, None if there was none."""
        out = run(["ip", "netns", "exec", self.netns, "wg", "show", self.ifname, "latest-handshakes"],
                  capture=True, timeout=30).stdout
        stamps = [int(line.split()[1]) for line in out.splitlines() if len(line.split()) == 2]
        return time.time() - max(stamps) if stamps and max(stamps) > 0 else None

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)  # the veth pair goes with it
        (UAPI_DIR / f"{self.ifname}.sock").unlink(missing_ok=True)
