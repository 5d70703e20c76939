"""Building for another arch on this host: qemu-user through binfmt_misc, checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import SohoError

HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def is_foreign(arch: str) -> bool:
    return arch != HOST_ARCH


def check_foreign_arch(arch: str) -> None:
    """A foreign-arch build needs qemu-user registered with binfmt_misc: say so before any work."""
    if not is_foreign(arch):
        return
    qemu = {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)
    entry = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{qemu}"
    if not Path("/proc/sys/fs/binfmt_misc/status").exists():
        raise SohoError(f"building for {arch} on {HOST_ARCH} needs binfmt_misc, which is not mounted: "
                        "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc (make deps does this)")
    if not entry.is_file() or "enabled" not in entry.read_text().splitlines()[0]:
        raise SohoError(f"building for {arch} on {HOST_ARCH} needs qemu-user for {qemu} registered with binfmt_misc "
                        f"(no enabled {entry}): apt-get install qemu-user-static binfmt-support && "
                        f"update-binfmts --enable qemu-{qemu} (make deps does this)")
    flags = next((ln.split()[1] for ln in entry.read_text().splitlines() if ln.startswith("flags:")), "")
    if "F" not in flags:
        raise SohoError(f"{entry}: registered without the F (fix binary) flag, so it cannot run inside a chroot; "
                        "use Debian's qemu-user-static, which registers it with F")
