"""`sohocloud fleet up|ssh|down`: boot a site's nodes on a private virtual LAN.

The LAN is a bridge inside the site's own network namespace (never the
host's); every node gets a tap on it with the MAC from the site file, the
router's WAN is QEMU user-net (restricted: nothing leaves the host). The
router boots first, the others in parallel once it answers. Node disks are
overlays kept in out/<site>/run/, so `down` then `up` is a reboot, not a reinstall.
A netboot node (target pxe) has no disk at all: its VM boots the NIC from the
router's PXE volume (out/<site>/pxe.img, attached to the router), fresh every time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .errors import Aborted, SohoError
from .netlab import Netns, probe_in_netns
from .fleet_pxe import pxe_volume_path
from .pipeline import artefact_path
from .s6_manifest import recorded_sha256
from .cache import sha256_file
from .proc import run
from .s1_resolve import Repo, resolve
from .site import Site, SiteNode
from .vm import VM, Nic, console_report, image_info, once_more_after_hiccup, wait_ssh_banner

log = logging.getLogger("sohocloud.fleet")

# Seconds from power-on to SSH before a node counts as failed (a panic or a QEMU exit fails
# at once: this only catches a boot that hangs). Under TCG on 2 cores with five nodes booting
# at once, measured: a diskless PC 96-146 s, the NAS (arm64, emulated) 101 s; on the slower
# hosts of 2026-12-02 (CI's runs and this machine's) a diskless PC 240-290 s, the NAS 600-930 s.
BOOT_TIMEOUT = float(os.environ.get("SOHOCLOUD_BOOT_TIMEOUT", "1200"))


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

    def seed(self, node: str) -> Path:
        return self.out / self.site / "seeds" / f"{node}.img"


def netns_name(site: Site) -> str:
    return f"sc-{site.name}"


def seat_address(site: Site) -> str:
    """The host's own address on the site LAN (inside the namespace): the last host address."""
    net = site.network
    return f"{net.broadcast_address - 1}/{net.prefixlen}"


# Ports of the gateway's WAN address that `fleet test` probes from the WAN side:
# QEMU user-net forwards 127.0.0.1:<20000+port> inside the site's namespace to them.
WAN_PROBE_PORTS = (22, 53, 80, 443, 636, 7443, 9090, 9100)


def wan_probe_port(port: int) -> int:
    return 20000 + port


def node_nics(interfaces: list[str], node: SiteNode, *, wan_probe: bool = False) -> list[Nic]:
    """The node's NICs in its role's order: the LAN on the bridge (site MAC), anything else user-net."""
    tap = f"t-{node.name}"[:15]
    fwd = tuple(f"tcp:127.0.0.1:{wan_probe_port(p)}-:{p}" for p in WAN_PROBE_PORTS) if wan_probe else ()
    return [Nic("tap", ifname=tap, mac=node.mac) if name == "lan" else Nic("user", hostfwd=fwd)
            for name in interfaces]


def _read_state(paths: FleetPaths) -> dict | None:
    return json.loads(paths.state.read_text()) if paths.state.is_file() else None


def _alive(pid: int) -> bool:
    """Our QEMU still runs as *pid* (not merely some process that reused the number)."""
    if pid <= 0:
        return False
    try:
        return b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def data_disks(paths: FleetPaths, node: SiteNode, manifest: dict) -> tuple[tuple[Path, str], ...]:
    """The node's data drives (the role's `disks`), created blank once and kept across re-images."""
    out = []
    for d in manifest.get("disks", []):
        path = paths.run / f"{node.name}-{d['name']}.qcow2"
        if not path.exists():
            run(["qemu-img", "create", "-q", "-f", "qcow2", path, d["size"]])
        out.append((path, d["serial"]))
    return tuple(out)


def pxe_server(site: Site, repo: Repo) -> SiteNode:
    """The node that provides pxe (the router, through profiles/pxe-server.yaml)."""
    from .fleet import find_providers
    from .s1_resolve import load_profile

    providers = find_providers(site, {r: load_profile(repo, r) for r in {n.role for n in site.nodes}})
    if "pxe" not in providers:
        raise SohoError(f"site {site.name}: netboot nodes but no node provides pxe")
    return providers["pxe"]


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


def fleet_up(site: Site, repo: Repo, out: Path, *, memory: int = 1024, reimage: tuple[str, ...] = (),
             only: tuple[str, ...] = ()) -> dict[str, float]:
    """Boot the site's nodes (all, or *only* these); returns seconds to SSH per node.

    *reimage*: these nodes start from a fresh root disk (their data disks stay).
    Needs `fleet build` first."""
    paths = FleetPaths(out, site.name)
    for name in reimage + only:
        site.node(name)  # a typo fails here
    old = _read_state(paths)
    running = bool(old and any(_alive(n["pid"]) for n in old["nodes"].values()))
    if running and not only:
        raise SohoError(f"site {site.name} is already up (sohocloud fleet down {site.name})")
    for name in only:
        if running and _alive(old["nodes"].get(name, {}).get("pid", -1)):
            raise SohoError(f"node {name} of site {site.name} is already up")
    nodes = [n for n in site.nodes if not only or n.name in only]
    images, cfgs = {}, {}
    for node in nodes:
        cfgs[node.name] = resolve(repo, node.role, target=node.target, arch=node.arch)
        image = artefact_path(cfgs[node.name], out)
        if not image.exists() or not paths.seed(node.name).is_file():
            raise SohoError(f"node {node.name}: no image or seed in {out} (run: sohocloud fleet build {site.name})")
        images[node.name] = image
    volume = pxe_volume_path(out, site)
    if any(c.target.netboot for c in cfgs.values()) and not volume.is_file():
        raise SohoError(f"site {site.name}: no PXE volume {volume} for its netboot nodes "
                        f"(run: sohocloud fleet build {site.name})")
    paths.run.mkdir(parents=True, exist_ok=True, mode=0o700)
    ns = Netns(netns_name(site))
    if running:
        # More nodes on the LAN that is already up (e.g. the manager after its workers).
        state = old
    else:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)  # a stale one from a crash
        ns.create()
        ns.ip("addr", "add", seat_address(site), "dev", ns.bridge)
        state = {"netns": ns.name, "nodes": {}}
    vms: dict[str, VM] = {}
    try:
        for node in nodes:
            manifest = image_info(images[node.name])
            interfaces = manifest["interfaces"]
            nics = node_nics(interfaces, node, wan_probe=node.name == site.gateway)
            for nic in nics:
                if nic.kind == "tap":
                    subprocess.run(["ip", "-n", ns.name, "link", "del", nic.ifname], capture_output=True)
                    ns.add_tap(nic.ifname)
            if cfgs[node.name].target.netboot:
                # A diskless PC: nothing kept between boots (its RAM holds the squashfs and every write).
                subprocess.run(["ssh-keygen", "-R", node.address, "-f", str(paths.run / "known_hosts")],
                               capture_output=True)
                vms[node.name] = VM(images[node.name], nics, firmware=node.firmware, netns=ns.name,
                                    memory=max(memory, netboot_memory(manifest)),
                                    serial_log=paths.run / f"{node.name}.console.log",
                                    workdir=paths.run / f"{node.name}.vm")
                vms[node.name].workdir.mkdir(exist_ok=True)
                continue
            extra = data_disks(paths, node, manifest)
            if "pxe" in cfgs[node.name].profile.provides and volume.is_file():
                extra += (pxe_volume_overlay(paths, node, volume),)
            disk = paths.run / f"{node.name}.qcow2"
            # A node keeps its disk across down/up; a rebuilt image is a re-install.
            # The overlay is only valid on the very bytes it was made on (builds are not
            # byte-reproducible yet): stamp it with the image's sha256.
            built = recorded_sha256(out, images[node.name]) or ""
            if "seed_partition" in manifest:
                # A card carries its seed on its boot partition (written when the disk is made,
                # as `flash --seed` does): a new seed is a freshly written card (data disks stay).
                built += " seed " + sha256_file(paths.seed(node.name))
            stamp = paths.run / f"{node.name}.image"
            if disk.exists() and (node.name in reimage or not stamp.is_file() or stamp.read_text() != built):
                log.info("fleet %s: %s was re-imaged: fresh root disk", site.name, node.name)
                disk.unlink()
            if not disk.exists():  # a first boot: the node will make new host keys
                subprocess.run(["ssh-keygen", "-R", node.address, "-f", str(paths.run / "known_hosts")],
                               capture_output=True)
            stamp.write_text(built)
            vms[node.name] = VM(images[node.name], nics, seed=paths.seed(node.name), netns=ns.name, memory=memory,
                                serial_log=paths.run / f"{node.name}.console.log", disk=disk,
                                extra_disks=extra, workdir=paths.run / f"{node.name}.vm")
            vms[node.name].workdir.mkdir(exist_ok=True)
        times: dict[str, float] = {}

        lock = threading.Lock()
        abort = threading.Event()  # set when one boot failed or we were interrupted: the others stop waiting

        def boot(node: SiteNode) -> None:
            vm = vms[node.name]
            if cfgs[node.name].target.netboot:
                # Power a diskless PC on only once its PXE server answers (a PC whose PXE fails
                # sits at "no bootable device"; a real one would be switched on later too).
                wait_http(f"http://{pxe_server(site, repo).address}/boot.ipxe", ns.name, BOOT_TIMEOUT, abort=abort)
                if abort.is_set():
                    return

            def power_on() -> None:
                vm.start()
                with lock:  # boots run in threads; one writer of the state file at a time
                    state["nodes"][node.name] = {"pid": vm.proc.pid, "address": node.address}
                    _write_state(paths, state)

            def wait_ssh() -> float:
                try:  # a panicked kernel ends the wait at once
                    return wait_ssh_banner(node.address, 22, BOOT_TIMEOUT, netns=ns.name,
                                           alive=lambda: vm.alive() and not vm.panicked() and not abort.is_set())
                except SohoError as exc:
                    if abort.is_set():
                        raise Aborted(f"node {node.name}: not waited for (another node failed)") from None
                    why = "its kernel panicked" if vm.panicked() else str(exc)
                    raise SohoError(f"node {node.name} ({node.role}): {why}; {vm.console_report()}") from None

            power_on()
            # A node the hypervisor starved is powered on once more; its disk stays, as after a
            # power cut (firstboot picks up where it was).
            times[node.name] = once_more_after_hiccup(
                vm, wait_ssh, start=power_on, warn=lambda msg: log.warning("fleet %s: %s", site.name, msg))
            log.info("fleet %s: %s (%s) answers SSH after %.1f s", site.name, node.name, node.role,
                     times[node.name])

        # The gateway first: DHCP, DNS and the way out for everyone else.
        if site.gateway in vms:
            boot(site.node(site.gateway))
        boot_in_parallel(boot, [n for n in nodes if n.name != site.gateway], abort)
        running = {name for name, n in state["nodes"].items() if _alive(n["pid"])}
        if running >= {n.name for n in site.nodes}:
            wait_settled(site, paths, BOOT_TIMEOUT * 2)
        else:
            log.info("fleet %s: not every node is up (%s missing): not waiting for the cluster join",
                     site.name, ", ".join(sorted({n.name for n in site.nodes} - running)))
        return times
    except BaseException:
        for vm in vms.values():
            vm.stop()
        if running:
            for name in vms:
                state["nodes"].pop(name, None)
            _write_state(paths, state)
        else:
            ns.delete()
            paths.state.unlink(missing_ok=True)
        raise


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


def _console_text(paths: FleetPaths, name: str) -> str:
    console = paths.run / f"{name}.console.log"
    return console.read_text(errors="replace") if console.exists() else ""


def wait_settled(site: Site, paths: FleetPaths, timeout: float) -> None:
    """Until every node finished its online phase (joined the cluster, ...), read from the consoles."""
    deadline = time.monotonic() + timeout
    pending = {n.name for n in site.nodes}
    while pending:
        for name in sorted(pending):
            if console_says_settled(_console_text(paths, name)):
                log.info("fleet %s: %s settled (first boot complete)", site.name, name)
                pending.discard(name)
        if pending and time.monotonic() > deadline:
            reports = "".join(f"\n{name}: " + console_report(_console_text(paths, name), paths.run / f"{name}.console.log")
                              for name in sorted(pending))
            raise SohoError(f"fleet {site.name}: {', '.join(sorted(pending))} did not finish first boot within "
                            f"{timeout:.0f} s{reports}")
        if pending:
            time.sleep(2)


def _write_state(paths: FleetPaths, state: dict) -> None:
    tmp = paths.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, paths.state)


def fleet_down(site: Site, out: Path, only: tuple[str, ...] = ()) -> list[str]:
    """Stop every node of the site (or *only* these) and remove its namespace
    once no node is left (disks stay)."""
    paths = FleetPaths(out, site.name)
    for name in only:
        site.node(name)
    state = _read_state(paths) or {"netns": netns_name(site), "nodes": {}}
    stopped = []
    for name, n in list(state["nodes"].items()):
        if only and name not in only:
            continue
        pid = n["pid"]
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
                for _ in range(100):
                    if not _alive(pid):
                        break
                    time.sleep(0.1)
                else:
                    os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it exited between the check and the signal
            stopped.append(name)
        del state["nodes"][name]
    if only and any(_alive(n["pid"]) for n in state["nodes"].values()):
        _write_state(paths, state)
        return stopped
    subprocess.run(["ip", "netns", "del", state["netns"]], capture_output=True)
    paths.state.unlink(missing_ok=True)
    return stopped


def fleet_ssh_argv(site: Site, out: Path, node_name: str, command: list[str], identity: str | None) -> list[str]:
    paths = FleetPaths(out, site.name)
    state = _read_state(paths)
    node = site.node(node_name)
    if not state or not _alive(state["nodes"].get(node_name, {}).get("pid", -1)):
        raise SohoError(f"node {node_name} of site {site.name} is not up (sohocloud fleet up {site.name})")
    argv = ["ip", "netns", "exec", state["netns"], "ssh", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={paths.run / 'known_hosts'}", "-o", "LogLevel=ERROR"]
    if identity:
        argv += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    return argv + [f"admin@{node.address}", *command]


def check_root() -> None:
    if os.geteuid() != 0:
        raise SohoError("fleet up/down need root (network namespaces and tap devices)")
    run(["ip", "netns", "list"])
