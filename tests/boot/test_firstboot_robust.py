"""Firstboot robustness on a real boot (router image, restricted user-net, SSH forwarded):
a malformed seed is reported clearly and the admin can still log in; QEMU killed in the
middle of firstboot is completed by the next boot."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from bootkit import BOOT_TIMEOUT, free_port  # tests/boot is on sys.path (prepend import mode)

from builder.seed import render_seed, write_cidata
from builder.machine.boot import seed_lan_address, user_lan
from builder.machine.probe import wait_ssh_banner
from builder.machine.qemu import Nic, VM, image_info

pytestmark = pytest.mark.boot


def boot(image: Path, seed: Path, tmp: Path, name: str, disk: Path | None = None) -> tuple[VM, int]:
    port = free_port()
    # The image's default LAN address: a broken network-config is not applied (nor parseable here).
    lan = seed_lan_address(None, image_info(image))
    vm = VM(image, [Nic("user"), user_lan(lan, port)], seed=seed, memory=512, disk=disk,
            serial_log=tmp / f"{name}.console.log", workdir=tmp / f"{name}.vm")
    vm.workdir.mkdir(exist_ok=True)
    vm.start()
    return vm, port


def ssh(key: Path, port: int, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ssh", "-i", str(key), "-p", str(port), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                        "admin@127.0.0.1", cmd], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def login(key: Path, port: int, vm: VM) -> None:
    wait_ssh_banner("127.0.0.1", port, BOOT_TIMEOUT, alive=vm.alive)
    deadline = time.monotonic() + 120
    while ssh(key, port, "true", check=False).returncode != 0:
        assert time.monotonic() < deadline, "admin login never worked:\n" + vm.console()[-3000:]
        time.sleep(2)


def test_malformed_seed_is_reported_and_admin_still_logs_in(router_image, test_key, tmp_path):
    files = render_seed("broken", [test_key.with_suffix(".pub").read_text().strip()])
    files["network-config"] = "version: 2\nethernets: [this is: not valid yaml\n"
    seed = write_cidata(files, tmp_path / "broken.img")
    vm, port = boot(router_image, seed, tmp_path, "broken")
    try:
        login(test_key, port, vm)
        console = vm.console()
        assert "network-config" in console and "not marking done" in console, console[-3000:]
        journal = ssh(test_key, port, "sudo journalctl -b -u sohocloud-firstboot --no-pager").stdout
        assert "network-config" in journal and "error" in journal.lower()
        assert ssh(test_key, port, "hostname").stdout.strip() == "broken"  # the readable parts applied
        assert ssh(test_key, port, "test -e /var/lib/sohocloud/firstboot.done", check=False).returncode != 0
    finally:
        vm.cleanup()


def test_qemu_killed_during_firstboot_next_boot_completes(router_image, test_key, tmp_path):
    files = render_seed("resumed", [test_key.with_suffix(".pub").read_text().strip()])
    seed = write_cidata(files, tmp_path / "resumed.img")
    disk = tmp_path / "disk.qcow2"
    vm, _ = boot(router_image, seed, tmp_path, "first", disk=disk)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while "sohocloud-firstboot: seed from" not in vm.console():
            assert time.monotonic() < deadline and vm.alive(), vm.console()[-3000:]
            time.sleep(0.05)
        vm.proc.kill()  # the power cut: no shutdown, no sync
        vm.proc.wait()
        assert "done: instance" not in vm.console(), "firstboot finished before the cut: nothing tested"
    finally:
        vm.stop()
    vm2, port = boot(router_image, seed, tmp_path, "second", disk=disk)
    try:
        login(test_key, port, vm2)
        assert ssh(test_key, port, "hostname").stdout.strip() == "resumed"
        assert ssh(test_key, port, "cat /var/lib/sohocloud/firstboot.done").stdout.strip() == \
            files["meta-data"].split("instance-id: ")[1].split("\n")[0].strip()
        assert ssh(test_key, port, "sudo systemctl is-active sohocloud-firstboot").stdout.strip() == "active"
    finally:
        vm2.cleanup()
