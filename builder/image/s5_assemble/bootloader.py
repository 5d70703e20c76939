"""What goes onto a boot partition or beside a netboot set: systemd-boot and its entry, a board's
firmware files, DTBs and rendered boot templates (config.txt, extlinux.conf, boot.ipxe, ...)."""

from __future__ import annotations

from pathlib import Path

import jinja2

from ...errors import SohoError


def systemd_boot_files(loader: Path, fallback: str, kernel: Path, initrd: Path, cmdline: str,
                       title: str) -> dict[str, Path | bytes]:
    """The ESP of a systemd-boot disk: loader, one Boot Loader Spec entry, kernel, initrd."""
    entry = (f"title {title}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n").encode()
    return {
        fallback: loader,
        "loader/loader.conf": b"default sohocloud.conf\ntimeout 0\neditor no\nconsole-mode keep\n",
        "loader/entries/sohocloud.conf": entry,
        "vmlinuz": kernel,
        "initrd.img": initrd,
    }


def board_boot_files(target, boot_tree: Path, dtb_tree: Path, kernel: Path, initrd: Path, cmdline: str,
                     templates: Path | None, context: dict) -> dict[str, Path | bytes]:
    """A board's boot partition: firmware files, DTBs, kernel, initrd and the rendered boot
    templates (config.txt, extlinux.conf, ...), all named by the target's data."""
    files: dict[str, Path | bytes] = {}

    def add(entries, tree: Path, what: str) -> list[str]:
        placed = []
        for e in entries:
            matches = sorted(tree.glob(e.src))
            if not matches:
                raise SohoError(f"{what} {e.src}: not found in {tree.name} (is its package in the target's list?)")
            if len(matches) > 1 and not e.dest.endswith("/"):
                raise SohoError(f"{what} {e.src} matches {len(matches)} files: its dest must be a folder (end in /)")
            for m in matches:
                dest = e.dest + m.name if e.dest.endswith("/") else e.dest
                files[dest.lstrip("/")] = m
                placed.append(dest.lstrip("/"))
        return placed

    add(target.boot_files, boot_tree, "boot file")
    dtbs = add(target.dtb_files, dtb_tree, "device tree")
    files[target.kernel_file] = kernel
    files[target.initrd_file] = initrd
    if templates is not None:
        files.update(render_templates(templates, dict(context, kernel=target.kernel_file, initrd=target.initrd_file,
                                                      cmdline=cmdline, dtbs=dtbs, vars=target.vars)))
    return files


def render_templates(templates: Path, context: dict) -> dict[str, Path | bytes]:
    """A target's template folder: *.j2 rendered (and named without the suffix), other files as they are."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    out: dict[str, Path | bytes] = {}
    for p in sorted(templates.rglob("*")):
        if p.is_file():
            rel = p.relative_to(templates).as_posix()
            out[rel.removesuffix(".j2")] = env.get_template(rel).render(**context).encode() if rel.endswith(".j2") \
                else p
    return out


BOOTLOADERS = {"systemd-boot": systemd_boot_files}


def netboot_files(templates: Path, context: dict) -> dict[str, bytes]:
    """The boot scripts of a netboot set (boot.ipxe, ...): the target's templates rendered."""
    return {rel: data if isinstance(data, bytes) else data.read_bytes()
            for rel, data in render_templates(templates, context).items()}
