#!/usr/bin/env python3
"""The content listing of a built disk image: one line per file of each partition.

    python3 tests/image_listing.py out/router-debian-amd64-qemu.qcow2 > router.listing

Each line: partition, path, type, mode, owner, size, and the sha256 of the content (a link's
target for a symlink). Two builds compared with `diff` show the files that differ, what
differs, and nothing else (no times: they say nothing of what a node runs). The partitions come
from the image's manifest; ext4 is read with debugfs (rdump keeps modes and owners), FAT with
mtools. Needs root (debugfs restores owners).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1 << 20


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout


def raw_partition(image: Path, part: dict, dest: Path) -> Path:
    fmt = "qcow2" if image.name.endswith(".qcow2") else "raw"
    run("qemu-img", "dd", "-f", fmt, "-O", "raw", f"bs={MIB}", f"skip={part['start'] // MIB}",
        f"count={part['size'] // MIB}", f"if={image}", f"of={dest}")
    return dest


def tree_lines(name: str, root: Path) -> list[str]:
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for entry in sorted(dirnames + filenames):
            p = Path(dirpath) / entry
            st = p.lstat()
            rel = "/" + p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                what, content = "link", os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                what, content = "dir", "-"
            elif stat.S_ISREG(st.st_mode):
                what, content = "file", hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what, content = "special", f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            size = st.st_size if what == "file" else 0
            lines.append(f"{name} {rel} {what} {stat.S_IMODE(st.st_mode):04o} {st.st_uid}:{st.st_gid} {size} {content}")
    return lines


def listing(image: Path) -> list[str]:
    manifest = json.loads(image.with_name(image.name + ".manifest.json").read_text())
    if image.name.endswith(".xz"):
        raise SystemExit(f"{image}: unpack a card image first (bmaptool copy ... IMAGE.img)")
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="listing.") as d:
        for part in manifest["partitions"]:
            raw = raw_partition(image, part, Path(d) / f"{part['name']}.raw")
            tree = Path(d) / part["name"]
            tree.mkdir()
            if part["type"] == "root":
                run("debugfs", "-R", f"rdump / {tree}", raw)
                tree = tree / next(iter(os.listdir(tree)), "") if len(os.listdir(tree)) == 1 and \
                    not (tree / "etc").exists() else tree
            else:
                run("mcopy", "-s", "-n", "-m", "-i", raw, "::/", tree)
            out += tree_lines(part["name"], tree)
            raw.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", type=Path)
    args = ap.parse_args()
    sys.stdout.write("".join(line + "\n" for line in listing(args.image)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
