"""`sohocloud fleet up`: boot a site's nodes, as `fleet build` recorded them, on a private virtual LAN.

The LAN is a bridge inside the site's own network namespace (never the host's); every node gets
a tap on it with the MAC from the site file, the router's WAN is QEMU user-net (restricted:
nothing leaves the host). The router boots first, the others in parallel once it answers. Node
disks are overlays kept in out/<site>/run/, so `down` then `up` is a reboot, not a reinstall.
A netboot node (target pxe) has no disk at all: its VM boots the NIC from the router's PXE
volume (out/<site>/pxe.img, attached to the router), fresh every time. What each node boots,
and how, comes from the site record and the images' manifests, never from profiles again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Aborted, SohoError
from ..machine.console import console_report
from ..machine.probe import probe_in_netns, wait_ssh_banner
from ..machine.qemu import VM, Nic, image_info, once_more_after_hiccup
from ..proc import run
from .netlab import Netns
from .record import NodeRecord, SiteRecord, record_path
from .running import (WAN_BRIDGE, WAN_GATEWAY, WAN_PREFIX, WAN_SEAT, FleetPaths, any_up, keep_booted_record,
                      netns_name, node_up, read_state, seat_address, stop_wan_dhcp, wan_mac, write_state)
from .sitefile import Site, SiteNode

log = logging.getLogger("sohocloud.fleet")

# Seconds from power-on to SSH before a node counts as failed (a panic or a QEMU exit fails
# at once: this only catches a boot that hangs). Under TCG on 2 cores with five nodes booting
# at once, measured: a diskless PC 96-146 s, the NAS (arm64, emulated) 101 s; on the slower
# hosts of 2026-12-02 (CI's runs and this machine's) a diskless PC 240-290 s, the NAS 600-930 s.
BOOT_TIMEOUT = float(os.environ.get("SOHOCLOUD_BOOT_TIMEOUT", "1200"))


def fleet_up(record: SiteRecord, site_file: Path, out: Path, *, memory: int = 1024, reimage: tuple[str, ...] = (),
             only: tuple[str, ...] = ()) -> dict[str, float]:
    """Boot the site's nodes (all, or *only* these); returns seconds to SSH per node.

    *reimage*: these nodes start from a fresh root disk (their data disks stay)."""
    site, paths = record.site, FleetPaths(out, record.site.name)
    for name in reimage + only:
        site.node(name)  # a typo fails here
    nodes = [n for n in site.nodes if not only or n.name in only]
    state = read_state(paths)
    joining = check_can_boot(record, paths, state, only)
    record.check_current(out, site_file, [n.name for n in nodes])
    paths.run.mkdir(parents=True, exist_ok=True, mode=0o700)
    lan, state = open_lan(site, paths, state if joining else None)
    boot = SiteBoot(record, out, paths, lan, state, reimage=reimage, memory=memory)
    try:
        for node in nodes:
            boot.prepare(node)
        if not joining:
            keep_booted_record(paths)
        boot.gateway_first_then_the_rest(nodes)
        if {name for name in state["nodes"] if node_up(state, name)} >= {n.name for n in site.nodes}:
            wait_settled(site, paths, BOOT_TIMEOUT * 2)
        else:
            log.info("fleet %s: not every node is up: not waiting for the cluster join", site.name)
        return boot.times
    except BaseException:
        boot.stop_all()
        if joining:
            for name in boot.vms:
                state["nodes"].pop(name, None)
            write_state(paths, state)
        else:
            stop_wan_dhcp(paths)
            lan.delete()
            paths.state.unlink(missing_ok=True)
            paths.booted.unlink(missing_ok=True)
        raise


def check_can_boot(record: SiteRecord, paths: FleetPaths, state: dict | None, only: tuple[str, ...]) -> bool:
    """Whether these nodes join a site that is up (`--only`, the same build) or start it."""
    site = record.site
    if not any_up(state):
        return False
    if not only:
        raise SohoError(f"site {site.name} is already up (sohocloud fleet down {site.name})")
    for name in only:
        if node_up(state, name):
            raise SohoError(f"node {name} of site {site.name} is already up")
    if not paths.booted.is_file() or paths.booted.read_bytes() != record_path(paths.out, site.name).read_bytes():
        raise SohoError(f"site {site.name} is up with another build than the one `fleet build` recorded since: "
                        f"sohocloud fleet down {site.name}, then fleet up")
    return True


def open_lan(site: Site, paths: FleetPaths, state: dict | None) -> tuple[Netns, dict]:
    """The site's LAN namespace: the running one (*state*), or a new one with the host's seat on it."""
    ns = Netns(netns_name(site))
    if state is not None:  # more nodes on the LAN that is already up (e.g. the manager after its workers)
        return ns, state
    stop_wan_dhcp(paths)  # a stale one from a crash
    subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
    ns.create()
    ns.ip("addr", "add", seat_address(site), "dev", ns.bridge)
    open_wan(ns, paths)
    return ns, {"netns": ns.name, "nodes": {}}


# busybox udhcpd: the gateway's WAN address, its only lease (no router option: there is no internet).
WAN_DHCPD_CONF = """interface {bridge}
start {address}
end {address}
max_leases 1
option subnet 255.255.255.0
lease_file {leases}
pidfile {pidfile}
"""


def open_wan(ns: Netns, paths: FleetPaths) -> None:
    """The gateway's WAN side: a bridge with the host's seat on it serving the WAN address by DHCP."""
    ns.add_bridge(WAN_BRIDGE)
    ns.ip("addr", "add", f"{WAN_SEAT}/{WAN_PREFIX}", "dev", WAN_BRIDGE)
    conf = paths.run / "wan-dhcpd.conf"
    leases = paths.run / "wan-dhcpd.leases"
    leases.write_bytes(b"")
    conf.write_text(WAN_DHCPD_CONF.format(bridge=WAN_BRIDGE, address=WAN_GATEWAY, leases=leases,
                                          pidfile=paths.wan_dhcpd_pid))
    ns.exec(["busybox", "udhcpd", "-S", str(conf)])  # it daemonises; fleet down stops it by its pidfile


@dataclass
class SiteBoot:
    """The VMs of one `fleet up`: made ready one by one, then powered on (the gateway first), each
    waited for until it answers SSH."""

    record: SiteRecord
    out: Path
    paths: FleetPaths
    lan: Netns
    state: dict
    reimage: tuple[str, ...] = ()
    memory: int = 1024
    vms: dict[str, VM] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one writer of the state file at a time
    abort: threading.Event = field(default_factory=threading.Event)  # one boot failed: the others stop waiting

    @property
    def site(self) -> Site:
        return self.record.site

    # ------------------------------------------------------------------ ready

    def prepare(self, node: SiteNode) -> None:
        rec = self.record.node(node.name)
        image = rec.image.resolve(self.out)
        manifest = image_info(image)
        nics = node_nics(manifest["interfaces"], node, gateway=node.name == self.site.gateway)
        for nic in nics:
            if nic.kind == "tap":
                subprocess.run(["ip", "-n", self.lan.name, "link", "del", nic.ifname], capture_output=True)
                self.lan.add_tap(nic.ifname, WAN_BRIDGE if nic.ifname.startswith("w-") else None)
        workdir = self.paths.run / f"{node.name}.vm"
        workdir.mkdir(exist_ok=True)
        if rec.netboot:
            # A diskless PC: nothing kept between boots (its RAM holds the squashfs and every write).
            self.forget_host_key(node)
            self.vms[node.name] = VM(image, nics, firmware=node.firmware, netns=self.lan.name,
                                     memory=max(self.memory, netboot_memory(manifest)),
                                     serial_log=self.paths.console(node.name), workdir=workdir,
                                     monitor=self.paths.monitor(node.name))
            return
        extra = data_disks(self.paths, node, manifest)
        if rec.name == self.record.pxe_server and self.record.pxe_volume is not None:
            extra += (pxe_volume_overlay(self.paths, node, self.record.pxe_volume.resolve(self.out)),)
        disk = self.root_disk(node, rec, manifest)
        self.vms[node.name] = VM(image, nics, seed=rec.seed.resolve(self.out), netns=self.lan.name,
                                 memory=self.memory, serial_log=self.paths.console(node.name), disk=disk,
                                 extra_disks=extra, workdir=workdir, monitor=self.paths.monitor(node.name))

    def root_disk(self, node: SiteNode, rec: NodeRecord, manifest: dict) -> Path:
        """The node's root disk, kept across down/up. A rebuilt image is a re-install: the overlay
        is only valid on the very bytes it was made on, so it is stamped with the image's sha256."""
        disk = self.paths.run / f"{node.name}.qcow2"
        built = rec.image.sha256
        if "seed_partition" in manifest:
            # A card carries its seed on its boot partition (written when the disk is made, as
            # `flash --seed` does): a new seed is a freshly written card (data disks stay).
            built += " seed " + rec.seed.sha256
        stamp = self.paths.run / f"{node.name}.image"
        if disk.exists() and (node.name in self.reimage or not stamp.is_file() or stamp.read_text() != built):
            log.info("fleet %s: %s was re-imaged: fresh root disk", self.site.name, node.name)
            disk.unlink()
        if not disk.exists():  # a first boot: the node will make new host keys
            self.forget_host_key(node)
        stamp.write_text(built)
        return disk

    def forget_host_key(self, node: SiteNode) -> None:
        subprocess.run(["ssh-keygen", "-R", node.address, "-f", str(self.paths.known_hosts)], capture_output=True)

    # ------------------------------------------------------------------ boot

    def gateway_first_then_the_rest(self, nodes: list[SiteNode]) -> None:
        """The gateway first: DHCP, DNS and the way out for everyone else."""
        if self.site.gateway in self.vms:
            self.boot(self.site.node(self.site.gateway))
        boot_in_parallel(self.boot, [n for n in nodes if n.name != self.site.gateway], self.abort)

    def boot(self, node: SiteNode) -> None:
        vm = self.vms[node.name]
        if self.record.node(node.name).netboot:
            # Power a diskless PC on only once its PXE server answers (a PC whose PXE fails
            # sits at "no bootable device"; a real one would be switched on later too).
            server = self.site.node(self.record.pxe_server)
            wait_http(f"http://{server.address}/boot.ipxe", self.lan.name, BOOT_TIMEOUT, abort=self.abort)
            if self.abort.is_set():
                return
        self.power_on(node)
        # A node the hypervisor starved is powered on once more; its disk stays, as after a
        # power cut (firstboot picks up where it was).
        self.times[node.name] = once_more_after_hiccup(
            vm, lambda: self.wait_ssh(node), start=lambda: self.power_on(node),
            warn=lambda msg: log.warning("fleet %s: %s", self.site.name, msg))
        log.info("fleet %s: %s (%s) answers SSH after %.1f s", self.site.name, node.name, node.role,
                 self.times[node.name])

    def power_on(self, node: SiteNode) -> None:
        vm = self.vms[node.name]
        vm.start()
        with self.lock:  # boots run in threads
            self.state["nodes"][node.name] = {"pid": vm.proc.pid, "address": node.address}
            write_state(self.paths, self.state)

    def wait_ssh(self, node: SiteNode) -> float:
        vm = self.vms[node.name]
        try:  # a panicked kernel ends the wait at once
            return wait_ssh_banner(node.address, 22, BOOT_TIMEOUT, netns=self.lan.name,
                                   alive=lambda: vm.alive() and not vm.panicked() and not self.abort.is_set())
        except SohoError as exc:
            if self.abort.is_set():
                raise Aborted(f"node {node.name}: not waited for (another node failed)") from None
            why = "its kernel panicked" if vm.panicked() else str(exc)
            raise SohoError(f"node {node.name} ({node.role}): {why}; {vm.console_report()}") from None

    def stop_all(self) -> None:
        for vm in self.vms.values():
            vm.stop()


# --------------------------------------------------------------------------- a node's VM


def node_nics(interfaces: list[str], node: SiteNode, *, gateway: bool = False) -> list[Nic]:
    """The node's NICs in its role's order: the LAN on the site's bridge (site MAC); the gateway's
    WAN on the WAN side's bridge; anything else user-net (restricted: no way out)."""
    def nic(name: str) -> Nic:
        if name == "lan":
            return Nic("tap", ifname=f"t-{node.name}"[:15], mac=node.mac)
        if gateway and name == "wan":
            return Nic("tap", ifname=f"w-{node.name}"[:15], mac=wan_mac(node))
        return Nic("user")
    return [nic(name) for name in interfaces]


def data_disks(paths: FleetPaths, node: SiteNode, manifest: dict) -> tuple[tuple[Path, str], ...]:
    """The node's data drives (the role's `disks`), created blank once and kept across re-images."""
    out = []
    for d in manifest.get("disks", []):
        path = paths.run / f"{node.name}-{d['name']}.qcow2"
        if not path.exists():
            run(["qemu-img", "create", "-q", "-f", "qcow2", path, d["size"]])
        out.append((path, d["serial"]))
    return tuple(out)


def netboot_memory(manifest: dict) -> int:
    """MiB a diskless node needs: its squashfs lives in RAM, plus room to run and to write."""
    return (manifest["sizes"]["squashfs_bytes"] >> 20) + 1536


def pxe_volume_overlay(paths: FleetPaths, node: SiteNode, volume: Path) -> tuple[Path, str]:
    """The PXE server's copy of the site's PXE volume: a fresh overlay on each `fleet up` (what
    a test changes on it is gone at the next one; a new `fleet build` is served as built)."""
    overlay = paths.run / f"{node.name}-pxe.qcow2"
    overlay.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", volume.resolve(), overlay])
    return overlay, "sohocloud-pxe"


_HTTP_PROBE = """
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2).read(16)
    print("ok")
except Exception:
    pass
"""


def wait_http(url: str, netns: str, timeout: float, *, abort: threading.Event | None = None) -> None:
    """Until *url* answers 200 from inside *netns* (or *abort* is set)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (abort and abort.is_set()):
        if probe_in_netns(netns, _HTTP_PROBE, url, timeout=30).strip() == "ok":
            return
        time.sleep(1)
    if abort and abort.is_set():
        return
    raise SohoError(f"{url} did not answer within {timeout:.0f} s (is the PXE server up, its volume attached?)")


def boot_in_parallel(boot: Callable[[SiteNode], None], nodes: list[SiteNode], abort: threading.Event) -> None:
    """boot() every node at once. The first failure sets *abort* (boot() then stops waiting
    and raises Aborted) and is the one raised once every boot has returned."""
    def boot_or_abort(node: SiteNode) -> None:
        try:
            boot(node)
        except BaseException:
            abort.set()
            raise

    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        futures = [pool.submit(boot_or_abort, n) for n in nodes]
        try:
            wait(futures)
        except BaseException:  # Ctrl-C, SIGTERM: leaving the pool waits for every boot, make them quick
            abort.set()
            raise
    failures = [f.exception() for f in futures if f.exception() is not None]
    if failures:  # the node that failed, not one that stopped waiting because of it
        raise next((e for e in failures if not isinstance(e, Aborted)), failures[0])


# firstboot's online phase says one of these on the console when a node is settled.
SETTLED = ("sohocloud-firstboot: done (online phase)", "(both phases)")


def console_says_settled(console_text: str) -> bool:
    """Whether a node's console shows its first boot complete (online phase done)."""
    return any(marker in console_text for marker in SETTLED)


def console_text(paths: FleetPaths, name: str) -> str:
    console = paths.console(name)
    return console.read_text(errors="replace") if console.exists() else ""


def wait_settled(site: Site, paths: FleetPaths, timeout: float) -> None:
    """Until every node finished its online phase (joined the cluster, ...), read from the consoles."""
    deadline = time.monotonic() + timeout
    pending = {n.name for n in site.nodes}
    while pending:
        for name in sorted(pending):
            if console_says_settled(console_text(paths, name)):
                log.info("fleet %s: %s settled (first boot complete)", site.name, name)
                pending.discard(name)
        if pending and time.monotonic() > deadline:
            reports = "".join(f"\n{name}: " + console_report(console_text(paths, name), paths.console(name))
                              for name in sorted(pending))
            raise SohoError(f"fleet {site.name}: {', '.join(sorted(pending))} did not finish first boot within "
                            f"{timeout:.0f} s{reports}")
        if pending:
            time.sleep(2)
