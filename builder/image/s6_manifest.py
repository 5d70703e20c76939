"""Stage 6 — manifest: `<artefact>.manifest.json` beside each artefact, and SHA256SUMS.

The manifest records what the build made and everything later commands need to boot and check
it (`sohocloud boot`, `flash`, `fleet up`, `fleet test` read it, never the YAML it came from):
the QEMU machine and firmware (`qemu`), where the kernel, initrd and command line are (`boot`),
the NIC layout (`interfaces`, in the order of `qemu.nic_addrs`), partitions, data disks, ports.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .. import __version__
from .cache import locked, sha256_file
from .config import BuildConfig

MANIFEST_SUFFIX = ".manifest.json"


def make_manifest(cfg: BuildConfig, artefact: Path, key: str, inputs: dict[str, str], stages: dict,
                  seconds: float, assembled: dict, packages: dict[str, str]) -> dict[str, Any]:
    """The manifest of *artefact*: the build's own facts, the role's and target's boot facts, and
    *assembled* (what stage 5 reported)."""
    p = cfg.profile
    manifest = {
        "artefact": artefact.name,
        "slug": cfg.slug,
        "role": cfg.role,
        "distro": cfg.distro,
        "arch": cfg.arch,
        "target": cfg.target_name,
        "kind": cfg.target.kind,
        "builder_version": __version__,
        "inputs_hash": key,
        "inputs": inputs,
        "stages": stages,
        "build_seconds": round(seconds, 1),
        "interfaces": list(p.interfaces),
        "network": {k: {"dhcp4": v.dhcp4, "addresses": list(v.addresses)} for k, v in p.network.items()},
        "ports": [vars(x) for x in p.firewall.ports],
        "clients": [vars(x) for x in p.firewall.clients],
        "protocols": [vars(x) for x in p.firewall.protocols],
        "disks": [vars(d) for d in p.disks],
        **assembled,
        "packages": packages,
    }
    if cfg.arch_spec.qemu is not None:  # how QEMU runs it (for a board: the machine standing in for it)
        manifest["qemu"] = dataclasses.asdict(cfg.arch_spec.qemu)
    manifest["sizes"]["artefact_bytes"] = sum(f.stat().st_size for f in artefact_files(artefact))
    return manifest


def artefact_files(artefact: Path) -> list[Path]:
    """The files of an artefact: itself, or a netboot set's files."""
    return sorted(p for p in artefact.iterdir() if p.is_file()) if artefact.is_dir() else [artefact]


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
