"""Stage 6 — manifest: `<artefact>.manifest.json` beside each artefact, and SHA256SUMS."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .cache import locked, sha256_file

MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(artefact: Path) -> Path:
    return artefact.with_name(artefact.name + MANIFEST_SUFFIX)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_manifest(artefact: Path) -> dict[str, Any] | None:
    p = manifest_path(artefact)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def update_sha256sums(out_dir: Path, files: list[Path]) -> None:
    """Replace the lines of *files* in out_dir/SHA256SUMS (sha256sum -c format)."""
    sums = out_dir / "SHA256SUMS"
    with locked(out_dir / ".SHA256SUMS.lock"):
        entries: dict[str, str] = {}
        if sums.is_file():
            for line in sums.read_text().splitlines():
                digest, _, name = line.partition("  ")
                if name:
                    entries[name] = digest
        for f in files:
            entries[f.relative_to(out_dir).as_posix()] = sha256_file(f)
        entries = {n: d for n, d in entries.items() if (out_dir / n).exists()}
        tmp = out_dir / ".SHA256SUMS.tmp"
        tmp.write_text("".join(f"{d}  {n}\n" for n, d in sorted(entries.items())))
        os.replace(tmp, sums)


def recorded_sha256(out_dir: Path, artefact: Path) -> str | None:
    sums = out_dir / "SHA256SUMS"
    if not sums.is_file():
        return None
    name = artefact.relative_to(out_dir).as_posix()
    for line in sums.read_text().splitlines():
        digest, _, n = line.partition("  ")
        if n == name:
            return digest
    return None
