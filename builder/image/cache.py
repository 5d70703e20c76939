"""Content-addressed stage cache and the shared package cache.

Layout under the cache root (default /var/cache/sohocloud as root,
~/.cache/sohocloud otherwise; SOHOCLOUD_CACHE overrides):

    packages/<distro>-<suite>-<arch>/debs/   .deb files shared by every build
    packages/<distro>-<suite>-<arch>/lists/  apt lists, so apt-get update is a revalidation
    stages/<stage>/<key>/                    one finished stage output + meta.json
    slots/<stage>-<slot>.json                the inputs of the last build of a slot (--explain)
    tmp/                                     work dirs (same filesystem: hardlinks, renames)

A stage entry is written under a temp name and renamed into place, and its
output file's sha256 is checked on every reuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..proc import run

log = logging.getLogger("sohocloud.cache")


def cache_root() -> Path:
    env = os.environ.get("SOHOCLOUD_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/sohocloud")
    return Path.home() / ".cache" / "sohocloud"


def digest(obj: Any) -> str:
    """Stable sha256 of JSON-able data (dataclasses must be converted first)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: Path) -> str:
    """sha256 over relative paths, file modes, link targets and contents of a tree. Python's
    bytecode caches are not part of it: importing a module must not change an input."""
    h = hashlib.sha256()
    if not root.exists():
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0")
            if p.is_symlink():
                h.update(b"L" + os.readlink(p).encode() + b"\0")
            else:
                h.update(b"F" + oct(p.stat().st_mode & 0o111).encode() + b"\0")
                h.update(sha256_file(p).encode())
    return h.hexdigest()


def extract_tar(tar: Path, dest: Path) -> None:
    """Unpack a stage's tar with owners, modes and xattrs (file capabilities) intact."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tar, "-C", dest])


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on *path* (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class StageResult:
    path: Path  # the output file
    key: str
    reused: bool


class StageCache:
    def __init__(self, root: Path | None = None):
        self.root = root or cache_root()

    @property
    def tmp(self) -> Path:
        p = self.root / "tmp"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def packages(self, distro: str, suite: str, arch: str) -> Path:
        p = self.root / "packages" / f"{distro}-{suite}-{arch}"
        (p / "debs").mkdir(parents=True, exist_ok=True)
        (p / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        return p

    def _entry(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def lookup(self, stage: str, key: str, output: str) -> Path | None:
        """The cached output if present and its sha256 still matches; else None."""
        entry = self._entry(stage, key)
        meta_path = entry / "meta.json"
        out = entry / output
        if not (meta_path.is_file() and out.exists()):
            return None
        meta = json.loads(meta_path.read_text())
        if sha256_file(out) != meta.get("sha256"):
            log.warning("cache entry %s/%s is corrupt (sha256 mismatch): rebuilding", stage, key[:12])
            shutil.rmtree(entry, ignore_errors=True)
            return None
        return out

    def produce(self, stage: str, key: str, output: str, inputs: dict[str, str],
                build: Callable[[Path], None], *, use_cache: bool = True) -> StageResult:
        """Reuse the entry for *key* or call build(out_path) and store the result.

        *inputs* maps input names to their hashes; it is stored for --explain.
        """
        if use_cache:
            hit = self.lookup(stage, key, output)
            if hit is not None:
                return StageResult(hit, key, True)
        stage_dir = self.root / "stages" / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=stage_dir))
        try:
            out = work / output
            build(out)
            meta = {"key": key, "inputs": inputs, "sha256": sha256_file(out)}
            (work / "meta.json").write_text(json.dumps(meta, indent=1))
            final = self._entry(stage, key)
            if final.exists():
                shutil.rmtree(final)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return StageResult(final / output, key, False)

    # ------------------------------------------------------------------ explain

    def explain(self, stage: str, slot: str, inputs: dict[str, str]) -> list[str]:
        """Which inputs differ from the last build of this slot (and remember these)."""
        path = self.root / "slots" / f"{stage}-{slot}.json"
        reasons: list[str] = []
        if path.is_file():
            old = json.loads(path.read_text())
            for name in sorted(set(old) | set(inputs)):
                if old.get(name) != inputs.get(name):
                    reasons.append(name)
        else:
            reasons.append("first build of this slot")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(inputs, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return reasons
