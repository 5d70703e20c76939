"""The kiosk's launcher (overlays/kiosk/usr/lib/sohocloud/kiosk/sohocloud-kiosk) around a fake
`cage`: the browser's output reaches the journal through it, and a kiosk whose panel does not show
in time is stopped, for systemd to start afresh (a busy PC can leave Chromium with a white window
for good). The real cage + Chromium on a PC's screen: tests/boot/test_fleet_site.py."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import time
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).resolve().parents[2] / "overlays/kiosk/usr/lib/sohocloud/kiosk/sohocloud-kiosk"


@pytest.fixture
def kiosk(tmp_path, monkeypatch):
    loader = importlib.machinery.SourceFileLoader("sohocloud_kiosk", str(LAUNCHER))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def fake_cage(script: str) -> Path:
        cage = bin_dir / "cage"
        cage.write_text(f"#!/bin/sh\necho \"$$\" > {tmp_path}/pid\n{script}\n")
        cage.chmod(0o755)
        return tmp_path / "pid"

    module.fake_cage = fake_cage
    return module


def test_the_browsers_output_is_relayed_and_its_exit_status_returned(kiosk, capfd):
    kiosk.fake_cage('echo "[1:1:INFO:CONSOLE:7] \\"sohocloud-panel: page shown: sign in\\", source: x" >&2\n'
                    'echo "more output" >&2\nexit 3')
    assert kiosk.run_kiosk(["chromium", "https://ws1.example.lan/"]) == 3
    err = capfd.readouterr().err
    assert "sohocloud-panel: page shown: sign in" in err and "more output" in err


def test_a_kiosk_whose_panel_does_not_show_in_time_is_stopped(kiosk, monkeypatch, capfd):
    monkeypatch.setattr(kiosk, "SHOW_WITHIN", 1)
    pid_file = kiosk.fake_cage('echo "a white window" >&2\nexec sleep 60')
    started = time.monotonic()
    assert kiosk.run_kiosk(["chromium", "https://ws1.example.lan/"]) == 1
    assert time.monotonic() - started < 30
    assert "did not show within 1 s" in capfd.readouterr().err
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the fake compositor was stopped (and reaped)
        os.kill(pid, 0)
