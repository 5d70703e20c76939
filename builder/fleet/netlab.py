"""Private virtual LANs for VMs: a network namespace with a bridge and taps.

Everything lives inside namespaces this module creates (never the host's
default namespace), so test traffic cannot reach any real network.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, field

from ..proc import run

log = logging.getLogger("sohocloud.netlab")


@dataclass
class Netns:
    """A namespace holding one bridge (the LAN); taps and veth clients attach to it."""

    name: str
    bridge: str = "br0"
    clients: list[str] = field(default_factory=list)

    def create(self) -> "Netns":
        run(["ip", "netns", "add", self.name])
        self.ip("link", "set", "lo", "up")
        self.ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.ip("link", "set", self.bridge, "up")
        return self

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.name, *args])

    def exec(self, argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.name, *argv], **kw)

    def add_bridge(self, bridge: str) -> None:
        """A second bridge (another network, e.g. the gateway's WAN side)."""
        self.ip("link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.ip("link", "set", bridge, "up")

    def add_tap(self, tap: str, bridge: str | None = None) -> str:
        """A tap on the bridge (or *bridge*), for a QEMU started inside this namespace."""
        self.ip("tuntap", "add", "dev", tap, "mode", "tap")
        self.ip("link", "set", tap, "master", bridge or self.bridge, "up")
        return tap

    def add_address(self, cidr: str) -> None:
        """An address on the bridge itself: the test host's seat on the LAN."""
        self.ip("addr", "add", cidr, "dev", self.bridge)

    def add_client(self, name: str, mac: str | None = None) -> str:
        """A separate namespace *name* wired to the bridge by a veth pair (a LAN client)."""
        run(["ip", "netns", "add", name])
        self.clients.append(name)
        inner, outer = "eth0", f"v{abs(hash(name)) % 10**6}"
        run(["ip", "-n", self.name, "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", name])
        self.ip("link", "set", outer, "master", self.bridge, "up")
        if mac:
            run(["ip", "-n", name, "link", "set", inner, "address", mac])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "-n", name, "link", "set", inner, "up"])
        return inner

    def delete(self) -> None:
        for c in self.clients:
            subprocess.run(["ip", "netns", "del", c], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def unique_name(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}"
