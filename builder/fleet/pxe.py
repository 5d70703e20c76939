"""The site's PXE volume: what its PXE server (the node that `provides: [pxe]`, the router)
serves to diskless nodes, made by `sohocloud fleet build`.

out/<site>/pxe.img, an ext4 volume labelled sohocloud-pxe (mounted at /srv/pxe):
  http/boot.ipxe               the site's script: each enrolled MAC to its node's netboot set;
                               any other machine boots the first set, finds no seed: not enrolled
  http/pxe/<set>/              the netboot sets (out/pxe/<set>/: vmlinuz, initrd.img, rootfs.squashfs,
                               boot.ipxe), checked against SHA256SUMS before they are copied
  http/seeds/<mac>/            each netboot node's NoCloud seed (0640 root:www-data; the server
                               hands a folder only to the address the site reserved for that MAC)
  http/images/                 the images nodes fetch (the desktop template, checked by the sha256
                               in their seeds)

A real router gets the same files with `rsync -a out/<site>/pxe/ router:/srv/pxe/` or on a
USB disk with that label; `fleet up` attaches the volume to the router's VM.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import SohoError
from ..image.cache import sha256_file
from ..image.s6_manifest import recorded_sha256
from ..proc import run
from ..seed import read_cidata
from .sitefile import Site, SiteNode

LABEL = "sohocloud-pxe"
WWW_DATA_GID = 33  # Debian's static www-data group: lighttpd on the PXE server reads the seeds as it


def pxe_volume_path(out: Path, site: Site) -> Path:
    return out / site.name / "pxe.img"


def site_boot_script(site: Site, server: str, sets: dict[str, str]) -> str:
    """The site's boot.ipxe: the netboot set of each enrolled node (*sets*: node name -> set
    folder), chosen by MAC; any other machine gets the first node's set and no seed."""
    nodes = [n for n in site.nodes if n.name in sets]
    if not nodes:
        raise SohoError(f"site {site.name}: no netboot node, no boot script")
    lines = ["#!ipxe", f"# sohocloud site {site.name}: the netboot set of each enrolled machine, by MAC.",
             "# Written by `sohocloud fleet build`; the sets and seeds are on this server too.",
             f"set sohocloud-http http://{server}"]
    for n in nodes:
        lines.append(f"iseq ${{mac}} {n.mac} && chain ${{sohocloud-http}}/pxe/{sets[n.name]}/boot.ipxe ||")
    lines += [f"echo sohocloud: ${{mac}} is not enrolled in site {site.name}: booting without a seed",
              f"chain ${{sohocloud-http}}/pxe/{sets[nodes[0].name]}/boot.ipxe"]
    return "\n".join(lines) + "\n"


def write_pxe_volume(site: Site, server: SiteNode, sets: dict[str, Path], seeds: dict[str, Path], out: Path,
                     volume: Path, images: Sequence[Path] = ()) -> Path:
    """Build the PXE volume for *site* at *volume*. *sets*: node name -> its netboot set folder
    (out/pxe/<set>); *seeds*: node name -> its cidata image; *images*: files served under images/.
    Staged beside *volume*, renamed."""
    stage = volume.with_name("." + volume.name + ".tree")
    shutil.rmtree(stage, ignore_errors=True)
    http = stage / "http"
    try:
        stage.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir(mode=0o700)  # the seeds pass through it: no one else on the build host looks in
        http.mkdir()
        for f in images:
            if recorded_sha256(out, f) != sha256_file(f):
                raise SohoError(f"{f}: does not match {out / 'SHA256SUMS'}: rebuild it (sohocloud fleet build)")
            (http / "images").mkdir(exist_ok=True)
            _link_or_copy(f, http / "images" / f.name)
        for name, src in sorted(sets.items()):
            dest = http / "pxe" / src.name
            if dest.is_dir():
                continue  # two nodes, one set
            dest.mkdir(parents=True)
            for f in sorted(p for p in src.iterdir() if p.is_file()):
                if recorded_sha256(out, f) != sha256_file(f):
                    raise SohoError(f"{f}: does not match {out / 'SHA256SUMS'}: rebuild it (sohocloud fleet build)")
                _link_or_copy(f, dest / f.name)
        if sets:
            (http / "boot.ipxe").write_text(site_boot_script(site, server.address, {n: p.name for n, p in sets.items()}))
        for name in sorted(sets):
            node = site.node(name)
            d = http / "seeds" / node.mac
            d.mkdir(parents=True, mode=0o750)
            os.chown(d, 0, WWW_DATA_GID)
            for fname, text in sorted(read_cidata(seeds[name]).items()):
                _write_seed_file(d / fname, text)
        for d in (stage, http, http / "pxe", http / "seeds", http / "images"):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o755)
        size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        size_mib = size * 11 // 10 // (1 << 20) + 32
        tmp = volume.with_name("." + volume.name + ".tmp")
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))  # it carries the seeds
        run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-d", stage, "-E", "root_owner=0:0", "-O", "^has_journal",
             tmp, f"{size_mib}M"])
        os.replace(tmp, volume)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        volume.with_name("." + volume.name + ".tmp").unlink(missing_ok=True)
    return volume


def _write_seed_file(p: Path, text: str) -> None:
    """A seed file for the PXE server: created 0600 (whatever the umask), then given to its
    www-data group read-only; never readable by anyone else, not even for a moment."""
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(text.encode())
        while view:
            view = view[os.write(fd, view):]
        os.fchown(fd, 0, WWW_DATA_GID)
        os.fchmod(fd, 0o640)
    finally:
        os.close(fd)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
