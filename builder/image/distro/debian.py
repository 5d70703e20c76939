"""The Debian backend: stage 2's base trees with mmdebstrap, and what a tree has installed (dpkg).

What keeps it fast:
- no recommends; docs/man/locales are never unpacked (dpkg path-exclude);
- the kernel is not installed there at all: kernel() extracts its package natively (no
  postinst, no emulated depmod or decompression), and stage 4 copies in only the modules the
  target and role list, then runs the host's depmod (it reads foreign-arch modules alike).
  The rootfs thus does not depend on the target: an arm64 role's tree serves qemu, rpi4 and rock64;
- foreign arch (qemu-user): dpkg's hot helpers run as native code during the install
  (debian-native/: dpkg-deb's decompression, dpkg-split's probe, rm, basename via a static
  busybox of the host's arch; the host's dash as /bin/sh and the host's perl for the
  maintainer scripts when they are the image's versions), and two pure wastes are skipped
  (host keys the image never keeps; byte-compiling, which compile_python_in_tar does natively
  afterwards). They live in /.sohocloud-native for the install only and are gone before the
  tree is packed;
- the shared package cache is hard-linked in and out, so a rebuild downloads no .deb (a bind
  mount would let mmdebstrap's error cleanup empty the cache).
"""

from __future__ import annotations

import compileall
import dataclasses
import logging
import os
import py_compile
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ...proc import run
from ...progress import step
from ..cache import StageCache, StageResult, digest, extract_tar, hash_tree, locked
from ..identity import source_date_epoch
from ..config import BuildConfig
from .foreign import HOST_ARCH, check_foreign_arch, is_foreign

log = logging.getLogger("sohocloud.rootfs")

name = "debian"  # this module is the DistroBackend of `distro: {name: debian}` profiles (backend.py)

MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")


def host_tools() -> tuple[str, ...]:
    return ("mmdebstrap", "depmod")


def mmdebstrap_version() -> str:
    return run(["mmdebstrap", "--version"], capture=True).stdout.strip()


def apt_sources(d) -> list[str]:
    """The image's apt sources: the suite, its -updates and -security (one-line format)."""
    comps = " ".join(d.components)
    lines = [f"deb {d.mirror} {d.suite} {comps}"]
    if d.updates:
        lines.append(f"deb {d.mirror} {d.suite}-updates {comps}")
    if d.security_mirror:
        lines.append(f"deb {d.security_mirror} {d.suite}-security {comps}")
    return lines


def rootfs_inputs(cfg: BuildConfig) -> dict[str, str]:
    d = cfg.profile.distro
    return {
        "distro": digest([d.name, d.suite, d.mirror, list(d.components), d.variant, apt_sources(d)]),
        "arch": cfg.arch,
        "packages": digest(sorted(cfg.all_packages())),
        "dpkg-filters": digest([cfg.profile.dpkg_exclude, cfg.profile.dpkg_include]),
        "backend": digest([mmdebstrap_version(), _code_hash()]),
    }


def _code_hash() -> str:
    return digest([Path(__file__).read_text(), hash_tree(NATIVE_HELPERS)])


NATIVE_HELPERS = Path(__file__).with_name("debian-native")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the distro's tools only
NATIVE_DIR = "/.sohocloud-native"  # inside the tree during the install only
NATIVE_APPLETS = ("rm", "basename")  # busybox applets that stand in for coreutils there


def _cache_hooks(pkg_cache: Path, *, sync_out_hook: str) -> list[str]:
    """mmdebstrap options that hard-link the package cache in and out of the chroot."""
    debs, lists = shlex.quote(str(pkg_cache / "debs")), shlex.quote(str(pkg_cache / "lists"))
    link_in = (
        'mkdir -p "$1/var/cache/apt/archives/partial" "$1/var/lib/apt/lists/partial"; '
        f'cp -al {debs}/. "$1/var/cache/apt/archives/" 2>/dev/null || cp -a {debs}/. "$1/var/cache/apt/archives/"; '
        f'cp -a {lists}/. "$1/var/lib/apt/lists/"'
    )
    link_out = (
        f'for f in "$1"/var/cache/apt/archives/*.deb; do [ -e {debs}/"${{f##*/}}" ] || '
        f'cp -al "$f" {debs}/ 2>/dev/null || cp -a "$f" {debs}/; done; '
        f'cp -a "$1"/var/lib/apt/lists/*_InRelease "$1"/var/lib/apt/lists/*_Packages* {lists}/ 2>/dev/null; true'
    )
    return [f"--setup-hook={link_in}", f"{sync_out_hook}={link_out}"]


def _native_helper_opts(helpers: Path) -> list[str]:
    """mmdebstrap options that put debian-native/ (+ a host busybox) first on dpkg's PATH for
    the install, and take them out again before the tree is packed."""
    src = shlex.quote(str(helpers))
    links = " ".join(f'ln -s busybox "$1{NATIVE_DIR}/{a}";' for a in NATIVE_APPLETS)
    return [
        f'--extract-hook=mkdir -p "$1{NATIVE_DIR}" && cp -a {src}/. "$1{NATIVE_DIR}/" && {links} '
        f'sh {src}/sh-shadow.sh "$1" && sh {src}/perl-shadow.sh "$1"',
        f'--aptopt=DPkg::Path "{NATIVE_DIR}:/usr/sbin:/usr/bin:/sbin:/bin"',
        f'--essential-hook=sh {src}/stdlib-compile-divert.sh "$1"',
        f'--customize-hook=sh {src}/perl-shadow-undo.sh "$1" && sh {src}/stdlib-compile-undo.sh "$1" '
        f'&& sh {src}/sh-shadow-undo.sh "$1" && rm -rf "$1{NATIVE_DIR}"',
    ]


def _mmdebstrap(d, arch: str, cache: StageCache, out: Path, *, variant: str, packages: tuple[str, ...],
                extra: list[str], fmt: str = "tar", native: Path | None = None) -> None:
    """One mmdebstrap run for distro *d* and *arch*; *native*: a helper dir (see _native_helper_opts)."""
    pkg_cache = cache.packages(d.name, d.suite, arch)
    # The extract variant runs no customize hooks: sync the cache out after extracting.
    sync_hook = "--extract-hook" if variant == "extract" else "--customize-hook"
    if native is not None:
        extra = extra + _native_helper_opts(native)
    cmd = [
        "mmdebstrap",
        f"--variant={variant}",
        "--mode=root",
        f"--format={fmt}",
        f"--architectures={arch}",
        f"--components={','.join(d.components)}",
        "--skip=essential/unlink",
        "--aptopt=APT::Install-Recommends \"false\"",
        "--aptopt=Acquire::Languages \"none\"",
        f"--include={','.join(packages)}",
        *_cache_hooks(pkg_cache, sync_out_hook=sync_hook),
        *extra,
        d.suite,
        str(out),
        *apt_sources(d),
    ]
    # The system PATH, not the caller's: mmdebstrap starts `#!/usr/bin/env python3` helpers
    # (mmtarfilter, once per essential package) and a user's version-manager shim there
    # (pyenv's costs 0.1 s a start) must not slow or change the build.
    env = {"INITRD": "No", "TMPDIR": str(cache.tmp), "SOURCE_DATE_EPOCH": source_date_epoch(), "PATH": SYSTEM_PATH}
    if native is not None:  # mmdebstrap's own dpkg --install of the essential set uses this PATH
        env["PATH"] = f"{NATIVE_DIR}:{SYSTEM_PATH}"
    # One mmdebstrap per package cache at a time: apt's lists are shared.
    with locked(pkg_cache / ".lock"):
        suites = [line.split()[2] for line in apt_sources(d)]
        fresh = lists_are_fresh(pkg_cache / "lists", suites, d.components)
        if fresh:
            cmd.insert(1, "--skip=update")
        run(cmd, env=env, timeout=3600)
        if not fresh:
            (pkg_cache / "lists" / STAMP).touch()


STAMP = ".sohocloud-updated"


def lists_are_fresh(lists: Path, suites: list[str], components: tuple[str, ...] = ("main",)) -> bool:
    """apt lists fetched less than SOHOCLOUD_APT_MAX_AGE hours ago (default 24), for every
    suite and component of the sources, are reused without `apt-get update`: a rebuild then
    touches no network."""
    stamp = lists / STAMP
    max_age = float(os.environ.get("SOHOCLOUD_APT_MAX_AGE", "24")) * 3600
    if not stamp.is_file() or not any(lists.glob("*_Packages*")):
        return False
    if not all(any(lists.glob(f"*_dists_{suite}_InRelease")) for suite in suites):
        return False
    if not all(any(lists.glob(f"*_dists_{suites[0]}_{c}_binary-*_Packages*")) for c in components):
        return False
    return time.time() - stamp.stat().st_mtime < max_age


def rootfs(cfg: BuildConfig, cache: StageCache, *, use_cache: bool = True) -> StageResult:
    inputs = rootfs_inputs(cfg)
    key = digest(inputs)

    def make(out: Path) -> None:
        p = cfg.profile
        extra = [f"--dpkgopt=path-exclude={x}" for x in p.dpkg_exclude]
        extra += [f"--dpkgopt=path-include={x}" for x in p.dpkg_include]
        if MERGED_USR_HOOKS.is_dir():
            extra.append(f"--hook-dir={MERGED_USR_HOOKS}")
        native = None
        if is_foreign(cfg.arch):
            check_foreign_arch(cfg.arch)
            native = _native_helpers(cfg, cache, use_cache=use_cache)
        how = " (qemu-user, native helpers)" if native else ""
        with step(f"rootfs: mmdebstrap {p.distro.suite} {cfg.arch}{how}, {len(cfg.all_packages())} packages"):
            _mmdebstrap(p.distro, cfg.arch, cache, out, variant=p.distro.variant, packages=cfg.all_packages(),
                        extra=extra, native=native)
        if native:
            with step("rootfs: byte-compiling Python natively"):
                compile_python_in_tar(out, cache)

    return cache.produce("rootfs", key, "rootfs.tar", inputs, make, use_cache=use_cache)


def _native_helpers(cfg: BuildConfig, cache: StageCache, *, use_cache: bool) -> Path:
    """debian-native/ plus a static busybox of the host's arch (from Debian's busybox-static), in a cache dir."""
    d = cfg.profile.distro
    inputs = {"distro": digest(apt_sources(d)), "arch": HOST_ARCH, "helpers": hash_tree(NATIVE_HELPERS)}
    key = digest(inputs)

    def make(out: Path) -> None:
        with step(f"native helpers: busybox-static for {HOST_ARCH}"):
            _mmdebstrap(d, HOST_ARCH, cache, out, variant="extract", packages=("busybox-static",), extra=[])

    tar = cache.produce("native", key, "busybox.tar", inputs, make, use_cache=use_cache)
    helpers = tar.path.parent / "helpers"
    if not (helpers / "busybox").is_file():
        tmp = tar.path.parent / ".helpers.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        run(["tar", "-xf", tar.path, "-C", tmp, "./bin/busybox"])
        shutil.copytree(NATIVE_HELPERS, tmp / "h", symlinks=True)
        os.replace(tmp / "bin/busybox", tmp / "h/busybox")
        try:
            os.replace(tmp / "h", helpers)
        except OSError:
            if not (helpers / "busybox").is_file():  # not a concurrent build that got there first
                raise
        shutil.rmtree(tmp)
    return helpers


def compile_python_in_tar(tar: Path, cache: StageCache) -> None:
    """Byte-compile what the install left uncompiled (native_helpers' py3compile and the stdlib
    wrapper skip it): the standard library, as python3.11-minimal's postinst would, and
    dist-packages, as py3compile would. With the host's Python when it is the image's version
    (bytecode is the same on every CPU): only the Python trees are unpacked and the .pyc files
    appended to the tar (*tar* is the stage's own temp output). Else with the image's own
    Python through qemu-user, in a whole unpacked tree."""
    names = run(["tar", "-tf", tar], capture=True).stdout.splitlines()
    wanted = [n for n in names if re.match(r"\./(usr/lib/python3[./]|etc/python3)", n)]
    tag = image_python_tag_from_names(names)
    if tag is None:
        return
    work = Path(tempfile.mkdtemp(prefix="pyc.", dir=cache.tmp))
    try:
        if tag != sys.implementation.cache_tag:
            log.info("rootfs: image Python %s differs from ours (%s): compiling it under emulation", tag,
                     sys.implementation.cache_tag)
            extract_tar(tar, work)
            run(["chroot", work, "/usr/bin/python3", "-m", "compileall", "-q", *_python_dirs(work, "/")])
            tmp = tar.with_name(tar.name + ".tmp")
            run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name",
                 f"--mtime=@{source_date_epoch()}", "--clamp-mtime", "-cf", tmp, "-C", work, "."])
            os.replace(tmp, tar)
            return
        run(["tar", "--numeric-owner", "--no-recursion", "-xpf", tar, "-C", work, "-T", "-"],
            input="\n".join(wanted) + "\n")
        before = {p for p in work.rglob("*")}
        for d in _python_dirs(work, str(work)):
            # rx: links out of the tree (sitecustomize.py -> /etc/...) would be read from the host's
            # /etc; _compile_tree_links compiles them from the tree's own target.
            compileall.compile_dir(d, quiet=1, stripdir=str(work), prependdir="/", workers=2,
                                   rx=_PYC_SKIP, invalidation_mode=_PYC_MODE)
            _compile_tree_links(work, Path(d), tag)
        added = sorted(p for p in work.rglob("*") if p not in before)
        for p in added:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if added:
            run(["tar", "--numeric-owner", "--owner=0", "--group=0", "--no-recursion",
                 f"--mtime=@{source_date_epoch()}", "--clamp-mtime", "-rf", tar, "-C", work, "-T", "-"],
                input="\n".join("./" + str(p.relative_to(work)) for p in added) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def image_python_tag_from_names(names: list[str]) -> str | None:
    """cache_tag of the image's python3 (e.g. cpython-311), from the tar's member names."""
    found = sorted({m[1] for n in names if (m := re.match(r"\./usr/lib/python(3\.[0-9]+)/?$", n))},
                   key=lambda v: tuple(int(x) for x in v.split(".")))
    if not found:
        return None
    major, minor = found[-1].split(".")
    return f"cpython-{major}{minor}"


def _python_dirs(root: Path, prefix: str) -> list[str]:
    """The trees python3.X's postinsts and py3compile compile, as paths under *prefix*."""
    rels = [p.relative_to(root) for p in (*sorted(root.glob("usr/lib/python3.[0-9]*")),
                                          root / "usr/lib/python3/dist-packages") if p.is_dir()]
    return [str(Path(prefix) / r) for r in rels]


_PYC_SKIP = re.compile(r"/sitecustomize\.py$")
# What the maintainer scripts' own compiling writes with SOURCE_DATE_EPOCH set (as in our
# mmdebstrap run): checked-hash .pyc, valid whatever the file times.
_PYC_MODE = py_compile.PycInvalidationMode.CHECKED_HASH


def _compile_tree_links(root: Path, d: Path, tag: str) -> None:
    """Byte-compile the .py links in *d* that _PYC_SKIP left out, reading their target inside
    *root*; a dangling one stays uncompiled, as python3.11-minimal's postinst leaves it."""
    for link in (p for p in d.glob("sitecustomize.py") if p.is_symlink()):
        target = os.readlink(link)
        src = root / target.lstrip("/") if target.startswith("/") else link.parent / target
        if src.is_file():
            py_compile.compile(str(src), cfile=str(d / "__pycache__" / f"{link.stem}.{tag}.pyc"),
                               dfile="/" + str(link.relative_to(root)), doraise=True,
                               invalidation_mode=_PYC_MODE)


def kernel_inputs(cfg: BuildConfig) -> dict[str, str]:
    return {
        "distro": digest(apt_sources(cfg.profile.distro)),
        "arch": cfg.arch,
        "package": cfg.arch_spec.kernel_package,
        "backend": _code_hash(),
    }


# Run on the host in mmdebstrap's extract hook: keep the kernel's own files and
# what apt chose (name, version) for the manifest. Nothing of the package runs.
_KERNEL_HOOK = r"""set -e
r="$1"; out={out}
mkdir -p "$out/boot" "$out/lib/modules" "$out/usr/lib"
cp -a "$r"/boot/vmlinuz-* "$r"/boot/config-* "$out/boot/"
cp -a "$r"/lib/modules/. "$out/lib/modules/"
for d in "$r"/usr/lib/linux-image-*; do if [ -d "$d" ]; then cp -a "$d" "$out/usr/lib/"; fi; done
for p in {package} $(ls "$r/lib/modules" | sed 's/^/linux-image-/'); do
  APT_CONFIG="$MMDEBSTRAP_APT_CONFIG" apt-cache show --no-all-versions "$p" | grep -E '^(Package|Version):'
done > "$out/packages"
"""


def kernel(cfg: BuildConfig, cache: StageCache, *, use_cache: bool = True) -> StageResult:
    """The target's kernel package, extracted natively (kernel, modules, DTBs) into a tar."""
    inputs = kernel_inputs(cfg)
    key = digest(inputs)

    def make(out: Path) -> None:
        staging = out.with_name("kernel")
        staging.mkdir()
        hook = _KERNEL_HOOK.format(out=shlex.quote(str(staging)), package=shlex.quote(cfg.arch_spec.kernel_package))
        with step(f"kernel: extracting {cfg.arch_spec.kernel_package} ({cfg.arch})"):
            _mmdebstrap(cfg.profile.distro, cfg.arch, cache, Path("/dev/null"), variant="extract", fmt="null",
                        packages=(cfg.arch_spec.kernel_package,), extra=[f"--extract-hook={hook}"])
            run(["tar", "--numeric-owner", "-cf", out, "-C", staging, "."])
        shutil.rmtree(staging)

    return cache.produce("kernel", key, "kernel.tar", inputs, make, use_cache=use_cache)


def bootfiles(cfg: BuildConfig, cache: StageCache, *, use_cache: bool = True) -> StageResult:
    """Boot-time blobs (UEFI loader, static busybox, board firmware) extracted, never installed or emulated."""
    d = cfg.profile.distro
    d = dataclasses.replace(d, components=tuple(dict.fromkeys(d.components + cfg.target.boot_components)))
    inputs = {
        "distro": digest(apt_sources(d)),
        "arch": cfg.arch,
        "packages": digest(sorted(cfg.arch_spec.boot_packages)),
        "backend": _code_hash(),
    }
    key = digest(inputs)

    def make(out: Path) -> None:
        with step(f"bootfiles: extracting {', '.join(cfg.arch_spec.boot_packages)}"):
            _mmdebstrap(d, cfg.arch, cache, out, variant="extract",
                        packages=cfg.arch_spec.boot_packages, extra=[])

    return cache.produce("bootfiles", key, "boot.tar", inputs, make, use_cache=use_cache)


def installed_packages(root: Path) -> dict[str, str]:
    """name -> version from the tree's dpkg status."""
    status = root / "var/lib/dpkg/status"
    pkgs: dict[str, str] = {}
    name = version = None
    installed = False
    for line in status.read_text().splitlines() + [""]:
        if not line:
            if name and version and installed:
                pkgs[name] = version
            name = version = None
            installed = False
        elif line.startswith("Package: "):
            name = line[9:]
        elif line.startswith("Version: "):
            version = line[9:]
        elif line.startswith("Status: "):
            installed = line.endswith(" installed")
    return dict(sorted(pkgs.items()))
