"""builder.vm without booting: overlays and what a console says about a boot."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from builder.vm import VM, make_overlay


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
