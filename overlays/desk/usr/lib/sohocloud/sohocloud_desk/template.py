"""The desktop template on this host: a squashfs fetched from the site's PXE server, checked against
the sha256 in the node's seed, mounted read-only (nodev, nosuid) at container.TEMPLATE. Every
session runs on that one tree (podman --rootfs): nothing is unpacked, and a diskless PC keeps it
compressed in RAM.

The file is written under a temp name and renamed once its sha256 matched, with that sha256 beside
it: a power cut leaves the old file or none, and a host that has it does not fetch it again.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import container, system

FILE = Path("/var/lib/sohocloud-desk/template.squashfs")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
URL_RE = re.compile(r"http://[0-9.]+/images/[A-Za-z0-9._-]+\.squashfs")


def check_spec(spec: Any) -> dict[str, str]:
    if not (isinstance(spec, dict) and isinstance(spec.get("url"), str) and URL_RE.fullmatch(spec["url"])
            and isinstance(spec.get("sha256"), str) and SHA256_RE.fullmatch(spec["sha256"])):
        raise ValueError("template: expected {url: http://<server>/images/<file>.squashfs, sha256}")
    return {"url": spec["url"], "sha256": spec["sha256"]}


def fetch(url: str, sha256: str, dest: Path, timeout: float = 60.0) -> None:
    """*url* to *dest*, only if its content has *sha256*."""
    dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:  # noqa: S310 (http by design: checked by hash)
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"{url}: sha256 {digest.hexdigest()[:16]}… is not the seed's {sha256[:16]}…")
        os.replace(tmp, dest)
        dest.with_name(dest.name + ".sha256").write_text(sha256 + "\n")
    finally:
        tmp.unlink(missing_ok=True)


def have(file: Path, sha256: str) -> bool:
    marker = file.with_name(file.name + ".sha256")
    return file.is_file() and marker.is_file() and marker.read_text().strip() == sha256


def ensure(spec: dict[str, str], file: Path = FILE, mountpoint: Path = Path(container.TEMPLATE),
           run: system.Run = system.run, get: Callable[[str, str, Path], None] = fetch) -> bool:
    """The template of *spec* mounted at *mountpoint*; True when it had to be fetched."""
    fetched = False
    if os.path.ismount(mountpoint):
        if have(file, spec["sha256"]):
            return False
        run(["umount", str(mountpoint)])  # an older template: the sessions on it have ended with the reboot
    if not have(file, spec["sha256"]):
        file.with_name(file.name + ".sha256").unlink(missing_ok=True)
        get(spec["url"], spec["sha256"], file)
        fetched = True
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "squashfs", "-o", "ro,nodev,nosuid,loop", str(file), str(mountpoint)])
    return fetched


def keep_trying(spec: dict[str, str], log: Callable[[str], None], done: Callable[[], None],
                sleep: Callable[[float], None] = time.sleep, **kw: Any) -> None:
    """ensure() until it works (the PXE server may boot after this host): 5 s, doubling up to 60 s."""
    wait = 5.0
    while True:
        try:
            started = time.monotonic()
            fetched = ensure(spec, **kw)
            log(f"desktop template {'fetched and ' if fetched else ''}mounted at {container.TEMPLATE} "
                f"({time.monotonic() - started:.1f} s)")
            done()
            return
        except (OSError, RuntimeError) as e:
            log(f"desktop template not ready ({e}); again in {wait:.0f} s")
            sleep(wait)
            wait = min(wait * 2, 60.0)
