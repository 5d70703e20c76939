#!/usr/bin/env python3
"""`make bench`: measure sohocloud against plain baselines in one run, write BENCHMARKS.md.

Baselines, measured in the same run on the same machine:
- build: a bare mmdebstrap of the same package set (stock: recommends off as ours, but docs,
  all kernel modules and an emulation-free but stock mkinitramfs), its package cache pre-seeded the
  way mmdebstrap documents (sync-in), so neither side downloads;
- boot: that stock tree (its own kernel + mkinitramfs initrd) booted the same way (direct kernel
  boot, TCG), to a login prompt; ours to a login prompt and to an SSH banner.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests/boot"))  # the fleet tests' seat and site helpers

from builder.fleet.checks import CHECKS, FleetProbe  # noqa: E402
from vm_site import VM_RESERVE, VM_STANDARD, example_for_vms  # noqa: E402
from builder.fleet.netlab import Netns, unique_name  # noqa: E402
from builder.image.cache import StageCache, extract_tar  # noqa: E402
from builder.image.pipeline import build  # noqa: E402
from builder.image.s1_resolve import Repo, resolve  # noqa: E402
from builder.image.s5_assemble.fs import make_ext4, tree_size  # noqa: E402
from builder.machine.probe import wait_ssh_banner  # noqa: E402
from builder.machine.qemu import VM, BootFiles, Nic, accel_args, qemu_argv  # noqa: E402
from builder.proc import run  # noqa: E402
from builder.seed import render_seed, write_cidata  # noqa: E402

MANUAL_MARK = "<!-- kept by make bench: notes below this line are not regenerated -->"
# The desktops' block: `--desktops-only` rewrites only what is between these.
DESK_BEGIN, DESK_END = "<!-- desktops: begin -->", "<!-- desktops: end -->"
LOGIN_RE = re.compile(rb"login: ")


def timed(fn):
    t0 = time.monotonic()
    result = fn()
    return time.monotonic() - t0, result


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) // 1024
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{mem // 1024} GiB",
            "kernel": platform.release(), "accel": " ".join(accel_args("amd64")),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# --------------------------------------------------------------------------- builds


def bare_mmdebstrap(cfg, cache: StageCache, out: Path) -> float:
    d = cfg.profile.distro
    debs = cache.packages(d.name, d.suite, cfg.arch) / "debs"
    cmd = ["mmdebstrap", f"--variant={d.variant}", "--mode=root", "--format=tar", f"--architectures={cfg.arch}",
           "--skip=essential/unlink", "--aptopt=APT::Install-Recommends \"false\"",
           f"--include={','.join(cfg.all_packages() + (cfg.arch_spec.kernel_package,))}",
           f"--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives && cp -al {debs}/. \"$1\"/var/cache/apt/archives/",
           d.suite, str(out), d.mirror]
    seconds, _ = timed(lambda: run(cmd, env={"TMPDIR": str(cache.tmp)}, timeout=3600))
    return seconds


def overlay_edit_rebuild(cfg, out_dir: Path) -> float:
    target = cfg.repo.overlays / "router/etc/sohocloud/dnsmasq-upstream.conf"
    original = target.read_text()
    try:
        target.write_text(original + f"# bench edit {time.time()}\n")
        seconds, _ = timed(lambda: build(resolve(cfg.repo, "router"), out_dir))
    finally:
        target.write_text(original)
    return seconds


# --------------------------------------------------------------------------- boots


def boot_ours(image: Path, seed: Path, firmware: str, logdir: Path) -> tuple[float, float]:
    """(seconds to the serial login prompt, seconds to an SSH banner on the LAN side).

    The LAN is a tap on a bridge in a private network namespace, so the SSH probe
    is exact and adds no load to the guest (see wait_ssh_banner).
    """
    log = logdir / f"ours-{firmware}.console.log"
    ns = Netns(unique_name(f"scb{firmware[0]}-")).create()
    try:
        ns.add_tap("tap-b")
        ns.add_address("10.44.0.250/24")
        vm = VM(image, [Nic("user"), Nic("tap", ifname="tap-b")], seed=seed, firmware=firmware, netns=ns.name,
                serial_log=log, workdir=Path(tempfile.mkdtemp(prefix="bench-vm.")))
        try:
            vm.start()
            with ThreadPoolExecutor(1) as pool:
                login = pool.submit(_wait_console, log, vm.started, 300)
                ssh = wait_ssh_banner("10.44.0.1", 22, 300, netns=ns.name, alive=vm.alive)
                return login.result(), ssh
        finally:
            vm.cleanup()
    finally:
        ns.delete()


def _wait_console(log: Path, started: float, timeout: float) -> float:
    """Seconds from *started* until the serial console shows a login prompt (polled every 0.1 s)."""
    while time.monotonic() - started < timeout:
        if log.exists() and LOGIN_RE.search(log.read_bytes()):
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"no login prompt in {log}")


def boot_stock(stock_tar: Path, work: Path, cfg, logdir: Path) -> float:
    """The stock tree, direct kernel boot with its own initrd, to a login prompt on the serial console."""
    root = work / "stock-root"
    extract_tar(stock_tar, root)
    kernel = next((root / "boot").glob("vmlinuz-*"))
    initrd = next((root / "boot").glob("initrd.img-*"))
    shutil.copyfile(kernel, work / "stock-vmlinuz")
    shutil.copyfile(initrd, work / "stock-initrd")
    size = tree_size(root)
    fs = work / "stock-root.img"
    make_ext4(root, fs, (size + size // 5 + (256 << 20)) // (1 << 20) * (1 << 20), "6a3e6f0e-0000-4000-8000-000000000001",
              "root", 1735689600)
    shutil.rmtree(root)
    qcow = work / "stock.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", fs, qcow])
    fs.unlink()
    spec = cfg.arch_spec.qemu
    log = logdir / "stock.console.log"
    log.unlink(missing_ok=True)
    argv = qemu_argv(spec, cfg.arch, qcow, nics=[Nic("user")],
                     boot=BootFiles(work / "stock-vmlinuz", work / "stock-initrd",
                                    "root=/dev/vda rw console=ttyS0,115200 systemd.firstboot=off"),
                     serial=f"file:{log}")
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return _wait_console(log, started, 400)
    finally:
        proc.terminate()
        proc.wait()


# --------------------------------------------------------------------------- report


def site_bench(work: Path, key_pub: str, rounds: int, desktops_only: bool = False) -> tuple[dict[str, float], dict]:
    """The example site: fleet build cold (every stage) and warm, then boot-to-all-joined, the
    desktops, the diskless PCs' power-on to joined. *desktops_only*: a warm build, the desktops."""
    site_file = work / "benchsite.yaml"
    site_file.write_text(example_for_vms(REPO, "benchsite", key_pub))
    out, secrets = work / "site-out", work / "site-secrets"
    cli = [sys.executable, "-m", "builder.cli", "fleet"]
    r: dict[str, float] = {}
    desk: dict = {}
    if not desktops_only:
        print("bench: site build, cold (every stage of every image; .debs cached)", flush=True)
        r["site_cold"], _ = timed(lambda: run(cli + ["build", str(site_file), "-o", str(out), "--secrets",
                                                     str(secrets), "--no-cache"]))
    print("bench: site build, warm", flush=True)
    r["site_warm"], _ = timed(lambda: run(cli + ["build", str(site_file), "-o", str(out), "--secrets", str(secrets)]))
    print("bench: fleet up until every node is joined and settled", flush=True)
    t0 = time.monotonic()
    try:
        run(cli + ["up", str(site_file), "-o", str(out)])
        r["fleet_ssh"] = time.monotonic() - t0
        probe = FleetProbe.open("benchsite", out, secrets / "benchsite", str(work / "key"))
        CHECKS["cluster"](probe)
        CHECKS["units"](probe)
        r["fleet_joined"] = time.monotonic() - t0
        CHECKS["desktops"](probe)
        desk = desktop_bench(probe, work / "seat", rounds)
        desk["desk_images"] = desktop_image_sizes(out)
        if desktops_only:
            return r, desk
        # A diskless PC powered on again with the site up: iPXE, kernel + initrd and the squashfs
        # over HTTP, sha256 check, boot, seed, cluster join (`fleet up --only` waits until it settled).
        for n in probe.nodes_with(lambda m: m.get("bootloader") == "ipxe"):
            run(cli + ["down", str(site_file), "-o", str(out), "--only", n.name])
            print(f"bench: {n.name} ({n.firmware}) PXE power-on to joined", flush=True)
            t1 = time.monotonic()
            run(cli + ["up", str(site_file), "-o", str(out), "--only", n.name])
            CHECKS["cluster"](probe)
            r[f"pxe_joined_{n.firmware}"] = time.monotonic() - t1
    finally:
        subprocess.run(cli + ["down", str(site_file), "-o", str(out)], capture_output=True)
    return r, desk


# `podman run` of the desktop template alone, on the host that runs the sessions, as root: no
# sign-in, no systemd unit, no user namespace set-up; until its VNC server says its RFB banner.
PLAIN_PODMAN = r"""
import os, socket, subprocess, sys, tempfile, time
vnc = tempfile.mkdtemp(dir="/run")
name = "sohocloud-bench-" + os.path.basename(vnc)
argv = ["podman", "--runtime=crun", "run", "--rm", "--name", name, "--read-only", "--network=none", "--volume",
        vnc + ":/run/sohocloud-desktop", "--rootfs", "/var/lib/sohocloud-desk/template",
        "/usr/local/bin/sohocloud-desktop"]
t = time.monotonic()
p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while time.monotonic() - t < 300:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(vnc + "/vnc.sock")
            if s.recv(12).startswith(b"RFB"):
                break
    except OSError:
        time.sleep(0.05)
print(f"{time.monotonic() - t:.2f}", flush=True)
p.terminate()
try:
    p.wait(180)  # the --rm clean-up is slow on a busy emulated host: the time is already out
except subprocess.TimeoutExpired:
    subprocess.run(["podman", "rm", "--force", "--time", "0", name], capture_output=True)
    p.kill()
    p.wait()
"""


def desktop_bench(probe: FleetProbe, work: Path, rounds: int) -> dict:
    """Sign-in to the first desktop frame in the browser (Chromium at the LAN seat, password + TOTP),
    beside `podman run` of the same template alone on the same host, interleaved; the memory an idle
    session holds; the standard sessions each workstation host has room for."""
    from desk_seat import Seat
    work.mkdir(parents=True, exist_ok=True)
    hosts = probe.users_of("desktops")
    seat = Seat(probe.netns, probe.secrets, [n.name for n in hosts], work)
    ours, plain, memory, host = [], [], [], ""
    try:
        for i in range(rounds):
            print(f"bench: desktop sign-in {i + 1}/{rounds}", flush=True)
            page = seat(browser="b", do="sign_in", url=f"https://{hosts[0].address}/", **seat.credentials("alice"))
            if page["page"] != "desktop":
                raise SystemExit(f"bench: sign-in refused: {page}")
            ours.append(seat(browser="b", do="first_frame", timeout=300)["seconds"])
            host = page["host"]
            node = probe.site.node(host)
            time.sleep(30)  # idle
            memory.append(int(probe.ssh(node, "sudo systemctl show -p MemoryCurrent --value 'desk-*.service'").stdout))
            seat(browser="b", do="sign_out")
            plain.append(float(probe.ssh(node, f"sudo python3 -c {shlex.quote(PLAIN_PODMAN)}", timeout=600).stdout))
    finally:
        seat.close()
    room = {}
    for n in hosts:
        total = int(probe.ssh(n, "awk '/MemTotal/ {print $2}' /proc/meminfo").stdout) * 1024
        room[n.name] = total
    return {"desk_ours": ours, "desk_plain": plain, "desk_memory": memory, "desk_host": host, "desk_room": room}


def desktop_image_sizes(out: Path) -> dict[str, int]:
    """Bytes of what the site's build wrote for the desktops: the workstation hosts' disk images, the
    diskless PCs' root (kiosk included), the desktop template."""
    files = [*out.glob("workstation-host-*.qcow2"), *out.glob("pxe/workstation-host-*/rootfs.squashfs"),
             *out.glob("desktop-*.squashfs")]
    return {str(f.relative_to(out)): f.stat().st_size for f in sorted(files)}


def desktop_lines(d: dict, site: dict) -> list[str]:
    """The desktops' table: *site* is the example site's desktops section (its standard machine type
    and host reserve decide how many sessions fit)."""
    from builder.image.schema import parse_size
    standard = parse_size(site["standard"])
    reserve = parse_size(site["reserve"])
    ours, plain = statistics.median(d["desk_ours"]), statistics.median(d["desk_plain"])
    mem = statistics.median(d["desk_memory"]) / (1 << 20)
    lines = [f"Desktops (issue 22), on the booted example site, {len(d['desk_ours'])} rounds interleaved, "
             f"medians (min–max); the sessions ran on {d['desk_host']}:",
             "",
             "| measure | sohocloud | baseline |",
             "|---|---|---|",
             f"| sign-in to the first desktop frame (Chromium at the LAN seat: submit → first pixel on noVNC's "
             f"canvas; LDAP + TOTP, placement, systemd unit, rootless podman, noVNC) | {ours:.1f} s "
             f"({min(d['desk_ours']):.1f}–{max(d['desk_ours']):.1f}) | {plain:.1f} s "
             f"({min(d['desk_plain']):.1f}–{max(d['desk_plain']):.1f}) `podman run` of the same template alone "
             "(as root, to the VNC server's banner) |",
             f"| memory of an idle session (the unit's MemoryCurrent, 30 s after its first frame) | {mem:.1f} MiB | |",
             "",
             f"Ratio: sign-in to first frame / plain podman run = {ours / plain:.2f}.",
             "",
             f"How many sessions a host holds (placement: RAM less host_reserve {site['reserve']}, over the "
             f"machine type's memory limit; the example's `standard` is {site['standard']}):",
             "",
             "| host | RAM | standard sessions |",
             "|---|---|---|"]
    vm_standard, vm_reserve = parse_size(VM_STANDARD), parse_size(VM_RESERVE)
    for name, total in d["desk_room"].items():
        lines.append(f"| {name} (this run's VM; its standard is {VM_STANDARD}, reserve {VM_RESERVE}) | "
                     f"{total / (1 << 30):.1f} GiB | {max(0, (total - vm_reserve) // vm_standard)} |")
    for gib in (8, 16, 32):
        lines.append(f"| an office PC | {gib} GiB | {max(0, ((gib << 30) - reserve) // standard)} |")
    if d.get("desk_images"):
        lines += ["", "What this run's build wrote for them (the kiosk's cage + Chromium are in the workstation "
                  "host's image, hence in the diskless PCs' root):", "", "| file | size |", "|---|---|"]
        lines += [f"| {name} | {size / 1e6:.1f} MB |" for name, size in d["desk_images"].items()]
    return lines + [""]


def example_desktops() -> dict[str, str]:
    from builder.fleet.sitefile import load_repo_site
    d = load_repo_site(Repo(REPO), str(REPO / "sites/example.yaml")).desktops
    return {"standard": d.types()["standard"].memory, "reserve": d.host_reserve}


def desktops_only(out_path: Path, rounds: int) -> int:
    """`--desktops-only`: the example site up (a warm build), the desktops measured; their block in
    *out_path* rewritten with this run's date, the rest of the file kept as it was."""
    work = Path(tempfile.mkdtemp(prefix="sohocloud-bench.", dir=StageCache().tmp))
    try:
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "key")])
        _r, desk = site_bench(work, (work / "key.pub").read_text().strip(), rounds, desktops_only=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = machine()
    block = "\n".join([DESK_BEGIN, f"(`tests/bench.py --desktops-only` on {m['date']}, same machine.)", "",
                       *desktop_lines(desk, example_desktops()), DESK_END])
    text = out_path.read_text()
    if DESK_BEGIN in text:
        text = text.split(DESK_BEGIN)[0] + block + text.split(DESK_END, 1)[1]
    else:
        text = text.replace(MANUAL_MARK, block + "\n\n" + MANUAL_MARK)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out_path)
    print(block)
    return 0


def arm64_bench(cfg, out_dir: Path, seed: Path, logdir: Path, boots: int) -> dict:
    """arm64 side by side with amd64, in this run: cold builds of the same role (amd64 built again
    right after, so both see the same spell of the host), the card images from the cached arm64
    rootfs, and boots under TCG."""
    repo = cfg.repo
    arm = resolve(repo, "router", arch="arm64")
    print("bench: arm64: warming its package cache (not measured)", flush=True)
    build(arm, out_dir)
    a: dict = {}
    print("bench: arm64: cold build of the router (every stage; .debs cached)", flush=True)
    a["cold_arm64"], res = timed(lambda: build(arm, out_dir, use_cache=False))
    a["qcow2_arm64_mb"] = json.loads(res.manifest.read_text())["sizes"]["artefact_bytes"] / 1e6
    print("bench: amd64: cold build again, right after", flush=True)
    a["cold_amd64_again"], _ = timed(lambda: build(cfg, out_dir, use_cache=False))
    for board in ("rpi4", "rock64"):
        print(f"bench: {board} card from the cached arm64 rootfs", flush=True)
        a[f"card_{board}"], resb = timed(lambda: build(resolve(repo, "router", target=board, arch="arm64"), out_dir))
        m = json.loads(resb.manifest.read_text())
        a[f"card_{board}_mb"] = m["sizes"]["artefact_bytes"] / 1e6
        a[f"card_{board}_image"] = resb.artefact
    samples: dict[str, list[float]] = {"ssh_arm64": [], "ssh_rpi4": []}
    for _ in range(boots):
        samples["ssh_arm64"].append(boot_ours(res.artefact, seed, "direct", logdir)[1])
        samples["ssh_rpi4"].append(boot_ours(a["card_rpi4_image"], seed, "direct", logdir)[1])
    for k, v in samples.items():
        a[k] = statistics.median(v)
        a[k + "_spread"] = f" ({min(v):.1f}–{max(v):.1f})" if len(v) > 1 else ""
    return a


def arm64_lines(r: dict, a: dict) -> list[str]:
    amd = statistics.mean([r["cold"], a["cold_amd64_again"]])
    ratio = a["cold_arm64"] / amd
    return [
        "arm64 (built through qemu-user on this amd64 host; booted on QEMU `virt`, TCG), same run:",
        "",
        "| measure | arm64 | amd64 | target | met |",
        "|---|---|---|---|---|",
        row("router cold build (all stages, .debs cached)", f"{a['cold_arm64']:.1f} s",
            f"{r['cold']:.1f} s / {a['cold_amd64_again']:.1f} s (before / right after)", "≤ 1.5× amd64",
            ratio <= 1.5),
        row("router qcow2 size", f"{a['qcow2_arm64_mb']:.1f} MB", f"{r['qcow2_mb']:.1f} MB", "", None),
        row("boot to SSH banner, direct kernel boot", f"{a['ssh_arm64']:.1f} s{a['ssh_arm64_spread']}",
            f"{r['ssh_direct']:.1f} s", "", None),
        row("Raspberry Pi 4 card (router) from the cached arm64 rootfs", f"{a['card_rpi4']:.1f} s, "
            f"{a['card_rpi4_mb']:.1f} MB .img.xz", "", "", None),
        row("ROCK64 card (router) from the cached arm64 rootfs", f"{a['card_rock64']:.1f} s, "
            f"{a['card_rock64_mb']:.1f} MB .img.xz", "", "", None),
        row("Pi 4 card: its kernel + root on virt, boot to SSH banner", f"{a['ssh_rpi4']:.1f} s{a['ssh_rpi4_spread']}",
            "", "", None),
        "",
        f"Ratio: arm64 / amd64 cold build = {ratio:.2f} (amd64: mean of the two builds around it). "
        "mkosi 24.3 on this machine (DEVELOPERS.md, not this run): arm64 cold 163 s, amd64 83–96 s.",
        "",
    ]


def row(name: str, ours: str, base: str, target: str, ok: bool | None) -> str:
    mark = "" if ok is None else ("yes" if ok else "**no**")
    return f"| {name} | {ours} | {base} | {target} | {mark} |"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", default="BENCHMARKS.md")
    ap.add_argument("--boots", type=int, default=3, help="boots of each kind (median reported)")
    ap.add_argument("--no-site", action="store_true", help="skip the example site (build + fleet up)")
    ap.add_argument("--desktops-only", action="store_true",
                    help="only the example site's desktops (warm build, fleet up): rewrites their block alone")
    args = ap.parse_args()
    if args.desktops_only:
        return desktops_only(REPO / args.output, args.boots)
    out_path = REPO / args.output
    work = Path(tempfile.mkdtemp(prefix="sohocloud-bench.", dir=StageCache().tmp))
    logdir = REPO / "out" / "bench-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    out_dir = work / "out"
    cfg = resolve(Repo(REPO), "router")
    cache = StageCache()
    r: dict[str, float] = {}
    spread: dict[str, str] = {}
    try:
        print("bench: warming the package cache (not measured)", flush=True)
        build(cfg, out_dir)
        print("bench: bare mmdebstrap baseline", flush=True)
        r["bare"] = bare_mmdebstrap(cfg, cache, work / "stock.tar")
        print("bench: cold build (every stage rebuilt; .debs cached)", flush=True)
        r["cold"], res = timed(lambda: build(cfg, out_dir, use_cache=False))
        image = res.artefact
        manifest = json.loads(res.manifest.read_text())
        print("bench: no-op rebuild", flush=True)
        r["noop"], _ = timed(lambda: build(resolve(cfg.repo, "router"), out_dir))
        print("bench: rebuild after an overlay edit", flush=True)
        r["overlay"] = overlay_edit_rebuild(cfg, out_dir)
        build(resolve(cfg.repo, "router"), out_dir)  # back to the committed overlay
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "key")])
        seed = write_cidata(render_seed("bench", [(work / "key.pub").read_text().strip()]), work / "seed.img")
        print(f"bench: boots (one VM at a time, {args.boots} of each, interleaved)", flush=True)
        samples: dict[str, list[float]] = {k: [] for k in ("login_direct", "ssh_direct", "login_uefi", "ssh_uefi",
                                                           "stock_login")}
        for _ in range(args.boots):  # interleaved, so a slow spell of the host hits every kind alike
            login, ssh = boot_ours(image, seed, "direct", logdir)
            samples["login_direct"].append(login)
            samples["ssh_direct"].append(ssh)
            login, ssh = boot_ours(image, seed, "uefi", logdir)
            samples["login_uefi"].append(login)
            samples["ssh_uefi"].append(ssh)
            samples["stock_login"].append(boot_stock(work / "stock.tar", work, cfg, logdir))
        for k, v in samples.items():
            r[k] = statistics.median(v)
            spread[k] = f" ({min(v):.1f}–{max(v):.1f})" if len(v) > 1 else ""
        stock_tar_bytes = (work / "stock.tar").stat().st_size
        arm = arm64_bench(cfg, out_dir, seed, logdir, args.boots)
        if not args.no_site:
            site_r, desk = site_bench(work, (work / "key.pub").read_text().strip(), args.boots)
            r.update(site_r)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    m = machine()
    qcow_mb = manifest["sizes"]["artefact_bytes"] / 1e6
    r["qcow2_mb"] = qcow_mb
    tree_mb = manifest["sizes"]["tree_bytes"] / 1e6
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {m['date']}: {m['cpu']}, {m['cores']} cores, {m['memory']}, "
        f"host kernel {m['kernel']}, QEMU `{m['accel']}`. All figures from this one run.",
        "",
        "Router role, amd64, qemu target. Baselines: a bare `mmdebstrap` of the same package set "
        "(package cache pre-seeded, so neither side downloads), and that stock tree booted the same way "
        "(direct kernel boot with its own mkinitramfs initrd, TCG).",
        "",
        "| measure | sohocloud | baseline | target | met |",
        "|---|---|---|---|---|",
        row("cold build (all stages, .debs cached)", f"{r['cold']:.1f} s", f"{r['bare']:.1f} s bare mmdebstrap",
            "≤ 1.3× bare", r["cold"] <= 1.3 * r["bare"]),
        row("no-op rebuild", f"{r['noop']:.1f} s", "", "≤ 5 s", r["noop"] <= 5),
        row("rebuild after a one-file overlay edit", f"{r['overlay']:.1f} s", "", "≤ 30 s", r["overlay"] <= 30),
        row("tree size", f"{tree_mb:.0f} MB", f"{stock_tar_bytes / 1e6:.0f} MB (stock tar)", "", None),
        row("qcow2 size", f"{qcow_mb:.1f} MB", "", "≤ 120 MB", qcow_mb <= 120),
        row("boot to SSH banner, direct kernel boot (TCG)", f"{r['ssh_direct']:.1f} s{spread['ssh_direct']}", "", "≤ 15 s",
            r["ssh_direct"] <= 15),
        row("boot to login prompt, direct kernel boot (TCG)", f"{r['login_direct']:.1f} s{spread['login_direct']}",
            f"{r['stock_login']:.1f} s{spread['stock_login']} stock tree", "", None),
        row("boot to SSH banner, UEFI: OVMF + systemd-boot (TCG)", f"{r['ssh_uefi']:.1f} s{spread['ssh_uefi']}", "", "",
            None),
        row("boot to login prompt, UEFI (TCG)", f"{r['login_uefi']:.1f} s{spread['login_uefi']}", "", "", None),
        "",
        f"Ratios: cold build / bare mmdebstrap = {r['cold'] / r['bare']:.2f}; "
        f"stock boot-to-login / ours (direct) = {r['stock_login'] / r['login_direct']:.2f}.",
        "",
        *arm64_lines(r, arm),
        *([] if args.no_site else [
            "Site (`sites/example.yaml`: router, control, workstation host (amd64), storage as an arm64 ROCK64 "
            "card, two diskless PCs (PXE, BIOS and UEFI) + the desktop template), one run each:",
            "",
            "| measure | sohocloud |",
            "|---|---|",
            f"| site build, cold (5 images, one of them arm64, + the PXE set; every stage; .debs cached) | {r['site_cold']:.1f} s |",
            f"| site build, warm (nothing changed) | {r['site_warm']:.1f} s |",
            f"| fleet up: every node answers SSH (router first, then the others in parallel, TCG, 2 cores) | "
            f"{r['fleet_ssh']:.1f} s |",
            f"| fleet up: every node joined (cluster Ready, roles labelled) and both firstboot phases done | "
            f"{r['fleet_joined']:.1f} s |",
            *[f"| diskless PC ({fw}): power-on to joined (PXE, iPXE, {fw.upper()}; squashfs over HTTP, sha256, "
              f"seed, swarm join) | {r[f'pxe_joined_{fw}']:.1f} s |" for fw in ("bios", "uefi")
              if f"pxe_joined_{fw}" in r],
            "",
            DESK_BEGIN, *desktop_lines(desk, example_desktops()), DESK_END, ""]),
        *(["Site figures: not measured in this run (`--no-site`).", ""] if args.no_site else []),
        f"Boot times: median of {args.boots} boots of each kind (min–max), interleaved; from QEMU start; SSH is first seen by a probe polling the forwarded port "
        "(first firstboot included: seed read, host key generated). Console logs: `out/bench-logs/`.",
        "",
    ]
    manual = ""
    if out_path.exists() and MANUAL_MARK in out_path.read_text():
        manual = out_path.read_text().split(MANUAL_MARK, 1)[1]
    text = "\n".join(lines) + "\n" + MANUAL_MARK + (manual if manual else "\n")
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out_path)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
