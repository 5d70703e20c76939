"""The `sohocloud` command: parses the command line and hands each verb to the package that does it
(image/: list, build; machine/: boot, flash; seed.py: seed; fleet/: fleet build|up|test|ssh|down)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import SohoError
from .fleet.build import fleet_build
from .fleet.checks import CHECKS, FleetProbe, run_checks
from .fleet.leaks import find_secrets, site_artefacts, site_needles
from .fleet.audit import fleet_audit
from .fleet.renew import fleet_renew
from .fleet.record import load_built, site_name_of
from .fleet.running import FleetPaths, booted_record, check_root, fleet_down, fleet_ssh_argv
from .fleet.sitefile import NAME_RE
from .fleet.up import fleet_up
from .image.cache import StageCache
from .image.config import Repo
from .image.pipeline import build, check_build_host
from .image.s1_resolve import buildable, resolve
from .machine.boot import boot_interactive
from .machine.flash import flash
from .proc import CommandError
from .progress import setup_logging
from .seed import write_admin_seed

# --------------------------------------------------------------------------- verbs


def cmd_list(args: argparse.Namespace) -> int:
    for role, target, arch in buildable(Repo.default()):
        print(f"{role:18} --target {target:8} --arch {arch}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    cfg = resolve(Repo.default(), args.role, target=args.target, arch=args.arch, distro=args.distro)
    check_build_host([cfg])
    result = build(cfg, Path(args.output), cache=StageCache(), use_cache=not args.no_cache, explain=args.explain)
    print(result.artefact)
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    print(write_admin_seed(args.hostname, Path(args.ssh_key), Path(args.output), lan_address=args.lan_address))
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    return boot_interactive(Path(args.image), seed=Path(args.seed) if args.seed else None,
                            ssh_port=args.ssh_port, firmware=args.firmware, memory=args.memory)


def cmd_flash(args: argparse.Namespace) -> int:
    flash(Path(args.image), Path(args.device), seed=Path(args.seed) if args.seed else None, force=args.force)
    return 0


def cmd_fleet_build(args: argparse.Namespace) -> int:
    print(fleet_build(Repo.default(), args.site, Path(args.output), Path(args.secrets), use_cache=not args.no_cache))
    return 0


def cmd_fleet_up(args: argparse.Namespace) -> int:
    record, site_file = load_built(Path(args.output), Repo.default().root, args.site)
    check_root()
    times = fleet_up(record, site_file, Path(args.output), memory=args.memory, reimage=tuple(args.reimage),
                     only=tuple(args.only))
    for name, seconds in times.items():
        print(f"{name}\tup (SSH after {seconds:.1f} s)")
    return 0


def cmd_fleet_test(args: argparse.Namespace) -> int:
    name, _file = site_name_of(Repo.default().root, args.site)
    probe = FleetProbe.open(name, Path(args.output), Path(args.secrets) / name, args.identity)
    names = args.only or list(CHECKS)
    failed = run_checks(probe, names)
    print(f"{name}: {len(names) - len(failed)}/{len(names)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_fleet_scan(args: argparse.Namespace) -> int:
    """Every artefact the site was built from, searched for every one of its secrets."""
    record, _file = load_built(Path(args.output), Repo.default().root, args.site)
    artefacts = site_artefacts(record, Path(args.output))
    found = find_secrets(artefacts, site_needles(Path(args.secrets) / record.site.name))
    for where, names in found.items():
        print(f"LEAK  {where}: {', '.join(names)}")
    print(f"{record.site.name}: {len(artefacts)} artefact(s) searched, "
          + (f"{len(found)} hold site secrets" if found else "no site secret in any"))
    return 1 if found else 0


def cmd_fleet_renew(args: argparse.Namespace) -> int:
    name, _file = site_name_of(Repo.default().root, args.site)
    probe = FleetProbe.open(name, Path(args.output), Path(args.secrets) / name, args.identity)
    for node, what in fleet_renew(probe, tuple(args.only)).items():
        print(f"{node}\t{what}")
    return 0


def cmd_fleet_audit(args: argparse.Namespace) -> int:
    name, _file = site_name_of(Repo.default().root, args.site)
    probe = FleetProbe.open(name, Path(args.output), Path(args.secrets) / name, args.identity)
    results = fleet_audit(probe, tuple(args.only))
    for result in results:
        print("\n".join(result.lines()))
    failed = [r.node for r in results if not r.passed]
    if failed:
        print(f"sohocloud: fleet audit: below its profile: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_fleet_down(args: argparse.Namespace) -> int:
    name, _file = site_name_of(Repo.default().root, args.site)
    check_root()
    stopped = fleet_down(FleetPaths(Path(args.output), name), name, tuple(args.only))
    print(f"{name}: stopped {', '.join(stopped) or 'nothing'}")
    return 0


def cmd_fleet_sessions(args: argparse.Namespace) -> int:
    """The site's desktop sessions, from its broker (over SSH, as the admin): list, or end one person's."""
    name, _file = site_name_of(Repo.default().root, args.site)
    paths = FleetPaths(Path(args.output), name)
    broker = booted_record(paths, name).provider("desktops")
    if broker is None:
        raise SohoError(f"site {name}: no node provides desktops (control's role does)")
    command = ["sudo", "sohocloud-desk", *(("end", args.end) if args.end else ("sessions",))]
    argv = fleet_ssh_argv(paths, name, broker.name, command, args.identity)
    os.execvp(argv[0], argv)
    return 127  # not reached


def person_name(text: str) -> str:
    """A site person's name (it goes into the remote command line: nothing else may)."""
    if not NAME_RE.match(text):
        raise argparse.ArgumentTypeError(f"expected a person's name from the site file, got {text!r}")
    return text


def cmd_fleet_ssh(args: argparse.Namespace) -> int:
    name, _file = site_name_of(Repo.default().root, args.site)
    argv = fleet_ssh_argv(FleetPaths(Path(args.output), name), name, args.node, args.after_dashes, args.identity)
    os.execvp(argv[0], argv)
    return 127  # not reached


# --------------------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sohocloud", description="Hardened Debian images per role, booted in QEMU.")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    sub = p.add_subparsers(dest="verb", required=True)
    sub.add_parser("list", help="roles x targets x arches that can be built").set_defaults(func=cmd_list)
    add_build(sub)
    add_seed(sub)
    add_boot(sub)
    add_flash(sub)
    fleet = sub.add_parser("fleet", help="a whole site: secrets, images, seeds")
    fsub = fleet.add_subparsers(dest="fleet_verb", required=True)
    add_fleet_build(fsub)
    add_fleet_up(fsub)
    add_fleet_test(fsub)
    add_fleet_scan(fsub)
    add_fleet_renew(fsub)
    add_fleet_audit(fsub)
    add_fleet_ssh(fsub)
    add_fleet_sessions(fsub)
    add_fleet_down(fsub)
    return p


def add_build(sub) -> None:
    s = sub.add_parser("build", help="build one role image")
    s.add_argument("role")
    s.add_argument("--arch", default="amd64")
    s.add_argument("--target", default="qemu")
    s.add_argument("--distro", default="debian")
    add_output(s)
    s.add_argument("--no-cache", action="store_true", help="rebuild every stage (the package cache stays)")
    s.add_argument("--explain", action="store_true", help="say which inputs changed since the last build")
    s.set_defaults(func=cmd_build)


def add_seed(sub) -> None:
    s = sub.add_parser("seed", help="write a NoCloud 'cidata' seed volume")
    s.add_argument("--hostname", required=True)
    s.add_argument("--ssh-key", required=True, help="public key file for the admin account")
    s.add_argument("--lan-address", help="static LAN address in CIDR form (default: the role's)")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_seed)


def add_boot(sub) -> None:
    s = sub.add_parser("boot", help="boot an image in QEMU with the serial console on this terminal")
    s.add_argument("image")
    s.add_argument("--seed", help="NoCloud seed volume (sohocloud seed)")
    s.add_argument("--ssh-port", type=int, default=2222, help="host port forwarded to SSH on the LAN side")
    s.add_argument("--firmware", choices=["direct", "uefi"], default="direct",
                   help="direct: kernel+initrd from the image's ESP (fast); uefi: OVMF + systemd-boot")
    s.add_argument("--memory", type=int, default=1024, help="MiB")
    s.set_defaults(func=cmd_boot)


def add_flash(sub) -> None:
    s = sub.add_parser("flash", help="write an SD card image (+ a node's seed) to a card, verified")
    s.add_argument("image", help="an .img.xz built by sohocloud (its .bmap and manifest next to it)")
    s.add_argument("device", help="the card's whole-disk device, e.g. /dev/sdX or /dev/mmcblk0")
    s.add_argument("--seed", help="NoCloud seed volume (sohocloud seed, or fleet build's per-node seed)")
    s.add_argument("--force", action="store_true",
                   help="write a device that does not report removable media (never a mounted or root disk)")
    s.set_defaults(func=cmd_flash)


def add_fleet_build(fsub) -> None:
    s = fsub.add_parser("build", help="secrets (once), each role image once, one seed per node")
    s.add_argument("site", help="site name (sites/<name>.yaml) or path to a site file")
    add_output(s)
    add_secrets(s)
    s.add_argument("--no-cache", action="store_true", help="rebuild every stage of every image (packages stay cached)")
    s.set_defaults(func=cmd_fleet_build)


def add_fleet_up(fsub) -> None:
    s = fsub.add_parser("up", help="boot the site on a private virtual LAN (router first)")
    s.add_argument("site")
    add_output(s)
    s.add_argument("--memory", type=int, default=1024, help="MiB per node")
    s.add_argument("--only", action="append", default=[], metavar="NODE",
                   help="boot only this node (repeatable); the others already up stay up")
    s.add_argument("--reimage", action="append", default=[], metavar="NODE",
                   help="start this node from a fresh root disk (its data disks stay; repeatable)")
    s.set_defaults(func=cmd_fleet_up)


def add_fleet_test(fsub) -> None:
    s = fsub.add_parser("test", help="the cross-node checks on a site that is up")
    s.add_argument("site")
    add_output(s)
    add_secrets(s)
    s.add_argument("-i", "--identity", required=True, help="the admin's private key")
    s.add_argument("-k", "--only", action="append", default=[], metavar="CHECK", help="run only this check")
    s.set_defaults(func=cmd_fleet_test)


def add_fleet_scan(fsub) -> None:
    s = fsub.add_parser("scan", help="search every image the site was built from for any of its secrets")
    s.add_argument("site")
    add_output(s)
    add_secrets(s)
    s.set_defaults(func=cmd_fleet_scan)


def add_fleet_renew(fsub) -> None:
    add_node_command(fsub, "renew", "install the certificates `fleet build` renewed on the running nodes",
                     cmd_fleet_renew)


def add_fleet_audit(fsub) -> None:
    add_node_command(fsub, "audit", "Lynis on each running node, held to its role's audit_min_index and "
                                    "audit_answers (needs lynis on this host)", cmd_fleet_audit)


def add_node_command(fsub, name: str, help: str, func) -> None:
    """A fleet command that works on the site's running nodes over the admin's SSH."""
    s = fsub.add_parser(name, help=help)
    s.add_argument("site")
    add_output(s)
    add_secrets(s)
    s.add_argument("-i", "--identity", required=True, help="the admin's private key")
    s.add_argument("--only", action="append", default=[], metavar="NODE", help="only this node (repeatable)")
    s.set_defaults(func=func)


def add_fleet_sessions(fsub) -> None:
    s = fsub.add_parser("sessions", help="who has a desktop session where (from the site's broker); --end NAME ends one")
    s.add_argument("site")
    add_output(s)
    s.add_argument("--end", type=person_name, metavar="NAME", help="end NAME's session (it is wiped)")
    s.add_argument("-i", "--identity", help="private key file (default: ssh's own choice, e.g. the agent)")
    s.set_defaults(func=cmd_fleet_sessions)


def add_fleet_ssh(fsub) -> None:
    s = fsub.add_parser("ssh", help="SSH to a node as admin: fleet ssh SITE NODE [-- CMD]")
    s.add_argument("site")
    s.add_argument("node")
    add_output(s)
    s.add_argument("-i", "--identity", help="private key file (default: ssh's own choice, e.g. the agent)")
    s.set_defaults(func=cmd_fleet_ssh)


def add_fleet_down(fsub) -> None:
    s = fsub.add_parser("down", help="stop the site's nodes (their disks stay)")
    s.add_argument("site")
    add_output(s)
    s.add_argument("--only", action="append", default=[], metavar="NODE", help="stop only this node (repeatable)")
    s.set_defaults(func=cmd_fleet_down)


def add_output(s: argparse.ArgumentParser) -> None:
    s.add_argument("-o", "--output", default="out", help="output folder (default: out/)")


def add_secrets(s: argparse.ArgumentParser) -> None:
    s.add_argument("--secrets", default="secrets", help="where site secrets live (default: secrets/)")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` is a command for a node (fleet ssh), not ours to parse.
    after: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, after = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    args.after_dashes = after
    setup_logging(args.verbose)
    # A SIGTERM (kill, a test harness, a CI timeout) unwinds like Ctrl-C: every `finally`
    # runs, so no VM, temporary disk or half-written output is left behind.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        return args.func(args)
    except SohoError as exc:
        print(f"sohocloud: error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"sohocloud: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sohocloud: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("sohocloud: terminated", file=sys.stderr)
        return 143
    finally:
        if in_main_thread:  # None: the old handler was not set from Python (SIG_DFL then)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Terminated(BaseException):
    """Raised by the SIGTERM handler (a BaseException: no `except Exception` swallows it)."""


def _terminated(signum, frame) -> None:
    # One unwinding is enough: a second SIGTERM must not cut the cleanup short (SIGKILL still ends us).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
