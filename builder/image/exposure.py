"""Each service a role runs, measured: `systemd-analyze security` on the finished tree, held to the level
its profile declares (services.exposure), and the common sandbox put in place for those that take it.

Measured offline, on the tree as built (its unit files and drop-ins, not a running node), by the build
host's systemd: the same systemd release as the images (Debian 12's 252), so the same scale. A service
above its level fails the build, so a package update or an edit that loosens a sandbox is seen at once.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from ..errors import SohoError
from ..proc import run

log = logging.getLogger("sohocloud.exposure")

# The common sandbox (overlays/hardened): copied as a drop-in of each service in services.sandbox.
SANDBOX = "usr/lib/sohocloud/sandbox.conf"
SANDBOX_DROPIN = "40-sohocloud-sandbox.conf"

_OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")


def install_sandbox(root: Path, units: tuple[str, ...]) -> None:
    """Give each of *units* the common sandbox drop-in (under /usr: the image's, sealed by AIDE)."""
    if not units:
        return
    src = root / SANDBOX
    if not src.is_file():
        raise SohoError(f"services.sandbox lists {', '.join(units)} but the image has no /{SANDBOX} "
                        f"(it comes with the hardened overlay)")
    for unit in units:
        dest = root / "usr/lib/systemd/system" / f"{unit}.d" / SANDBOX_DROPIN
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        dest.chmod(0o644)


def parse_overall(text: str) -> float | None:
    m = _OVERALL.search(text)
    return float(m.group(2)) if m else None


def measure(root: Path, unit: str) -> float:
    out = run(["systemd-analyze", "security", "--offline=true", f"--root={root}", "--no-pager", unit],
              capture=True, check=False)
    level = parse_overall(out.stdout)
    if level is None:
        raise SohoError(f"services.exposure: cannot measure {unit} in the image "
                        f"(systemd-analyze security: {(out.stderr or out.stdout).strip()[:200]})")
    return level


def over_levels(measured: dict[str, float], declared: dict[str, float]) -> list[str]:
    """The services above their declared level, each as a sentence."""
    return [f"{u} measures {m:.1f}, over the {declared[u]:.1f} declared"
            for u, m in measured.items() if m > declared[u] + 1e-9]


def systemd_major(version: str) -> int | None:
    """252 from 'systemd 252 (252.38-1~deb12u1)' (systemd-analyze --version) or '252.38-1~deb12u1' (dpkg)."""
    m = re.search(r"(?:^|systemd )(\d+)(?:[.\s~+-]|$)", version.strip())
    return int(m.group(1)) if m else None


def check_scale(image_systemd: str) -> None:
    """The host's systemd-analyze scores a unit as the image's systemd would: same major release."""
    if not image_systemd:
        return
    out = run(["systemd-analyze", "--version"], capture=True, check=False).stdout
    host, image = systemd_major(out), systemd_major(image_systemd)
    if host != image:
        raise SohoError(f"services.exposure: the image has systemd {image_systemd} but this host's systemd-analyze "
                        f"is {host}: each release scores sandboxes its own way, so the levels declared for "
                        f"{image} cannot be checked here; build on a host with systemd {image}")


def check(root: Path, role: str, runs: tuple[str, ...], declared: dict[str, float],
          image_systemd: str = "") -> dict[str, float]:
    """Measure every service *role* runs; fail if one is above its declared level. Returns the levels."""
    check_scale(image_systemd)
    measured = {u: measure(root, u) for u in runs if u in declared}
    over = over_levels(measured, declared)
    if over:
        raise SohoError(f"role {role}: services.exposure: " + "; ".join(over) +
                        " (systemd-analyze security --offline on the built tree): tighten the service's "
                        "sandbox, or declare its level with the reason in the role's profile")
    log.info("exposure: %s", ", ".join(f"{u} {m:.1f}" for u, m in sorted(measured.items(), key=lambda x: -x[1])))
    return measured
