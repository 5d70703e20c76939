"""Does any artefact hold a site secret? A search of every byte inside the generic images.

A generic image is the same for every site, so it must carry nothing of one: no CA or node key,
no WireGuard key, token or password. This opens each artefact the way a thief with a copy would
and searches all of it, slack and free space included:

- qcow2 disk:          the whole disk, as raw (every partition, every unused block);
- SD card (.img.xz):   the whole card, decompressed (root and boot partitions);
- squashfs (PXE root, desktop template): every file, unpacked;
- PXE set:             its squashfs, its kernel and its initrd (decompressed);
- OCI archive:         every blob, each layer decompressed.

The search is GNU grep's multi-string search (fixed strings, binary as text) over the streams;
which secret matched is reported by its file name under secrets/<site>/, never by its value.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import SohoError
from .record import SiteRecord

log = logging.getLogger("sohocloud.fleet")

# Secret files under secrets/<site>/ (everything else there is public: certificates, QR codes
# of the same TOTP secrets, the peers' configs, which hold a peer key found through its .key).
SECRET_SUFFIXES = (".secret", ".password", ".totp", ".key")
MIN_NEEDLE = 16  # a shorter string would match by chance somewhere in a gigabyte


@dataclass(frozen=True)
class Needle:
    name: str  # the secret's file, relative to secrets/<site>/ (and which part of it)
    value: bytes


def site_needles(secrets: Path) -> list[Needle]:
    """Every secret of the site as byte strings to look for. A PEM key is looked for by each
    line of its body (any line of it is enough to know it leaked); a one-line secret as it is."""
    needles = []
    for path in sorted(p for p in secrets.rglob("*") if p.is_file() and p.suffix in SECRET_SUFFIXES):
        rel = str(path.relative_to(secrets))
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines and lines[0].startswith("-----BEGIN"):
            body = [line for line in lines if not line.startswith("-----")]
            needles += [Needle(f"{rel} (line {i + 2})", line.encode()) for i, line in enumerate(body)
                        if len(line) >= MIN_NEEDLE]
        elif len(lines) == 1 and len(lines[0]) >= MIN_NEEDLE:
            needles.append(Needle(rel, lines[0].encode()))
    return needles


def site_artefacts(record: SiteRecord, out: Path) -> list[Path]:
    """The generic artefacts the site's nodes boot and use: disks, cards, PXE sets, templates (not
    the seeds or the PXE volume: those carry the nodes' secrets by design, 0600)."""
    refs = [ref for n in record.nodes for ref in (n.image, *n.images)]
    return sorted({ref.resolve(out) for ref in refs})


def find_secrets(artefacts: list[Path], needles: list[Needle]) -> dict[str, list[str]]:
    """{artefact (and the part of it): [secret names found]} for each artefact holding any."""
    if not needles:
        raise SohoError("no site secrets to look for (is this the site's secrets folder?)")
    found: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="sohocloud-leaks-") as tmp:
        patterns = Path(tmp) / "needles"
        patterns.write_bytes(b"\n".join(n.value for n in needles) + b"\n")
        patterns.chmod(0o600)
        for artefact in artefacts:
            for where, stream in _streams(artefact, Path(tmp)):
                hits = _grep(stream, patterns)
                names = sorted({n.name for n in needles if n.value in hits})
                if names:
                    found[where] = names
                log.info("leaks: %s searched: %s", where, "FOUND " + ", ".join(names) if names else "clean")
    return found


def _grep(stream: subprocess.Popen | Path, patterns: Path) -> set[bytes]:
    """The needles that occur in *stream* (a file, or a process's stdout)."""
    src = stream if isinstance(stream, Path) else None
    argv = ["grep", "-a", "-o", "-F", "-f", str(patterns)] + ([str(src)] if src else [])
    grep = subprocess.Popen(argv, stdin=None if src else stream.stdout, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if not src:
        stream.stdout.close()  # grep holds it now
    out, err = grep.communicate()
    if not src and stream.wait() != 0:
        raise SohoError(f"cannot read {stream.args[-1]}: {stream.stderr.read().decode(errors='replace')[-300:]}")
    if grep.returncode not in (0, 1):  # 1: nothing found
        raise SohoError(f"grep failed ({grep.returncode}): {err.decode(errors='replace')[-300:]}")
    return set(out.splitlines())


def _pipe(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _streams(artefact: Path, tmp: Path) -> Iterator[tuple[str, subprocess.Popen | Path]]:
    """(where, what to search) for each part of *artefact*, decompressed or unpacked."""
    name = artefact.name
    if artefact.is_dir():  # a PXE set
        for part in sorted(artefact.iterdir()):
            for where, stream in _streams(part, tmp):
                yield f"{name}/{where}", stream
    elif name.endswith(".qcow2"):
        raw = tmp / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(artefact), str(raw)],
                       check=True, capture_output=True)
        yield f"{name} (whole disk)", raw
        raw.unlink()
    elif name.endswith(".xz"):
        yield f"{name} (whole card)", _pipe(["xz", "-dc", str(artefact)])
    elif name.endswith(".squashfs"):
        tree = tmp / "squashfs"
        subprocess.run(["unsquashfs", "-no-progress", "-quiet", "-no-xattrs", "-d", str(tree), str(artefact)],
                       check=True, capture_output=True)
        # Every file's bytes, one stream (symlinks and devices carry no data of their own).
        yield f"{name} (every file)", _pipe(["find", str(tree), "-type", "f", "-exec", "cat", "{}", "+"])
        shutil.rmtree(tree)
    elif name.endswith(".tar"):  # an OCI archive
        with tarfile.open(artefact) as tar:
            for member in tar:
                if member.isfile():
                    data = tar.extractfile(member).read()
                    if data[:2] == b"\x1f\x8b":
                        data = gzip.decompress(data)
                    blob = tmp / "blob"
                    blob.write_bytes(data)
                    yield f"{name}:{member.name}", blob
                    blob.unlink()
    elif _magic(artefact) in DECOMPRESS:  # an initrd
        yield f"{name} (decompressed)", _pipe([*DECOMPRESS[_magic(artefact)], str(artefact)])
    else:
        yield name, artefact


DECOMPRESS = {b"\x1f\x8b": ["gzip", "-dc"], b"\x28\xb5": ["zstd", "-dcq"], b"\xfd7": ["xz", "-dc"]}


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(2)
