"""builder.machine.qemu without booting: overlays and what a console says about a boot."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import pytest

import builder.machine.qemu
from builder.image.schema import QemuSpec
from builder.errors import SohoError
from builder.machine.qemu import Nic, VM, make_overlay, parse_ppm, qemu_argv, screendump


def test_overlay_on_a_relative_base_opens_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    """`fleet up -o out` names the card's raw base relatively: the overlay must still find it
    (qemu-img reads a relative backing name from the overlay's folder, not the caller's)."""
    run_dir = tmp_path / "out" / "site" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "nas.base.raw").write_bytes(b"\0" * 65536)
    monkeypatch.chdir(tmp_path)
    make_overlay(Path("out/site/run/nas.base.raw"), Path("out/site/run/nas.qcow2"))
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain",
                                      str(run_dir / "nas.qcow2")], capture_output=True, text=True,
                                     check=True, cwd="/").stdout)
    assert [i["filename"] for i in info] == [str(run_dir / "nas.qcow2"), str(run_dir / "nas.base.raw")]


def _vm_with_console(tmp_path: Path, text: str) -> VM:
    log = tmp_path / "node.console.log"
    log.write_text(text)
    return VM(tmp_path / "node.qcow2", [], serial_log=log, workdir=tmp_path)


def test_a_starved_guest_is_a_hiccup_a_broken_image_is_not(tmp_path: Path) -> None:
    stall = "[   22.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n"
    timer = ("[    0.05] Kernel panic - not syncing: IO-APIC + timer doesn't work!  Boot with apic=debug\n")
    no_root = "[    3.2] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n"
    assert _vm_with_console(tmp_path, stall).hiccup() == "detected stalls on CPUs"
    assert not _vm_with_console(tmp_path, stall).panicked()
    assert _vm_with_console(tmp_path, timer).hiccup() == "IO-APIC + timer doesn't work"
    assert _vm_with_console(tmp_path, timer).panicked()
    assert _vm_with_console(tmp_path, no_root).hiccup() is None
    assert _vm_with_console(tmp_path, no_root).panicked()
    assert _vm_with_console(tmp_path, "nas login: \n").hiccup() is None


def test_console_tail_is_the_last_lines(tmp_path: Path) -> None:
    vm = _vm_with_console(tmp_path, "".join(f"line {i}\n" for i in range(40)))
    assert vm.console_tail(3) == "line 37\nline 38\nline 39"
    assert _vm_with_console(tmp_path, "").console_tail() == "(nothing on the console)"


def test_a_boot_failure_report_leads_with_systemds_failures(tmp_path: Path) -> None:
    """The console CI showed of the NAS held only its last minutes; the reason (a device that came
    too late for systemd) was printed long before."""
    console = ("[    2.1] EXT4-fs (vda2): mounted filesystem\n"
               "[\x1b[0;1;31m TIME \x1b[0m] Timed out waiting for device \x1b[0;1;39m/sys/subsystem/net/devices/lan\x1b[0m.\n"
               "[\x1b[0;1;38;5;185mDEPEND\x1b[0m] Dependency failed for \x1b[0;1;39mOpenSSH on the lan interface\x1b[0m.\n"
               + "".join(f"[  {i}.0] sohocloud-firstboot: online hook: not yet\n" for i in range(100, 140)))
    vm = _vm_with_console(tmp_path, console)
    assert vm.boot_failures() == ["[ TIME ] Timed out waiting for device /sys/subsystem/net/devices/lan.",
                                  "[DEPEND] Dependency failed for OpenSSH on the lan interface."]
    report = vm.console_report()
    assert report.startswith("systemd on its console:\n[ TIME ] Timed out")
    assert report.endswith("[  139.0] sohocloud-firstboot: online hook: not yet")
    assert _vm_with_console(tmp_path, "nas login: \n").console_report().startswith("the end of its console")


def test_a_starved_boot_is_powered_on_once_more_a_broken_one_is_not(tmp_path: Path) -> None:
    from builder.errors import Aborted, SohoError
    from builder.machine.qemu import once_more_after_hiccup

    class FakeVM(VM):
        starts = stops = 0

        def start(self) -> None:
            self.starts += 1

        def stop(self) -> None:
            self.stops += 1

    def waits(*outcomes):
        it = iter(outcomes)

        def wait() -> float:
            o = next(it)
            if isinstance(o, Exception):
                raise o
            return o
        return wait

    stall = "[   22.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n"
    log = tmp_path / "node.console.log"
    log.write_text(stall)
    warned: list[str] = []
    vm = FakeVM(tmp_path / "node.qcow2", [], serial_log=log, workdir=tmp_path)
    vm.overlay.write_bytes(b"old root")
    assert once_more_after_hiccup(vm, waits(SohoError("no SSH"), 42.0), warn=warned.append) == 42.0
    assert (vm.starts, vm.stops) == (1, 1) and not vm.overlay.exists()  # a fresh root the second time
    assert (tmp_path / "node.console.hiccup.log").read_text() == stall and "powering it on once more" in warned[0]
    with pytest.raises(SohoError, match="still no SSH"):  # a second failure is final
        once_more_after_hiccup(vm, waits(SohoError("no SSH"), SohoError("still no SSH")), warn=warned.append)
    with pytest.raises(Aborted):  # given up because another node failed: not retried
        once_more_after_hiccup(vm, waits(Aborted("not waited for")), warn=warned.append)
    log.write_text("[    3.2] Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    with pytest.raises(SohoError, match="no SSH"):  # the image's fault: not retried
        once_more_after_hiccup(vm, waits(SohoError("no SSH")), warn=warned.append)
    assert vm.starts == 2 and len(warned) == 2


@pytest.mark.parametrize("kvm, expected", [(False, "qemu64"), (True, "max")])
def test_a_target_may_give_tcg_its_own_cpu(monkeypatch, kvm: bool, expected: str) -> None:
    """`tcg_cpu` (emulated SIMD is slow: the plain CPU under TCG), `cpu` with a usable KVM."""
    monkeypatch.setattr(builder.machine.qemu, "usable_kvm", lambda: kvm)
    monkeypatch.setattr(builder.machine.qemu.os, "uname", lambda: type("U", (), {"machine": "x86_64"})())
    spec = QemuSpec(binary="qemu-system-x86_64", machine="q35", cpu="max", tcg_cpu="qemu64", nic_addrs=("0x3",))
    argv = qemu_argv(spec, "amd64", None, nics=[Nic("user")], netboot=True)
    assert argv[argv.index("-cpu") + 1] == expected
    assert argv[argv.index("-accel") + 1] == ("kvm" if kvm else "tcg,thread=multi")
    plain = QemuSpec(binary="qemu-system-x86_64", machine="q35", cpu="max", nic_addrs=("0x3",))
    argv = qemu_argv(plain, "amd64", None, nics=[Nic("user")], netboot=True)
    assert argv[argv.index("-cpu") + 1] == "max"


# --------------------------------------------------------------------------- how to boot: the manifest only


def _built_image(tmp_path: Path, **manifest) -> Path:
    image = tmp_path / "out" / "r-debian-amd64-qemu.qcow2"
    image.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    qemu = {"binary": "/recorded/qemu-system-x86_64", "machine": "recorded-machine", "cpu": "max",
            "tcg_cpu": "qemu64", "firmware_code": "/recorded/CODE.fd", "firmware_vars": str(tmp_path / "VARS.fd"),
            "nic_device": "virtio-net-pci", "nic_addrs": ["0x3", "0x4"], "console": "ttyS0", "append": ""}
    (tmp_path / "VARS.fd").write_bytes(b"\0" * 4096)
    base = {"artefact": image.name, "arch": "amd64", "target": "qemu", "interfaces": ["wan", "lan"],
            "bootloader": "systemd-boot", "partitions": [], "qemu": qemu}
    (image.parent / (image.name + ".manifest.json")).write_text(json.dumps({**base, **manifest}))
    return image


def test_a_vm_boots_as_its_manifest_says_never_reading_the_targets_yaml(tmp_path: Path, monkeypatch) -> None:
    """`sohocloud boot` and `fleet up` take the QEMU machine, firmware and NIC slots from the image's
    manifest: with no repository at all (and a target file that would say otherwise), the
    recorded ones are used."""
    monkeypatch.setenv("SOHOCLOUD_REPO", str(tmp_path / "no-repo"))
    image = _built_image(tmp_path)
    vm = VM(image, [Nic("user"), Nic("user")], firmware="uefi", workdir=tmp_path / "vm")
    vm.workdir.mkdir()
    argv = vm.argv()
    assert argv[0] == "/recorded/qemu-system-x86_64"
    assert argv[argv.index("-machine") + 1] == "recorded-machine"
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/recorded/CODE.fd" in argv
    assert [a for a in argv if a.startswith("virtio-net-pci")] == [
        "virtio-net-pci,netdev=n0,mac=52:54:00:5c:00:01,addr=0x3",
        "virtio-net-pci,netdev=n1,mac=52:54:00:5c:00:02,addr=0x4"]


def test_an_image_whose_manifest_does_not_say_how_to_boot_it_is_refused(tmp_path: Path) -> None:
    from builder.errors import SohoError

    image = _built_image(tmp_path, qemu=None)
    vm = VM(image, [Nic("user")], firmware="uefi", workdir=tmp_path / "vm")
    with pytest.raises(SohoError, match="does not say how QEMU runs it.*rebuild it"):
        vm.argv()
    bad = _built_image(tmp_path / "b", qemu={"binary": "qemu", "machine": 5})
    with pytest.raises(SohoError, match=r"qemu\.machine: expected a string"):
        VM(bad, [Nic("user")], firmware="uefi", workdir=tmp_path / "vm").argv()


# --------------------------------------------------------------------------- the screen


def test_a_machine_with_a_screen_gets_its_display_device_and_a_monitor(tmp_path: Path) -> None:
    """The target's display device (a diskless PC's screen), still no window; QMP on a socket."""
    spec = QemuSpec(binary="qemu-system-x86_64", machine="q35", nic_addrs=("0x3",), display="virtio-vga")
    argv = qemu_argv(spec, "amd64", None, nics=[Nic("user")], netboot=True, monitor=tmp_path / "pc.qmp")
    assert argv[argv.index("virtio-vga") - 1] == "-device"
    assert argv[argv.index("-display") + 1] == "none"
    assert argv[argv.index("-qmp") + 1] == f"unix:{tmp_path / 'pc.qmp'},server=on,wait=off"
    headless = qemu_argv(QemuSpec(binary="qemu-system-x86_64", machine="q35", nic_addrs=("0x3",)), "amd64", None,
                         nics=[Nic("user")], netboot=True)
    assert "-qmp" not in headless and not any("vga" in a for a in headless)


def _fake_qemu_monitor(path: Path, screen: bytes | None) -> threading.Thread:
    """A QMP server for one connection: greeting, capabilities, then a screendump that writes
    *screen* (a PPM) where it is told, or fails like QEMU without a display."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                msg = json.loads(line)
                if msg["execute"] == "qmp_capabilities":
                    f.write(b'{"return": {}}\n')
                elif screen is None:
                    f.write(b'{"error": {"class": "GenericError", "desc": "no surface"}}\n')
                else:
                    Path(msg["arguments"]["filename"]).write_bytes(screen)
                    f.write(b'{"event": "X", "data": {}}\n{"return": {}}\n')
                f.flush()
        server.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_a_screendump_becomes_a_png_and_says_what_colours_it_shows(tmp_path: Path) -> None:
    # 2x2: the first pixel is 0x20 0x0a 0x09 (bytes that look like whitespace after the header).
    pixels = bytes([0x20, 0x0a, 0x09]) + bytes.fromhex("1d2430") * 3
    _fake_qemu_monitor(tmp_path / "pc.qmp", b"P6\n2 2\n255\n" + pixels)
    screen = screendump(tmp_path / "pc.qmp", tmp_path / "pc.png")
    assert (screen.width, screen.height, screen.pixels) == (2, 2, pixels)
    assert screen.share("#1d2430") == 0.75 and screen.share("#ffffff") == 0
    png = (tmp_path / "pc.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (2, 2)
    idat = png.index(b"IDAT")
    length = struct.unpack(">I", png[idat - 4:idat])[0]
    assert zlib.decompress(png[idat + 4:idat + 4 + length]) == b"\0" + pixels[:6] + b"\0" + pixels[6:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pc.png", "pc.qmp"]  # no PPM, no temp file left


def test_a_screendump_failure_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SohoError, match="no QEMU monitor there"):
        screendump(tmp_path / "none.qmp", tmp_path / "pc.png")
    _fake_qemu_monitor(tmp_path / "pc.qmp", None)
    with pytest.raises(SohoError, match="QEMU screendump: no surface"):
        screendump(tmp_path / "pc.qmp", tmp_path / "pc.png")
    assert not (tmp_path / "pc.png").exists()
    with pytest.raises(SohoError, match="8-bit PPM"):
        parse_ppm(b"P5\n2 2\n255\n....")
    with pytest.raises(SohoError, match="shorter"):
        parse_ppm(b"P6\n2 2\n255\n" + bytes(11))
