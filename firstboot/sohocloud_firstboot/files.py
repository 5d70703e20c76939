"""Files written so that a power cut leaves the old or the new one, and the root's accounts."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see main.py)
if TYPE_CHECKING:
    from pathlib import Path

    from .context import Ctx


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path, data: bytes, mode: int, uid: int | None = None, gid: int | None = None
) -> None:
    """Temp file in the same directory + fsync + rename, so a power cut leaves
    either the old or the new file, never a torn one. The temp file is created
    0600 so secrets are never readable while being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.sohocloud-tmp")
    tmp.unlink(missing_ok=True)  # leftover from a power cut
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if uid is not None and gid is not None and os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_passwd(ctx: Ctx, user: str) -> tuple[int, int, str] | None:
    """uid, gid, home of *user* from ROOT/etc/passwd (never the host's NSS)."""
    try:
        lines = ctx.path("etc/passwd").read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        f = line.split(":")
        if len(f) >= 7 and f[0] == user:
            try:
                return int(f[2]), int(f[3]), f[5]
            except ValueError:
                return None
    return None


def read_group(ctx: Ctx, group: str) -> int | None:
    try:
        lines = ctx.path("etc/group").read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        f = line.split(":")
        if len(f) >= 3 and f[0] == group:
            try:
                return int(f[2])
            except ValueError:
                return None
    return None
