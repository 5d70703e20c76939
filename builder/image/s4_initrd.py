"""Stage 4 — kernel and initrd: the natively extracted kernel into the tree (only the modules the
target and role list), and a tiny initramfs written by Python, no mkinitramfs.

Debian's mkinitramfs inside an emulated arm64 chroot takes over ten minutes
here.  Our initrd needs only a static busybox (extracted from Debian's
busybox-static for the target arch), the few modules that reach the root
filesystem (closure from modules.dep / modules.softdep) and a short init
script.  It is a plain newc cpio with fixed timestamps: reproducible,
arch-independent to build, and built in well under a second.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import SohoError
from ..proc import run
from .cache import digest
from .config import BuildConfig

log = logging.getLogger("sohocloud.initrd")

INIT_SCRIPT = Path(__file__).with_name("initrd") / "init.sh"
UDHCPC_SCRIPT = Path(__file__).with_name("initrd") / "udhcpc.sh"  # the netboot branch's DHCP lease script


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules_dir: Path


def find_kernel(root: Path) -> Kernel:
    mods = sorted((root / "lib/modules").iterdir()) if (root / "lib/modules").is_dir() else []
    if len(mods) != 1:
        raise SohoError(f"expected exactly one kernel in {root}/lib/modules, found {[m.name for m in mods]}")
    version = mods[0].name
    vmlinuz = root / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.is_file():
        raise SohoError(f"kernel image {vmlinuz} missing")
    return Kernel(version, vmlinuz, mods[0])


def module_selected(rel: str, patterns: tuple[str, ...]) -> bool:
    """Is kernel/<rel> inside one of the listed subtrees (globs like arch/*/crypto/chacha*)?"""
    return any(fnmatch.fnmatchcase(rel, p.strip("/")) or fnmatch.fnmatchcase(rel, p.strip("/") + "/*")
               for p in patterns)


def kernel_members(names: list[str], module_paths: tuple[str, ...]) -> list[str]:
    """Members of the kernel stage's tar to unpack: all but the modules outside the listed subtrees."""
    out = []
    for name in names:
        parts = name.removeprefix("./").split("/")
        if parts[:2] == ["lib", "modules"] and len(parts) > 4 and parts[3] == "kernel":
            if not module_selected("/".join(parts[4:]), module_paths):
                continue
        out.append(name)
    return out


def install_kernel(root: Path, kernel_tar: Path, work: Path, module_paths: tuple[str, ...]) -> dict[str, str]:
    """Put the natively extracted kernel (the kernel stage's tar) into the image tree: the kernel
    image, the module indexes and only the modules below the listed subtrees of kernel/ (the
    rest is never unpacked), then the host's depmod. DTBs stay in *work* for a board's boot
    partition (stage 5), not in the root. Returns {package: version}."""
    names = run(["tar", "-tf", kernel_tar], capture=True).stdout.splitlines()
    members = work.with_name(work.name + ".members")
    members.write_text("\n".join(kernel_members(names, module_paths)) + "\n")
    work.mkdir()
    run(["tar", "--numeric-owner", "--no-recursion", "-xpf", kernel_tar, "-C", work, "-T", members])
    mods = sorted((work / "lib/modules").iterdir())
    if len(mods) != 1:
        raise SohoError(f"expected exactly one kernel in the kernel package, found {[m.name for m in mods]}")
    version = mods[0].name
    dest = root / "lib/modules" / version  # /lib is /usr/lib in a merged-/usr tree
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(mods[0], dest)
    (root / "boot").mkdir(exist_ok=True)
    for f in (work / "boot").iterdir():
        shutil.copy2(f, root / "boot" / f.name)
    run(["depmod", "-b", root, version])
    log.info("kernel: %s, %d modules", version, sum(1 for _ in (dest / "kernel").rglob("*.ko*")))
    return parse_package_versions((work / "packages").read_text())


def parse_package_versions(text: str) -> dict[str, str]:
    """`Package:`/`Version:` line pairs -> {package: version}."""
    out, name = {}, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Package":
            name = value.strip()
        elif key == "Version" and name:
            out[name] = value.strip()
    return out


def _modname(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", name)
    return name.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {modname: (path, [dependency paths])}."""
    out = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        out[_modname(path)] = (path.strip(), deps.split())
    return out


def parse_softdeps(text: str) -> dict[str, list[str]]:
    """modules.softdep -> {modname: [modules to load before it]}."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "softdep":
            continue
        mod, pre, rest = _modname(parts[1]), [], parts[2:]
        mode = None
        for tok in rest:
            if tok in ("pre:", "post:"):
                mode = tok
            elif mode == "pre:":
                pre.append(_modname(tok))
        out[mod] = pre
    return out


def module_closure(wanted: list[str], dep: dict[str, tuple[str, list[str]]], builtin: set[str],
                   softdep: dict[str, list[str]] | None = None) -> list[str]:
    """Module paths to insmod, dependencies first; builtin modules are skipped.

    A wanted module that is neither a module nor builtin is an error; a
    missing soft dependency is not (it is optional by definition).
    """
    softdep = softdep or {}
    by_path = {v[0]: k for k, v in dep.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, required: bool) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name not in dep:
            if name in builtin or not required:
                return
            raise SohoError(f"initrd module '{name}' is not in this kernel (not in modules.dep nor builtin); "
                            "is its directory listed under kernel_modules?")
        seen.add(name)
        for pre in softdep.get(name, []):
            visit(pre, False)
        path, deps = dep[name]
        for d in reversed(deps):  # modules.dep lists the deepest dependency last
            visit(by_path.get(d, _modname(d)), True)
        order.append(path)

    for w in wanted:
        visit(w, True)
    return order


# --------------------------------------------------------------------------- cpio


class Cpio:
    """Minimal newc writer (what the kernel's initramfs unpacker reads)."""

    def __init__(self, mtime: int):
        self.mtime = mtime
        self.chunks: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, nlink, self.mtime, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.ino += 1
        blob = hdr.encode() + name_b
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self.chunks.append(blob)

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def bytes(self) -> bytes:
        trailer = Cpio(0)
        trailer.ino = 0
        trailer._entry("TRAILER!!!", 0)
        data = b"".join(self.chunks) + trailer.chunks[0]
        return data + b"\0" * (-len(data) % 512)


def build_initrd(root: Path, bootfiles: Path, busybox_rel: str, modules: list[str], out: Path,
                 mtime: int) -> dict[str, object]:
    """Write the initrd for the kernel in *root* to *out*. Returns facts for the manifest."""
    kernel = find_kernel(root)
    mdir = kernel.modules_dir
    dep = parse_modules_dep((mdir / "modules.dep").read_text())
    builtin = {_modname(x) for x in (mdir / "modules.builtin").read_text().split()} \
        if (mdir / "modules.builtin").is_file() else set()
    softdep = parse_softdeps((mdir / "modules.softdep").read_text()) if (mdir / "modules.softdep").is_file() else {}
    order = module_closure(modules, dep, builtin, softdep)
    busybox = bootfiles / busybox_rel
    if not busybox.is_file():
        raise SohoError(f"static busybox not found at {busybox_rel} in the boot packages")

    c = Cpio(mtime)
    for d in ("bin", "dev", "proc", "sys", "root", "run", "tmp", "etc", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    c.file("etc/udhcpc.script", UDHCPC_SCRIPT.read_bytes(), 0o755)
    made: set[str] = set()
    for rel in order:
        parts = Path(rel).parts
        for i in range(1, len(parts)):
            d = "lib/modules/" + "/".join(parts[:i])
            if d not in made:
                c.dir(d)
                made.add(d)
        c.file(f"lib/modules/{rel}", (mdir / rel).read_bytes())
    c.file("etc/modules-load", ("\n".join(order) + "\n").encode())
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(c.bytes())
    os.replace(tmp, out)
    log.info("initrd: %d modules, %.1f MiB", len(order), out.stat().st_size / 2**20)
    return {"kernel": kernel.version, "initrd_modules": order}


# --------------------------------------------------------------------------- the stage


def initrd_inputs(cfg: BuildConfig) -> str:
    """What the initrd is made of (an input of the artefact)."""
    return digest([list(cfg.target.initrd_modules), INIT_SCRIPT.read_text(), UDHCPC_SCRIPT.read_text(),
                   sorted(cfg.arch_spec.boot_packages)])


@dataclass(frozen=True)
class KernelFiles:
    """What stage 4 hands the assembler of a node target: the kernel and our initrd (outside the
    tree), the kernel's DTB folder (for a board's boot partition) and the manifest's facts."""

    version: str
    vmlinuz: Path
    initrd: Path
    dtb_dir: Path
    initrd_modules: list[str]


def make_kernel_and_initrd(cfg: BuildConfig, root: Path, boot: Path, kernel_tree: Path, work: Path,
                           epoch: int) -> KernelFiles:
    """Our initrd for the kernel in *root* (written to *work*), and the kernel moved out of the
    tree to *work*: it lives on the boot partition or beside the netboot set; the root keeps
    its modules only."""
    kernel = find_kernel(root)
    initrd = work / "initrd.img"
    facts = build_initrd(root, boot, cfg.arch_spec.busybox, list(cfg.target.initrd_modules), initrd, epoch)
    vmlinuz = work / "vmlinuz"
    shutil.copyfile(kernel.vmlinuz, vmlinuz)
    for p in (root / "boot").glob("*"):
        if p.is_file() or p.is_symlink():
            p.unlink()
    return KernelFiles(kernel.version, vmlinuz, initrd, kernel_tree / "usr/lib" / f"linux-image-{kernel.version}",
                       facts["initrd_modules"])
