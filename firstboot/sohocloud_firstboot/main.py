"""sohocloud-firstboot: apply a NoCloud seed to this node, once per instance-id.

Runs as root from sohocloud-firstboot.service, before sshd and systemd-networkd.
Seed sources, first found wins: a volume labelled cidata/CIDATA, a directory
named in /etc/sohocloud/seed-dirs (e.g. on the boot partition), a
``ds=nocloud;s=http://.../`` URL on the kernel command line (PXE nodes).

Every path goes through --root so the logic is testable on a build host against
a fake root; --no-system skips what touches the running system (hostname,
mount, udevadm, role hooks). Only stdlib + PyYAML: this runs in minimal images.

Secrets (SSH keys, write_files content, the ``sohocloud:`` block) are never
logged; messages name files, keys and counts only.

This module is the flow (phases, markers, the command line); the package's other
modules hold the steps it runs. Started by the launcher /usr/lib/sohocloud/sohocloud-firstboot
(or `python3 -m sohocloud_firstboot`).
"""

# Imports are the start-up cost of a first boot: under emulation this program's
# imports took 4-5 s before its first line of work, and it is on the path to SSH.
# So, in every module of the package: no dataclasses (inspect, ast, dis: ~1.5 s),
# no typing at run time (TYPE_CHECKING = False: annotations only), and ipaddress,
# socket, urllib, runpy and traceback only where a seed needs them, imported in
# the function with a `# lazy:` comment saying why.
from __future__ import annotations

import argparse
from pathlib import Path

from .context import HANDOFF, MARKER, NOT_ENROLLED, ONLINE_MARKER, PROG, Ctx, StepError, info, warn
from .files import write_atomic
from .growroot import grow_root
from .hooks import run_hooks, run_online_hooks, write_seed_json
from .network import apply_network
from .scrub import scrub_seed_dirs
from .seed import Seed, parse_seed
from .sources import discover_seed, read_seed_dir
from .steps import apply_admin_keys, apply_hostname, apply_write_files, ensure_host_key

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see above)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any


def marker_matches(ctx: Ctx, instance_id: str, marker: str = MARKER) -> bool:
    try:
        return ctx.path(marker).read_text().strip() == instance_id
    except FileNotFoundError:
        return False


def write_marker(ctx: Ctx, instance_id: str, marker: str = MARKER) -> None:
    write_atomic(ctx.path(marker), f"{instance_id}\n".encode(), 0o644)
    info(f"done{' (online phase)' if marker == ONLINE_MARKER else ''}: instance {instance_id}")


def step(ctx: Ctx, name: str, fn: Callable[[Ctx, Seed], Any], seed: Seed) -> None:
    """Run one step; a failure is reported and the remaining steps still run."""
    try:
        fn(ctx, seed)
    except StepError as e:
        ctx.error(str(e))
    except Exception as e:  # noqa: BLE001 - one broken step must not stop the others
        ctx.error(f"{name}: {type(e).__name__}: {e}")


def finish_hooks(ctx: Ctx, instance_id: str) -> int:
    try:
        run_hooks(ctx, instance_id)
    except StepError as e:
        ctx.error(str(e))
        return 1
    write_marker(ctx, instance_id)
    return 0


def early(ctx: Ctx, seed: Seed) -> int:
    """Seed steps, then the firstboot.d hooks, then the done marker."""
    step(ctx, "hostname", apply_hostname, seed)
    step(ctx, "ssh host key", lambda c, s: ensure_host_key(c), seed)
    step(ctx, "admin keys", apply_admin_keys, seed)
    step(ctx, "network", apply_network, seed)
    step(ctx, "write_files", apply_write_files, seed)
    if ctx.errors or seed.instance_id is None:
        # Hooks join clusters etc.; with a broken seed they would act on partial
        # settings. Exit 1, no marker: the next boot tries again.
        info(f"{len(ctx.errors)} error(s): role hooks skipped, not marking done")
        return 1
    if not hand_over(ctx, seed):
        return 1
    return finish_hooks(ctx, seed.instance_id)


def hand_over(ctx: Ctx, seed: Seed) -> bool:
    """Role settings (/run, 0600) + instance id for the online phase of this boot."""
    step(ctx, "role settings", lambda c, s: write_seed_json(c, s), seed)
    if ctx.errors:
        return False
    write_atomic(ctx.path(HANDOFF), f"{seed.instance_id}\n".encode(), 0o600)
    return True


def online_phase(ctx: Ctx) -> int:
    try:
        iid = ctx.path(HANDOFF).read_text().strip()
    except FileNotFoundError:
        info("online phase: no seed applied this boot")
        return 0
    if not marker_matches(ctx, iid):
        # The early phase failed this boot (its errors are on the console); it
        # runs again next boot. Exit 0: a restart loop here would change nothing.
        info("online phase: first-boot steps not complete this boot; skipped")
        return 0
    if marker_matches(ctx, iid, ONLINE_MARKER):
        info(f"online phase: already done for instance {iid}")
        return 0
    run_online_hooks(ctx, iid)
    write_marker(ctx, iid, ONLINE_MARKER)
    scrub_seed_dirs(ctx, iid)
    return 0


def firstboot(ctx: Ctx, seed_dir: str | None, phase: str) -> int:
    if phase == "online":
        return online_phase(ctx)
    try:
        grow_root(ctx)
    except (StepError, OSError) as e:
        # The node still works on the root as built: say so, but provision it anyway (an error
        # here would hold back the seed's steps on every boot).
        warn(f"grow root: {e}")
    found: tuple[str, dict[str, bytes | None]] | None
    if seed_dir is not None:
        found = (f"seed directory {seed_dir}", read_seed_dir(Path(seed_dir)))
    else:
        found = discover_seed(ctx)
    if found is None:
        if ctx.path(NOT_ENROLLED).exists():
            not_enrolled(ctx)
        else:
            info("no seed found")
        step(ctx, "ssh host key", lambda c, s: ensure_host_key(c), Seed(source="none"))
        return 1 if ctx.errors else 0
    source, raw = found
    seed = parse_seed(ctx, source, raw)
    if seed.instance_id is not None and marker_matches(ctx, seed.instance_id):
        if not marker_matches(ctx, seed.instance_id, ONLINE_MARKER):
            # The online phase did not finish (power cut, manager down): it
            # needs this boot's role settings again.
            info(f"already done for instance {seed.instance_id}; the online phase resumes")
            return 0 if hand_over(ctx, seed) else 1
        info(f"already done for instance {seed.instance_id} (both phases)")
        scrub_seed_dirs(ctx, seed.instance_id)  # in case a power cut came between the two
        return 0
    info(f"seed from {source}, instance {seed.instance_id}")
    return early(ctx, seed)


def not_enrolled(ctx: Ctx) -> None:
    """A netboot machine whose MAC has no seed on the server (the initrd got a 404): it runs the
    generic image with no admin key, no secret and no cluster, and says so on its console."""
    facts = {}
    for line in ctx.path(NOT_ENROLLED).read_text(errors="replace").splitlines():
        key, _, val = line.partition("=")
        facts[key.strip()] = "".join(ch for ch in val.strip() if ch.isprintable())[:80]
    mac, server = facts.get("mac", "?"), facts.get("server", "the seed server")
    lines = [f"NOT ENROLLED: {server} has no seed for this machine (MAC {mac}).",
             "It runs the generic image: no admin key, no site secret, member of no cluster.",
             f"To enroll it, add it to the site file (target: pxe, mac: \"{mac}\") and run "
             "`sohocloud fleet build SITE`; then reboot it."]
    for line in lines:
        info(line)
    issue = "".join(f"sohocloud: {line}\n" for line in lines)
    write_atomic(ctx.path("etc/issue.d/50-sohocloud-not-enrolled.issue"), issue.encode(), 0o644)


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description="Apply a NoCloud seed on first boot.")
    ap.add_argument("--root", default="/", help="root directory to configure (default /)")
    ap.add_argument("--seed-dir", help="read meta-data/user-data/network-config from DIR, skip discovery")
    ap.add_argument("--no-system", action="store_true",
                    help="do not touch the running system (hostname, mount, udevadm, role hooks)")
    ap.add_argument("--phase", choices=("all", "online"), default="all",
                    help="all (default): seed steps + firstboot.d hooks, before networkd/sshd; "
                         "online: online.d hooks, retried with backoff until each succeeds")
    return ap.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Ctx(root=Path(args.root).absolute(), system=not args.no_system)
    try:
        return firstboot(ctx, args.seed_dir, args.phase)
    except Exception as e:  # noqa: BLE001 - last resort: one line, never a dump of data
        ctx.error(f"unexpected failure: {type(e).__name__}: {e}")
        return 1
