"""The `sohocloud` command: one function per verb."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import SohoError
from .proc import CommandError

log = logging.getLogger("sohocloud")


def repo_root() -> Path:
    """The data (profiles/, overlays/, images/) next to the package, or SOHOCLOUD_REPO."""
    env = os.environ.get("SOHOCLOUD_REPO")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent


class _Elapsed(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        # Lines from a build lane (fleet build runs foreign-arch images beside native ones) say which.
        lane = "" if threading.current_thread() is threading.main_thread() else f"[{threading.current_thread().name}] "
        return f"[{time.monotonic() - self.t0:6.1f}s] {lane}{level}{msg}"


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Elapsed())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


# --------------------------------------------------------------------------- verbs


def cmd_list(args: argparse.Namespace) -> int:
    from .s1_resolve import Repo, load_profile, load_target

    repo = Repo(repo_root())
    for role in repo.roles():
        kind = load_profile(repo, role).kind
        for target in repo.targets():
            tgt = load_target(repo, target)
            if tgt.kind != kind:
                continue
            for arch in tgt.arches:
                print(f"{role:18} --target {target:8} --arch {arch}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .cache import StageCache
    from .pipeline import build
    from .s1_resolve import Repo, resolve

    cfg = resolve(Repo(repo_root()), args.role, target=args.target, arch=args.arch, distro=args.distro)
    _check_build_host([cfg])
    result = build(cfg, Path(args.output), cache=StageCache(), use_cache=not args.no_cache, explain=args.explain)
    print(result.artefact)
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from .seed import read_ssh_keys, render_seed, write_cidata

    keys = read_ssh_keys(Path(args.ssh_key))
    network = None
    if args.lan_address:
        network = {"version": 2, "ethernets": {"lan": {"match": {"name": "lan"}, "addresses": [args.lan_address]}}}
    files = render_seed(args.hostname, keys, network=network)
    out = Path(args.output)
    write_cidata(files, out)
    print(out)
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from .vm import boot_interactive

    return boot_interactive(Path(args.image), seed=Path(args.seed) if args.seed else None,
                            ssh_port=args.ssh_port, firmware=args.firmware, memory=args.memory)


def cmd_flash(args: argparse.Namespace) -> int:
    from .flash import flash

    _check_host_tools(["mcopy", "mmd", "mdir"])
    flash(Path(args.image), Path(args.device), seed=Path(args.seed) if args.seed else None, force=args.force)
    return 0


def cmd_fleet_build(args: argparse.Namespace) -> int:
    from .cache import StageCache
    from .fleet import SiteSecrets, find_providers, k3s_files, write_node_seed
    from .s1_resolve import load_profile
    from .pipeline import artefact_path, build
    from .s1_resolve import Repo, resolve
    from .site import load_site, site_path

    repo = Repo(repo_root())
    path = site_path(repo.root, args.site)
    site = load_site(path, known_roles=repo.roles(), gateway_roles=repo.gateway_roles(), repo_root=repo.root)
    # Resolve every image the site needs before any long work: a bad role or
    # target, or a service no node provides, fails now, not after the first build.
    members = {role for role, _a, _t in site.builds() if load_profile(repo, role).cluster != "none"}
    # k3s (when the site chose it) is baked into the cluster members' images, checked by sha256 first.
    cfgs = [resolve(repo, role, target=target, arch=arch,
                    extra_files=k3s_files(site, path.parent, arch) if role in members else ())
            for role, arch, target in site.builds()]
    profiles = {cfg.role: cfg.profile for cfg in cfgs}
    # Every role's profile, so an error can name the roles that would provide a missing service.
    providers = find_providers(site, {r: profiles.get(r) or load_profile(repo, r) for r in repo.roles()})
    node_cfg = {n.name: next(c for c in cfgs if (c.role, c.arch, c.target_name) == (n.role, n.arch, n.target))
                for n in site.nodes}
    netboot = [n for n in site.nodes if node_cfg[n.name].target.netboot]
    if netboot and "pxe" not in providers:
        raise SohoError(f"site {site.name}: {', '.join(n.name for n in netboot)} boot(s) from the network, but no "
                        "node provides pxe (the router's role does, through profiles/pxe-server.yaml)")
    # Images the nodes' roles use besides their own (e.g. the desktop template), per arch.
    extra = sorted({(ref.role, arch, ref.target) for role, arch, _t in site.builds()
                    for ref in profiles[role].images} - set(site.builds()))
    cfgs += [resolve(repo, role, target=target, arch=arch) for role, arch, target in extra]
    _check_build_host(cfgs)
    secrets = SiteSecrets(Path(args.secrets) / site.name)
    out = Path(args.output)
    cache = StageCache()
    build_lanes(site.name, cfgs, lambda cfg: build(cfg, out, cache=cache, use_cache=not args.no_cache))
    seeds = out / site.name / "seeds"
    site_text = path.read_text()
    seed_files = {}
    for node in site.nodes:
        seed = seed_files[node.name] = write_node_seed(site, node, secrets, seeds, profiles, site_text,
                                                       frozenset(n.name for n in netboot))
        log.info("fleet %s: seed for %s (%s) -> %s", site.name, node.name, node.role, seed)
        if "img.xz" in node_cfg[node.name].target.outputs:
            log.info("fleet %s: %s is an SD card: sohocloud flash %s /dev/sdX --seed %s", site.name, node.name,
                     artefact_path(node_cfg[node.name], out), seed)
    if netboot:
        from .fleet_pxe import pxe_volume_path, write_pxe_volume

        server = providers["pxe"]
        volume = write_pxe_volume(site, server, {n.name: artefact_path(node_cfg[n.name], out) for n in netboot},
                                  seed_files, out, pxe_volume_path(out, site))
        log.info("fleet %s: netboot sets and seeds of %s -> %s (served by %s)", site.name,
                 ", ".join(n.name for n in netboot), volume, server.name)
    print(seeds)
    return 0


def build_lanes(site_name: str, cfgs: list, build_one) -> None:
    """Build *cfgs* in two lanes at once: foreign-arch images (emulated maintainer scripts,
    one core) beside the native ones (downloads, compression), each lane in order. The other
    lane finishes its current image before a failure is raised."""
    from .s2_rootfs import is_foreign

    lanes: dict[str, list] = {}
    for cfg in cfgs:
        lanes.setdefault(cfg.arch if is_foreign(cfg.arch) else "native", []).append(cfg)
    order = {id(cfg): i for i, cfg in enumerate(cfgs, 1)}
    stop = threading.Event()

    def run_lane(lane: list) -> None:
        for cfg in lane:
            if stop.is_set():
                return
            log.info("fleet %s: image %d/%d: %s", site_name, order[id(cfg)], len(cfgs), cfg.slug)
            try:
                build_one(cfg)
            except BaseException:
                stop.set()
                raise

    if len(lanes) == 1:
        run_lane(cfgs)
        return
    from .progress import plain_lines

    with plain_lines(), ThreadPoolExecutor(len(lanes)) as pool:
        futures = [pool.submit(_named, name, run_lane, lane) for name, lane in lanes.items()]
    for f in futures:
        f.result()


def _named(name: str, fn, *args) -> None:
    threading.current_thread().name = name  # log lines of this lane carry it
    fn(*args)


def _load_site(site_arg: str):
    from .s1_resolve import Repo
    from .site import load_site, site_path

    repo = Repo(repo_root())
    return repo, load_site(site_path(repo.root, site_arg), known_roles=repo.roles(),
                     gateway_roles=repo.gateway_roles(), repo_root=repo.root)


def cmd_fleet_up(args: argparse.Namespace) -> int:
    from .fleet_run import check_root, fleet_up

    repo, site = _load_site(args.site)
    check_root()
    times = fleet_up(site, repo, Path(args.output), memory=args.memory, reimage=tuple(args.reimage),
                     only=tuple(args.only))
    for name, seconds in times.items():
        print(f"{name}\tup (SSH after {seconds:.1f} s)")
    return 0


def cmd_fleet_test(args: argparse.Namespace) -> int:
    from .fleet_check import CHECKS, FleetProbe, run_checks

    repo, site = _load_site(args.site)
    probe = FleetProbe.open(site, repo, Path(args.output), Path(args.secrets) / site.name, args.identity)
    names = args.only or list(CHECKS)
    failed = run_checks(probe, names)
    print(f"{site.name}: {len(names) - len(failed)}/{len(names)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def cmd_fleet_down(args: argparse.Namespace) -> int:
    from .fleet_run import check_root, fleet_down

    _repo, site = _load_site(args.site)
    check_root()
    stopped = fleet_down(site, Path(args.output), tuple(args.only))
    print(f"{site.name}: stopped {', '.join(stopped) or 'nothing'}")
    return 0


def cmd_fleet_ssh(args: argparse.Namespace) -> int:
    from .fleet_run import fleet_ssh_argv

    _repo, site = _load_site(args.site)
    argv = fleet_ssh_argv(site, Path(args.output), args.node, args.after_dashes, args.identity)
    os.execvp(argv[0], argv)
    return 127  # not reached


def _check_build_host(cfgs) -> None:
    """Before any long work: the host tools these builds use, and qemu-user for a foreign arch."""
    from .s2_rootfs import check_foreign_arch

    tools = ["mmdebstrap", "mkfs.ext4", "mkfs.vfat", "mcopy", "sfdisk", "qemu-img", "systemctl", "depmod"]
    if any("img.xz" in c.target.outputs for c in cfgs):
        tools += ["bmaptool", "xz"]
    _check_host_tools(tools)
    for arch in sorted({c.arch for c in cfgs}):
        check_foreign_arch(arch)


def _check_host_tools(tools: list[str]) -> None:
    import shutil

    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SohoError(f"missing host tools: {', '.join(missing)} (run `make deps`)")


# --------------------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sohocloud", description="Hardened Debian images per role, booted in QEMU.")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("list", help="roles x targets x arches that can be built")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("build", help="build one role image")
    s.add_argument("role")
    s.add_argument("--arch", default="amd64")
    s.add_argument("--target", default="qemu")
    s.add_argument("--distro", default="debian")
    s.add_argument("-o", "--output", default="out", help="output folder (default: out/)")
    s.add_argument("--no-cache", action="store_true", help="rebuild every stage (the package cache stays)")
    s.add_argument("--explain", action="store_true", help="say which inputs changed since the last build")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("seed", help="write a NoCloud 'cidata' seed volume")
    s.add_argument("--hostname", required=True)
    s.add_argument("--ssh-key", required=True, help="public key file for the admin account")
    s.add_argument("--lan-address", help="static LAN address in CIDR form (default: the role's)")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_seed)

    s = sub.add_parser("boot", help="boot an image in QEMU with the serial console on this terminal")
    s.add_argument("image")
    s.add_argument("--seed", help="NoCloud seed volume (sohocloud seed)")
    s.add_argument("--ssh-port", type=int, default=2222, help="host port forwarded to SSH on the LAN side")
    s.add_argument("--firmware", choices=["direct", "uefi"], default="direct",
                   help="direct: kernel+initrd from the image's ESP (fast); uefi: OVMF + systemd-boot")
    s.add_argument("--memory", type=int, default=1024, help="MiB")
    s.set_defaults(func=cmd_boot)

    s = sub.add_parser("flash", help="write an SD card image (+ a node's seed) to a card, verified")
    s.add_argument("image", help="an .img.xz built by sohocloud (its .bmap and manifest next to it)")
    s.add_argument("device", help="the card's whole-disk device, e.g. /dev/sdX or /dev/mmcblk0")
    s.add_argument("--seed", help="NoCloud seed volume (sohocloud seed, or fleet build's per-node seed)")
    s.add_argument("--force", action="store_true",
                   help="write a device that does not report removable media (never a mounted or root disk)")
    s.set_defaults(func=cmd_flash)

    fleet = sub.add_parser("fleet", help="a whole site: secrets, images, seeds")
    fsub = fleet.add_subparsers(dest="fleet_verb", required=True)
    s = fsub.add_parser("build", help="secrets (once), each role image once, one seed per node")
    s.add_argument("site", help="site name (sites/<name>.yaml) or path to a site file")
    s.add_argument("-o", "--output", default="out", help="output folder (default: out/)")
    s.add_argument("--secrets", default="secrets", help="where site secrets live (default: secrets/)")
    s.add_argument("--no-cache", action="store_true", help="rebuild every stage of every image (packages stay cached)")
    s.set_defaults(func=cmd_fleet_build)
    s = fsub.add_parser("up", help="boot the site on a private virtual LAN (router first)")
    s.add_argument("site")
    s.add_argument("-o", "--output", default="out")
    s.add_argument("--memory", type=int, default=1024, help="MiB per node")
    s.add_argument("--only", action="append", default=[], metavar="NODE",
                   help="boot only this node (repeatable); the others already up stay up")
    s.add_argument("--reimage", action="append", default=[], metavar="NODE",
                   help="start this node from a fresh root disk (its data disks stay; repeatable)")
    s.set_defaults(func=cmd_fleet_up)
    s = fsub.add_parser("test", help="the cross-node checks on a site that is up")
    s.add_argument("site")
    s.add_argument("-o", "--output", default="out")
    s.add_argument("--secrets", default="secrets", help="where site secrets live (default: secrets/)")
    s.add_argument("-i", "--identity", required=True, help="the admin's private key")
    s.add_argument("-k", "--only", action="append", default=[], metavar="CHECK", help="run only this check")
    s.set_defaults(func=cmd_fleet_test)
    s = fsub.add_parser("ssh", help="SSH to a node as admin: fleet ssh SITE NODE [-- CMD]")
    s.add_argument("site")
    s.add_argument("node")
    s.add_argument("-o", "--output", default="out")
    s.add_argument("-i", "--identity", help="private key file (default: ssh's own choice, e.g. the agent)")
    s.set_defaults(func=cmd_fleet_ssh)
    s = fsub.add_parser("down", help="stop the site's nodes (their disks stay)")
    s.add_argument("site")
    s.add_argument("-o", "--output", default="out")
    s.add_argument("--only", action="append", default=[], metavar="NODE", help="stop only this node (repeatable)")
    s.set_defaults(func=cmd_fleet_down)
    return p


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
