"""The example site made to fit the test fleet's VMs (the fleet tests and `make bench` boot it)."""

from __future__ import annotations

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
