"""The example site made to fit the test fleet's VMs (the fleet tests and `make bench` boot it)."""

from __future__ import annotations

import re
from pathlib import Path

# The test's hosts are small VMs (1 GiB; a diskless PC ~1.9): a machine type and a reserve to fit
# them (a session idles at ~45 MB). The example's own standard type wants a real PC's RAM.
VM_STANDARD, VM_RESERVE = "512M", "384M"


def fit_desktops_to_vms(text: str) -> str:
    """*text* (the example site file) with the desktops' standard machine type and host reserve of
    the test VMs."""
    if "machine: standard" not in text or "  policy:\n" not in text:
        raise ValueError("the example site's desktops no longer give the office a `standard` machine")
    return text.replace("  policy:\n", f"  machine_types:\n    standard: {{cpus: 1, memory: {VM_STANDARD}, pids: 256}}\n"
                                       f"  host_reserve: {VM_RESERVE}\n  policy:\n")


def example_for_vms(repo: Path, name: str, admin_key: str, *, all_arm64: bool = False, every_pc: bool = True) -> str:
    """sites/example.yaml as the test fleet and the bench boot it: named *name*, the test's admin key
    instead of the example's, desktops fitted to the VMs; *all_arm64* (`make test-all`): every role
    on arm64 (the router on a Pi 4 card, the rest arm64 qemu images unless the site names a board;
    diskless PCs stay amd64: Debian's iPXE has no arm64 EFI build); not *every_pc* (`make test`): the
    first diskless PC only (the BIOS one), since on two cores each emulated VM costs the whole fleet
    minutes (the UEFI PC, measured: a quarter of the host's CPU while the site boots)."""
    text = (repo / "sites/example.yaml").read_text()
    text = re.sub(r"(?m)^site: example$", f"site: {name}", text)
    if not every_pc:
        pcs = re.findall(r"(?m)^  - \{name: \w+, [^}]*target: pxe[^}]*\}\n", text)
        if not pcs:
            raise ValueError("the example site no longer has a diskless PC")
        for line in pcs[1:]:
            text = text.replace(line, "")
    if all_arm64:
        text = re.sub(r"(?m)^(  - \{name: \w+, role: router, [^}]*)\}", r"\1, target: rpi4, arch: arm64}", text)
        text = re.sub(r"(?m)^(  - \{name: \w+, role: (?!router)(?![^}]*target: pxe)[^}]*?)(, target: \w+, arch: \w+)?\}",
                      lambda m: m.group(1) + (m.group(2) or ", target: qemu, arch: arm64") + "}", text)
    keys = re.subn(r"(?m)^  - ssh-ed25519 \S+ admin@example$", f"  - {admin_key}", text)
    if keys[1] != 1:
        raise ValueError("the example site no longer has its one placeholder admin key")
    return fit_desktops_to_vms(keys[0])
