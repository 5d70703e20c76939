"""The image's file-integrity baseline: an AIDE database of the finished tree, made at build time.

A node checks itself against it (sohocloud-aide-check.timer): what differs from the image as built is
reported in its journal. Made here, not on the node's first boot, so that nothing a node did before
the first check (an intruder's first minutes included) is already part of the baseline.

The build host's own aide makes it (`root_prefix`: the tree's paths as the node sees them), natively
even for a foreign-arch image: the database format is the aide version's, not the arch's, so the host
must have the image's aide version.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from ..errors import SohoError
from ..proc import run
from ..progress import step

log = logging.getLogger("sohocloud.integrity")

CONFIG = "etc/aide/aide.conf"
DATABASE = "var/lib/aide/aide.db"


def wanted(root: Path) -> bool:
    """The image has aide and a configuration saying what to watch (a role's profile chose it)."""
    return (root / "usr/bin/aide").exists() and (root / CONFIG).is_file()


def upstream_version(debian_version: str) -> str:
    """'0.18.3-1+deb12u5' -> '0.18.3' (and an epoch '1:' dropped)."""
    return re.sub(r"^\d+:", "", debian_version).split("-", 1)[0]


def host_aide_version() -> str:
    if shutil.which("aide") is None:
        raise SohoError("this image has AIDE: its database is made at build time with the host's aide, "
                        "which is not installed (run `make deps`, or apt-get install aide)")
    out = run(["aide", "--version"], capture=True, check=False)
    m = re.search(r"AIDE\s+v?([0-9][0-9.]*)", out.stdout + out.stderr)
    if m is None:
        raise SohoError(f"cannot read the host aide's version from: {(out.stdout + out.stderr)[:200]!r}")
    return m.group(1)


def record_baseline(root: Path, image_aide_version: str) -> int:
    """Write the AIDE database of *root* into *root*/DATABASE (0600). Returns its entry count."""
    host = host_aide_version()
    image = upstream_version(image_aide_version)
    if host != image:
        raise SohoError(f"the image has aide {image} but the build host has aide {host}: a database made "
                        f"by one may not be read by the other; install aide {image} on the host")
    db = root / DATABASE
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(db.name + ".tmp")
    with step(f"integrity: AIDE database of the tree ({CONFIG})"):
        out = run(["aide", "--config", str(root / CONFIG), "--init",
                   "-B", f"root_prefix={root}", "-B", f"database_out=file:{tmp}", "-B", "report_url=stdout"],
                  capture=True)
    os.chmod(tmp, 0o600)
    os.replace(tmp, db)
    m = re.search(r"Number of entries:\s*(\d+)", out.stdout)
    entries = int(m.group(1)) if m else 0
    log.info("integrity: AIDE database of %d entries", entries)
    return entries
