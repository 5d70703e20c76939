"""A site that runs: where its VMs keep their disks and consoles (out/<site>/run/), its state file
(which QEMU runs each node, in which network namespace), the record of the build it booted, and
`fleet down` / `fleet ssh`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SohoError
from ..proc import run
from .record import RECORD_NAME, SiteRecord, read_record, record_path
from .sitefile import Site, SiteNode


@dataclass(frozen=True)
class FleetPaths:
    out: Path
    site: str

    @property
    def run(self) -> Path:
        return self.out / self.site / "run"

    @property
    def state(self) -> Path:
        return self.run / "state.json"

    @property
    def booted(self) -> Path:
        """The site record of the build this site was booted from (a copy made by `fleet up`)."""
        return self.run / RECORD_NAME

    @property
    def known_hosts(self) -> Path:
        return self.run / "known_hosts"

    @property
    def wan_dhcpd_pid(self) -> Path:
        return self.run / "wan-dhcpd.pid"

    def console(self, node: str) -> Path:
        return self.run / f"{node}.console.log"

    def monitor(self, node: str) -> Path:
        """The node's QEMU QMP socket (its screen: builder.machine.qemu.screendump)."""
        return self.run / f"{node}.qmp"


def netns_name(site: Site) -> str:
    return f"sc-{site.name}"


def seat_address(site: Site) -> str:
    """The host's own address on the site LAN (inside the namespace): the last host address."""
    net = site.network
    return f"{net.broadcast_address - 1}/{net.prefixlen}"


# The gateway's WAN side: a second bridge in the site's namespace standing in for the internet
# (RFC 5737 documentation addresses, routed nowhere). The host's seat on it serves the gateway its
# WAN address by DHCP (busybox udhcpd); `fleet test` probes the WAN from there, and a VPN peer
# connects from there. Nothing on it reaches beyond the namespace.
WAN_BRIDGE = "brwan"
WAN_SEAT = "192.0.2.1"
WAN_GATEWAY = "192.0.2.2"  # the gateway's WAN address (the DHCP server's only lease)
WAN_PREFIX = 24
# Ports of the gateway's WAN address that `fleet test` probes from the WAN side.
WAN_PROBE_PORTS = (22, 53, 80, 443, 636, 7443, 9090, 9100)


def wan_mac(node: SiteNode) -> str:
    """The gateway's WAN NIC: its LAN MAC with the locally administered prefix 52:54:01."""
    return "52:54:01:" + node.mac.split(":", 3)[3]


# --------------------------------------------------------------------------- state


def read_state(paths: FleetPaths) -> dict | None:
    return json.loads(paths.state.read_text()) if paths.state.is_file() else None


def write_state(paths: FleetPaths, state: dict) -> None:
    tmp = paths.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, paths.state)


def qemu_alive(pid: int) -> bool:
    """Our QEMU still runs as *pid* (not merely some process that reused the number)."""
    if pid <= 0:
        return False
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def node_up(state: dict | None, name: str) -> bool:
    return bool(state) and qemu_alive(state["nodes"].get(name, {}).get("pid", -1))


def any_up(state: dict | None) -> bool:
    return bool(state) and any(qemu_alive(n["pid"]) for n in state["nodes"].values())


def booted_record(paths: FleetPaths, site_name: str) -> SiteRecord:
    """The record of the build the running site was booted from."""
    if not any_up(read_state(paths)):
        raise SohoError(f"site {site_name} is not up (sohocloud fleet up {site_name})")
    return read_record(paths.booted, f"site {site_name} was not booted by this sohocloud: "
                                     f"sohocloud fleet down {site_name}, then fleet up")


def keep_booted_record(paths: FleetPaths) -> None:
    """A copy of the site record as `fleet up` found it: what runs, whatever `fleet build` does next."""
    tmp = paths.booted.with_name("." + paths.booted.name + ".tmp")
    shutil.copyfile(record_path(paths.out, paths.site), tmp)
    os.replace(tmp, paths.booted)


# --------------------------------------------------------------------------- down, ssh


def fleet_down(paths: FleetPaths, site_name: str, only: tuple[str, ...] = ()) -> list[str]:
    """Stop every node of the site (or *only* these) and remove its namespace once no node is
    left (disks stay)."""
    state = read_state(paths) or {"netns": f"sc-{site_name}", "nodes": {}}
    if paths.booted.is_file():
        record = read_record(paths.booted, "fleet down without --only stops every node")
        for name in only:
            record.site.node(name)  # a typo fails here
    stopped = []
    for name, n in list(state["nodes"].items()):
        if only and name not in only:
            continue
        if stop_qemu(n["pid"]):
            stopped.append(name)
        del state["nodes"][name]
    if only and any_up(state):
        write_state(paths, state)
        return stopped
    stop_wan_dhcp(paths)
    subprocess.run(["ip", "netns", "del", state["netns"]], capture_output=True)
    paths.state.unlink(missing_ok=True)
    paths.booted.unlink(missing_ok=True)
    return stopped


def stop_wan_dhcp(paths: FleetPaths) -> None:
    """The WAN side's DHCP server (it would keep the namespace alive)."""
    try:
        pid = int(paths.wan_dhcpd_pid.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, IndexError):
        pass  # not running
    paths.wan_dhcpd_pid.unlink(missing_ok=True)


def stop_qemu(pid: int) -> bool:
    """SIGTERM our QEMU (its process group), SIGKILL after 10 s. False: it was not running."""
    if not qemu_alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if not qemu_alive(pid):
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it exited between the check and the signal
    return True


def fleet_ssh_argv(paths: FleetPaths, site_name: str, node_name: str, command: list[str],
                   identity: str | None) -> list[str]:
    record = booted_record(paths, site_name)
    node = record.site.node(node_name)
    state = read_state(paths)
    if not node_up(state, node_name):
        raise SohoError(f"node {node_name} of site {site_name} is not up (sohocloud fleet up {site_name})")
    argv = ["ip", "netns", "exec", state["netns"], "ssh", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={paths.known_hosts}", "-o", "LogLevel=ERROR"]
    if identity:
        argv += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    return argv + [f"admin@{node.address}", *command]


def check_root() -> None:
    if os.geteuid() != 0:
        raise SohoError("fleet up/down need root (network namespaces and tap devices)")
    run(["ip", "netns", "list"])
