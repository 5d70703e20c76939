"""`sohocloud boot IMAGE`: one image in QEMU, its serial console on this terminal, its LAN side a
restricted QEMU user-net with SSH forwarded from 127.0.0.1."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import yaml

from ..seed import read_cidata
from .qemu import VM, Nic, accel_args, image_info


def seed_lan_address(seed: Path | None, manifest: dict) -> ipaddress.IPv4Interface | None:
    """The node's LAN address: the seed's network-config, else the role's default."""
    if seed is not None:
        files = read_cidata(seed)
        net = yaml.safe_load(files.get("network-config") or "") or {}
        for name, eth in (net.get("ethernets") or {}).items():
            if (eth.get("set-name") or name) == "lan" and eth.get("addresses"):
                return ipaddress.IPv4Interface(eth["addresses"][0])
    lan = manifest.get("network", {}).get("lan", {})
    if lan.get("addresses"):
        return ipaddress.IPv4Interface(lan["addresses"][0])
    return None


def user_lan(lan: ipaddress.IPv4Interface | None, ssh_port: int | None) -> Nic:
    """A restricted user-net posing as the LAN, with SSH forwarded from 127.0.0.1."""
    if lan is None:  # DHCP on the LAN: user-net's own DHCP hands out 10.0.2.15
        fwd = (f"tcp:127.0.0.1:{ssh_port}-:22",) if ssh_port else ()
        return Nic("user", hostfwd=fwd)
    gw = next(h for h in lan.network.hosts() if h != lan.ip)  # user-net's own address on that LAN
    fwd = (f"tcp:127.0.0.1:{ssh_port}-{lan.ip}:22",) if ssh_port else ()
    return Nic("user", net=str(lan.network), host=str(gw), hostfwd=fwd)


def boot_interactive(image: Path, *, seed: Path | None, ssh_port: int, firmware: str, memory: int) -> int:
    """`sohocloud boot`: serial console on this terminal; SSH on 127.0.0.1:ssh_port -> LAN side."""
    manifest = image_info(image)
    lan = seed_lan_address(seed, manifest)
    nics = []
    for name in manifest["interfaces"]:
        nics.append(user_lan(lan, ssh_port) if name == "lan" else Nic("user"))
    vm = VM(image, nics, seed=seed, firmware=firmware, memory=memory)
    try:
        argv = vm.argv()
        accel = "KVM" if "kvm" in accel_args(manifest["arch"]) else "TCG"
        print(f"sohocloud: booting {image.name} ({accel}, {firmware}); "
              f"SSH: ssh -p {ssh_port} admin@127.0.0.1; quit: Ctrl-a x", flush=True)
        return subprocess.call(argv)
    finally:
        vm.cleanup()
