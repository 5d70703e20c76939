"""What a VM's serial console says about its boot: systemd's failures, its end, and the signs that
the hypervisor (not the image) failed a boot."""

from __future__ import annotations

import re
from pathlib import Path

# Console lines of a guest that TCG starved of timer interrupts on a loaded host: its CPUs
# stall (RCU stall reports; seen a few times here, never twice in a row), or the kernel's
# early timer check fails and it panics (no_timer_check in the targets' cmdline avoids that
# one; still listed for images booted with another cmdline). Such a boot is worth repeating.
HYPERVISOR_HICCUPS = ("detected stalls on CPUs", "IO-APIC + timer doesn't work")


ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
# systemd's status column on the console (systemd.show_status=error prints only these).
SYSTEMD_FAILURE_RE = re.compile(r"(?m)^\[\s*(?:FAILED|DEPEND|TIME)\s*\].*$")


def systemd_failures(console: str, lines: int = 12) -> list[str]:
    """systemd's FAILED / DEPEND / TIME status lines from a whole console (colours removed):
    why a boot went wrong is often printed minutes before the end a tail shows."""
    return [m.group(0).strip() for m in SYSTEMD_FAILURE_RE.finditer(ANSI_RE.sub("", console))][:lines]


def console_report(console: str, where: Path | str | None, tail: int = 15) -> str:
    """What a boot failure shows of a console: systemd's failures, then its end."""
    failures = systemd_failures(console)
    head = "systemd on its console:\n" + "\n".join(failures) + "\n" if failures else ""
    end = "\n".join(console.splitlines()[-tail:]) or "(nothing on the console)"
    return f"{head}the end of its console ({where}):\n{end}"
