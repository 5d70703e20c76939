"""Where a seed comes from, first found wins: a cidata volume, a listed seed directory,
a URL on the kernel command line (PXE nodes)."""

from __future__ import annotations

import time

from .context import MARKER, NOT_ENROLLED, RUN_DIR, SEED_DIRS_LIST, StepError, tool
from .seedrules import CIDATA_LABELS, SEED_FILES

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see main.py)
if TYPE_CHECKING:
    from pathlib import Path

    from .context import Ctx

MOUNT_DIR = f"{RUN_DIR}/seed"
CIDATA_WAIT_S = 8.0
HTTP_TIMEOUT_S = 10.0
HTTP_TRIES = 4


def read_seed_dir(d: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for name in SEED_FILES:
        p = d / name
        out[name] = p.read_bytes() if p.is_file() else None
    return out


def seed_dir_from_list(ctx: Ctx) -> Path | None:
    """First directory from ROOT/etc/sohocloud/seed-dirs holding a meta-data."""
    try:
        lines = ctx.path(SEED_DIRS_LIST).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        d = ctx.path(line)
        if (d / "meta-data").is_file():
            return d
    return None


def cmdline_seed_url(ctx: Ctx) -> str | None:
    """``ds=nocloud;s=URL`` or ``ds=nocloud-net;seedfrom=URL`` on the kernel command line."""
    try:
        cmdline = ctx.path("proc/cmdline").read_text()
    except (FileNotFoundError, PermissionError):
        return None
    for tok in cmdline.split():
        if not tok.startswith("ds="):
            continue
        name, *opts = tok[3:].split(";")
        if name not in ("nocloud", "nocloud-net"):
            continue
        for opt in opts:
            key, _, val = opt.partition("=")
            if key in ("s", "seedfrom") and val:
                return val if val.endswith("/") else val + "/"
    return None


def http_get(url: str, *, optional: bool) -> bytes | None:
    """GET with timeout and a few retries (the node's network may still be settling).
    404 on an optional file means "absent"."""
    # lazy: urllib.request pulls in http.client and email (~0.2 s, more emulated); only PXE nodes fetch a seed
    import urllib.error
    import urllib.request

    last: Exception | None = None
    for attempt in range(HTTP_TRIES):
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
                data: bytes = resp.read()
                return data
        except urllib.error.HTTPError as e:
            if e.code == 404:
                if optional:
                    return None
                raise StepError(f"not found (HTTP 404) at {_where(url)}") from None
            last = e
        except (urllib.error.URLError, OSError) as e:
            last = e
        if attempt + 1 < HTTP_TRIES:
            time.sleep(2**attempt)
    raise StepError(f"fetch from {_where(url)} failed after {HTTP_TRIES} tries: {type(last).__name__}")


def _where(url: str) -> str:
    """scheme://host/ only: a seed URL's path may carry a per-node token."""
    # lazy: urllib.parse is wanted only for a seed URL on the kernel command line (PXE nodes)
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/ ({url.rsplit('/', 1)[-1] or 'index'})"


def fetch_seed(ctx: Ctx, base: str) -> dict[str, bytes | None] | None:
    # lazy: urllib.parse is wanted only for a seed URL on the kernel command line (PXE nodes)
    import urllib.parse

    scheme = urllib.parse.urlsplit(base).scheme
    if scheme not in ("http", "https"):
        ctx.error(f"kernel command line: seed URL scheme {scheme!r} not supported (http/https)")
        return None
    out: dict[str, bytes | None] = {}
    for name in SEED_FILES:
        try:
            out[name] = http_get(base + name, optional=name != "meta-data")
        except StepError as e:
            ctx.error(f"{name}: {e}")
            if name == "meta-data":
                return None
            out[name] = None
    return out


def read_fs_label(dev: Path) -> str | None:
    """The volume label of a FAT or ISO9660 filesystem, read from the device itself.

    Reading the boot sector / volume descriptor does not wait for udev: under
    emulation udev's coldplug of every device takes seconds, and the seed is on
    the critical path to SSH.
    """
    try:
        with open(dev, "rb") as f:
            head = f.read(512)
            f.seek(0x8000)
            pvd = f.read(0x48)
    except OSError:
        return None
    if len(head) == 512 and head[510:512] == b"\x55\xaa":
        for sig_off, label_off in ((66, 71), (38, 43)):  # FAT32, FAT12/16 extended BPB
            if head[sig_off] == 0x29 and head[label_off + 11:label_off + 19].startswith(b"FAT"):
                return head[label_off:label_off + 11].decode("ascii", "replace").strip()
    if len(pvd) >= 0x48 and pvd[0] == 1 and pvd[1:6] == b"CD001":
        return pvd[0x28:0x48].decode("ascii", "replace").strip()
    return None


def scan_block_labels(ctx: Ctx) -> str | None:
    """First block device (disk or partition) whose filesystem label is cidata."""
    sys_block = ctx.path("sys/class/block")
    if not sys_block.is_dir():
        return None
    for entry in sorted(sys_block.iterdir()):
        dev = ctx.path(f"dev/{entry.name}")
        label = read_fs_label(dev) if dev.exists() else None
        if label in CIDATA_LABELS:
            return str(dev)
    return None


def find_cidata_device(ctx: Ctx, patient: bool) -> str | None:
    """Look for the seed volume by reading labels directly, then by-label/blkid.

    On a first boot with no other seed source, keep looking for a while: a
    slow disk may appear a little later.
    """
    deadline = time.monotonic() + (CIDATA_WAIT_S if patient else 0.0)
    while True:
        dev = scan_block_labels(ctx)
        if dev is not None:
            return dev
        for label in CIDATA_LABELS:
            p = ctx.path(f"dev/disk/by-label/{label}")
            if p.exists():
                return str(p)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    for label in CIDATA_LABELS:
        r = tool(["blkid", "-t", f"LABEL={label}", "-o", "device"])
        devs = r.stdout.split() if r is not None else []
        if r is not None and r.returncode == 0 and devs:
            return devs[0]
    return None


# The seed volume, read-only, its files (keys, passwords) readable by root only while it is mounted.
CIDATA_MOUNTS = (("vfat", "ro,nosuid,nodev,noexec,umask=0077"),
                 ("iso9660", "ro,nosuid,nodev,noexec,mode=0400,dmode=0500"))


def read_cidata_device(ctx: Ctx, dev: str) -> dict[str, bytes | None] | None:
    """Mount read-only, copy the three files into memory, unmount at once so
    nothing keeps the volume busy."""
    mnt = ctx.path(MOUNT_DIR)
    mnt.mkdir(parents=True, exist_ok=True, mode=0o700)
    for fstype, options in CIDATA_MOUNTS:  # one type at a time: each refuses the other's options
        r = tool(["mount", "-t", fstype, "-o", options, dev, str(mnt)])
        if r is not None and r.returncode == 0:
            break
    if r is None or r.returncode != 0:
        why = r.stderr.strip() if r is not None else "mount not found"
        ctx.error(f"cidata volume {dev}: mount failed: {why}")
        return None
    try:
        return read_seed_dir(mnt)
    finally:
        tool(["umount", str(mnt)])


def discover_seed(ctx: Ctx) -> tuple[str, dict[str, bytes | None]] | None:
    seed_dir = seed_dir_from_list(ctx)
    url = cmdline_seed_url(ctx)
    if ctx.system:
        # Only wait for a slow cidata disk on a node that never finished firstboot
        # and has no other source: otherwise every boot would stall 8 s.
        patient = seed_dir is None and url is None and not ctx.path(MARKER).exists()
        dev = find_cidata_device(ctx, patient)
        if dev is not None:
            raw = read_cidata_device(ctx, dev)
            if raw is not None:
                return f"cidata volume {dev}", raw
    if seed_dir is not None:
        return f"seed directory {seed_dir}", read_seed_dir(seed_dir)
    if url is not None and not ctx.path(NOT_ENROLLED).exists():
        # Log only scheme://host: a path may carry a per-node token.
        # lazy: urllib.parse is wanted only for a seed URL on the kernel command line (PXE nodes)
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        raw = fetch_seed(ctx, url)
        if raw is not None:
            return f"seed URL {parts.scheme}://{parts.netloc}/", raw
    return None
