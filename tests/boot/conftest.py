"""Tier 2 fixtures: build the router image once, boot two routers in parallel.

- router A: direct kernel boot, LAN on a tap in a private network namespace
  (bridge + a DHCP client namespace), WAN on QEMU user-net (restricted).
- router B: UEFI boot (OVMF + systemd-boot) the way `sohocloud boot` does it:
  LAN and WAN on restricted user-net, SSH forwarded from 127.0.0.1; its seed
  carries WireGuard keys.
Both use the same image with different seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import subprocess
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import testinfra

from builder.fleet.netlab import Netns, unique_name
from builder.image.s1_resolve import Repo, resolve
from builder.fleet.secrets import wireguard_keypair
from builder.seed import render_seed, write_cidata
from builder.machine.probe import wait_ssh_banner
from builder.machine.qemu import Nic, VM, once_more_after_hiccup

from bootkit import ARTIFACTS, BOOT_TIMEOUT, REPO, build_image, free_port  # tests/boot is on sys.path

pytestmark = pytest.mark.boot


def pytest_configure(config):
    """SIGTERM (CI's time limit, a `kill`) unwinds like Ctrl-C, so pytest tears the fixtures
    down (VMs stopped, namespaces removed) instead of dying with a fleet still running."""
    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one does not cut the cleanup
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)


class CliBoot:
    """`sohocloud boot` run as a user would, console captured to a file."""

    def __init__(self, argv: list[str], console_log: Path):
        self.console_log = console_log
        self.log = open(console_log, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def console(self) -> str:
        return self.console_log.read_text(errors="replace")


@dataclass
class Node:
    name: str  # ssh_config host alias
    hostname: str
    vm: VM | CliBoot
    ssh_config: Path
    known_hosts: Path
    boot_seconds: float = 0.0
    wan_ssh: tuple[str, int] | None = None  # (netns or "", port) forwarded to the WAN side
    extra: dict = field(default_factory=dict)

    def ssh_argv(self, *args: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), *args, self.name]

    def run(self, cmd: str, *, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.ssh_argv() + [cmd], input=input, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{self.name}: `{cmd}` exited {r.returncode}: {r.stderr.strip()}")
        return r

    def host(self):
        """testinfra over SSH as admin, commands through sudo (no D-Bus for systemctl otherwise)."""
        return testinfra.get_host(f"ssh://{self.name}", ssh_config=str(self.ssh_config), sudo=True)


def ssh_config_entry(alias: str, key: Path, known_hosts: Path, *, hostname: str, port: int = 22,
                     proxy: str | None = None) -> str:
    lines = [f"Host {alias}", f"  HostName {hostname}", f"  Port {port}", "  User admin",
             f"  IdentityFile {key}", "  IdentitiesOnly yes", "  StrictHostKeyChecking accept-new",
             f"  UserKnownHostsFile {known_hosts}", "  LogLevel ERROR", "  ConnectTimeout 20",
             "  ControlMaster auto", "  ControlPath /tmp/sohocloud-t2-%C", "  ControlPersist 300",
             "  BatchMode yes"]
    if proxy:
        lines.append(f"  ProxyCommand {proxy}")
    return "\n".join(lines) + "\n"


# The router checks run once per arch, one code path. Router A (tap LAN, the full check set)
# and router B (`sohocloud boot --firmware uefi`, WireGuard) are, per arch, these builds:
# on arm64, A is the Raspberry Pi 4 card image booted on QEMU's virt machine with its
# seed as files on the card's boot partition, B the arm64 qemu image through AAVMF.
ROUTER_BUILDS = {
    "amd64": {"a": ("qemu", "amd64"), "b": ("qemu", "amd64")},
    "arm64": {"a": ("rpi4", "arm64"), "b": ("qemu", "arm64")},
}
CARD_SIZE = "2G"  # router A's disk: larger than any image, like a card larger than the image on it
ARCHES = [a for a in os.environ.get("SOHOCLOUD_TEST_ARCHES", "amd64 arm64").split() if a in ROUTER_BUILDS]
# Router B per arch: `make test` boots amd64's; the arm64 qemu image through AAVMF is `make test-all`'s
# (make test's arm64 router is A, the Pi 4 card's root on virt, with the full check set).
B_ARCHES = os.environ.get("SOHOCLOUD_ROUTER_B_ARCHES", "amd64").split()


@pytest.fixture(scope="session")
def router_image() -> Path:
    """The amd64 qemu router: the image the build, fleet-LAN and firstboot-robustness tests use."""
    return build_image("router")


@pytest.fixture(scope="session", params=ARCHES)
def router_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def router_cfg(router_arch):
    target, arch = ROUTER_BUILDS[router_arch]["a"]
    return resolve(Repo(REPO), "router", target=target, arch=arch)


@pytest.fixture(scope="session")
def router_images(router_arch) -> dict[str, Path]:
    return {k: build_image("router", t, a) for k, (t, a) in ROUTER_BUILDS[router_arch].items()
            if k == "a" or router_arch in B_ARCHES}


@pytest.fixture(scope="session")
def test_key(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sohocloud-test", "-f", d / "id"],
                   check=True)
    return d / "id"


@pytest.fixture(scope="session")
def lan(router_images) -> Iterator[Netns]:
    ns = Netns(unique_name("sct2-")).create()
    try:
        ns.add_tap("tap-rt")
        ns.add_address("10.44.0.250/24")  # the test's own seat on the LAN
        yield ns
    finally:
        ns.delete()


@pytest.fixture(scope="session")
def routers(router_arch, router_images, test_key, lan, tmp_path_factory) -> Iterator[dict[str, Node]]:
    work = tmp_path_factory.mktemp(f"routers-{router_arch}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pub = test_key.with_suffix(".pub").read_text().strip()
    wg_priv, wg_pub = wireguard_keypair()
    _peer_priv, peer_pub = wireguard_keypair()
    # A carries the site's hosts: a DHCP reservation and DNS name for "nas".
    seed_a = write_cidata(render_seed("rt-alpha", [pub], sohocloud={"router": {"hosts": [
        {"name": "nas", "mac": "52:54:00:c1:00:02", "address": "10.44.0.20"},
        {"name": "rt-alpha", "mac": "52:54:00:5c:00:02", "address": "10.44.0.1"}]}}), work / "seed-a.img")
    # B also moves its LAN to another subnet: `sohocloud boot` must follow the seed.
    lan_b = {"version": 2, "ethernets": {"lan": {"match": {"name": "lan"}, "addresses": ["10.77.0.1/24"]}}}
    seed_b = write_cidata(render_seed("rt-beta", [pub], network=lan_b, sohocloud={"wireguard": {
        "private_key": wg_priv, "address": "10.45.0.1/24", "listen_port": 51820,
        "peers": [{"public_key": peer_pub, "allowed_ips": ["10.45.0.2/32"]}]}}), work / "seed-b.img")

    lan_port_b = free_port()
    wan_port_a = free_port()
    vm_a = VM(router_images["a"], [Nic("user", hostfwd=(f"tcp:127.0.0.1:{wan_port_a}-:22",)),
                                    Nic("tap", ifname="tap-rt")],
              seed=seed_a, firmware="direct", netns=lan.name,
              serial_log=ARTIFACTS / f"router-a-{router_arch}.console.log", workdir=work / "vm-a",
              disk_size=CARD_SIZE)  # a card image grows into the rest of the card on first boot
    vm_a.workdir.mkdir(parents=True, exist_ok=True)
    # Router B goes through the CLI exactly as documented in the README.
    boot_b = [sys.executable, "-m", "builder.cli", "boot", str(router_images["b"]), "--seed", str(seed_b),
              "--ssh-port", str(lan_port_b), "--firmware", "uefi"] if "b" in router_images else []

    cfg = work / "ssh_config"
    kh_a, kh_b = work / "known_hosts_a", work / "known_hosts_b"
    cfg.write_text(
        ssh_config_entry("rt-a", test_key, kh_a, hostname="10.44.0.1",
                         proxy=f"ip netns exec {lan.name} socat STDIO TCP:%h:%p")
        + ssh_config_entry("rt-b", test_key, kh_b, hostname="127.0.0.1", port=lan_port_b))
    a = Node("rt-a", "rt-alpha", vm_a, cfg, kh_a, wan_ssh=(lan.name, wan_port_a))
    a_started = False
    b: Node | None = None
    try:
        vm_a.start()
        a_started = True
        if "b" in router_images:
            b = Node("rt-b", "rt-beta", CliBoot(boot_b, ARTIFACTS / f"router-b-{router_arch}.console.log"), cfg,
                     kh_b, extra={"wg_public": wg_pub, "peer_public": peer_pub})

        def wait(node: Node, host: str, port: int, netns: str | None) -> float:
            return wait_ssh_banner(host, port, BOOT_TIMEOUT, netns=netns, alive=node.vm.alive)

        with ThreadPoolExecutor(2) as pool:
            # A guest TCG starved (RCU stalls; seen once here, router A on an idle host) boots once more.
            fa = pool.submit(once_more_after_hiccup, vm_a, lambda: wait(a, "10.44.0.1", 22, lan.name),
                             warn=warnings.warn)
            fb = pool.submit(wait, b, "127.0.0.1", lan_port_b, None) if b else None
            a.boot_seconds = fa.result()
            if fb:
                b.boot_seconds = fb.result()
        booted = [n for n in (a, b) if n]
        for node in booted:
            _wait_login(node)
        times = {f"router-a {router_images['a'].name} (direct, tap LAN)": round(a.boot_seconds, 1)}
        if b:
            times[f"router-b {router_images['b'].name} (sohocloud boot --firmware uefi)"] = round(b.boot_seconds, 1)
            times["note"] = "both VMs booted at the same time on 2 host cores"
        (ARTIFACTS / f"boot-times-{router_arch}.json").write_text(json.dumps(times, indent=1))
        yield {"a": a, "b": b}
    finally:
        for node in (a, b):
            if node is not None and (node is not a or a_started):
                subprocess.run(node.ssh_argv("-O", "exit"), capture_output=True)
                node.vm.stop()
        shutil.copytree(work, ARTIFACTS / f"work-{router_arch}", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.qcow2", "*.img", "*.raw", "*.fd", "vmlinuz", "initrd.img",
                                                      "id"))


def _wait_login(node: Node, timeout: float = 120) -> None:
    """SSH answers; wait until the admin key logs in and the boot has settled."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        r = node.run("sudo -n systemctl is-system-running --wait", check=False, timeout=150)
        if r.returncode == 0 or r.stdout.strip() in ("running", "degraded"):
            return
        last = r.stderr.strip() or r.stdout.strip()
        time.sleep(2)
    raise AssertionError(f"{node.name}: no admin login within {timeout} s: {last}\n"
                         f"console tail:\n{node.vm.console()[-3000:]}")


@pytest.fixture(scope="session")
def router_a(routers) -> Node:
    return routers["a"]


@pytest.fixture(scope="session")
def router_b(routers, router_arch) -> Node:
    if routers["b"] is None:
        pytest.skip(f"router B on {router_arch} (qemu image through UEFI) runs in `make test-all`")
    return routers["b"]


@pytest.fixture(scope="session")
def router_nodes(routers) -> list[Node]:
    """The routers booted for this arch (A always; B where it runs)."""
    return [n for n in (routers["a"], routers["b"]) if n is not None]
