"""The site record: what `fleet build` made for each node. `fleet up`, `test`, `ssh` and `down` read it.

out/<site>/site.json, written by `fleet build` (atomically, last): the site as it was built (its
nodes, LAN, people), the site file's sha256, and for each node its image (the artefact and its
manifest, by path and sha256), its seed, its netboot set, and its role's site facts (the services
it provides and uses, its cluster membership, the other images it uses, the role's vars). Later
commands never resolve profiles or read images/*.yaml again: a profile edited after `fleet build`
changes nothing until the next `fleet build`. `fleet up` checks the record against the files it
names (and the site file) and refuses a stale one; it keeps a copy of what it booted in
out/<site>/run/site.json, which `fleet test` and `fleet ssh` read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, SohoError
from ..image.cache import hash_tree, sha256_file
from ..image.schema import Validator
from ..image.yamlsrc import Origin, load_yaml
from .sitefile import Site, SiteNode, site_path

FORMAT = 1
RECORD_NAME = "site.json"


@dataclass(frozen=True)
class FileRef:
    """A file (or a folder: a netboot set) the build made, by path and content hash."""

    path: str  # relative to the output folder (absolute for the site file)
    sha256: str  # of the file; of a folder, cache.hash_tree's digest

    def resolve(self, out: Path) -> Path:
        return out / self.path

    def current_sha256(self, out: Path) -> str | None:
        p = self.resolve(out)
        if p.is_dir():
            return hash_tree(p)
        return sha256_file(p) if p.is_file() else None


@dataclass(frozen=True)
class NodeRecord:
    name: str
    role: str
    image: FileRef  # the artefact it boots: a disk image, a card image, or a netboot set (folder)
    manifest: FileRef  # the artefact's manifest: how to boot it (QEMU machine, firmware, boot files, NICs)
    seed: FileRef
    netboot: bool  # boots from the PXE server (its set is on the site's PXE volume)
    provides: tuple[str, ...] = ()  # site services its role serves (profiles: provides)
    consumes: tuple[str, ...] = ()  # site services it uses (uses + the may_use the site has)
    cluster: str = "none"  # its membership of the site's cluster: none, manager, worker
    images: tuple[FileRef, ...] = ()  # other images it uses (e.g. the desktop template's OCI archive)
    vars: dict[str, Any] = field(default_factory=dict)  # the role's vars (e.g. the NAS root)


@dataclass(frozen=True)
class SiteRecord:
    format: int
    builder_version: str
    site: Site
    site_file: FileRef
    nodes: tuple[NodeRecord, ...]
    pxe_volume: FileRef | None = None  # the PXE server's volume (its netboot sets and seeds)
    pxe_server: str = ""  # the node that provides pxe

    def node(self, name: str) -> NodeRecord:
        self.site.node(name)  # an unknown name fails with the site's list
        return next(n for n in self.nodes if n.name == name)

    def provider(self, service: str) -> SiteNode | None:
        return next((self.site.node(n.name) for n in self.nodes if service in n.provides), None)

    def manifest(self, out: Path, name: str) -> dict:
        return json.loads(self.node(name).manifest.resolve(out).read_text())

    # ------------------------------------------------------------------ checked against the files

    def check_current(self, out: Path, site_file: Path, names: list[str]) -> None:
        """The site file and what these nodes boot are what `fleet build` made, byte for byte
        (an image rebuilt or a seed rewritten since is a stale record)."""
        again = f"run `sohocloud fleet build {site_file}`"
        if not site_file.is_file():
            raise SohoError(f"{site_file}: no such site file (the site was built from {self.site_file.path})")
        if sha256_file(site_file) != self.site_file.sha256:
            raise SohoError(f"{site_file} changed since `fleet build` made {out / self.site.name / RECORD_NAME}: "
                            f"{again}")
        refs = [(f"node {n.name}'s {what}", ref) for n in self.nodes if n.name in names
                for what, ref in (("image", n.image), ("manifest", n.manifest), ("seed", n.seed))]
        if self.pxe_volume is not None and any(n.netboot or n.name == self.pxe_server
                                               for n in self.nodes if n.name in names):
            refs.append(("PXE volume", self.pxe_volume))
        for what, ref in refs:
            got = ref.current_sha256(out)
            if got != ref.sha256:
                change = "is missing" if got is None else "changed"
                raise SohoError(f"{ref.resolve(out)} ({what}) {change} since `fleet build` recorded the site: {again}")


# --------------------------------------------------------------------------- files


def record_path(out: Path, site_name: str) -> Path:
    return out / site_name / RECORD_NAME


def site_name_of(repo_root: Path, site: str) -> tuple[str, Path]:
    """The site's name and file for a SITE argument (a name in sites/, or a path): only the file's
    `site:` key is read, nothing else of it is checked (the record holds the site as built)."""
    path = site_path(repo_root, site)
    if not path.is_file():
        raise ConfigError(f"{path}: no such site file")
    doc = load_yaml(path)
    name = doc.data.get("site")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{doc.origin(('site',))}: site: expected the site's name")
    return name, path


def write_record(path: Path, record: SiteRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(path: Path, missing: str) -> SiteRecord:
    """The record at *path*; *missing* says what to do when there is none (or it is unreadable)."""
    if not path.is_file():
        raise SohoError(f"no {path}: {missing}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SohoError(f"{path}: not a site record ({e.msg}): {missing}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SohoError(f"{path}: a site record of another format than {FORMAT} (an older sohocloud): {missing}")
    try:
        return Validator({}, Origin(path, 1)).build_dataclass(SiteRecord, data, ())
    except ConfigError as e:
        raise SohoError(f"{e}: {missing}") from None


def load_built(out: Path, repo_root: Path, site: str) -> tuple[SiteRecord, Path]:
    """What `fleet build` recorded for SITE, and the site file it must still match."""
    name, path = site_name_of(repo_root, site)
    return read_record(record_path(out, name), f"run `sohocloud fleet build {site}` first"), path


def new_record(site: Site, site_file: Path, nodes: list[NodeRecord], pxe_volume: FileRef | None,
               pxe_server: str) -> SiteRecord:
    return SiteRecord(FORMAT, __version__, site, FileRef(str(site_file.resolve()), sha256_file(site_file)),
                      tuple(nodes), pxe_volume, pxe_server)


def file_ref(out: Path, path: Path) -> FileRef:
    """*path* (below *out*) as the build left it."""
    return FileRef(path.relative_to(out).as_posix(), hash_tree(path) if path.is_dir() else sha256_file(path))
