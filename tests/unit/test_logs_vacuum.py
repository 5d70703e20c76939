"""The log sink's vacuum (overlays/control/usr/lib/sohocloud/sohocloud-logs-vacuum) around a fake journalctl."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VACUUM = REPO / "overlays/control/usr/lib/sohocloud/sohocloud-logs-vacuum"


def run(tmp_path: Path, *args: str, sink: Path | None = None) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "journalctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/argv\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SOHOCLOUD_LOG_SINK=str(sink or tmp_path))
    return subprocess.run([sys.executable, str(VACUUM), *args], env=env, capture_output=True, text=True, timeout=30)


def test_the_sink_is_vacuumed_to_its_share_of_its_filesystem(tmp_path):
    st = os.statvfs(tmp_path)
    assert run(tmp_path, "25").returncode == 0
    directory, size = (tmp_path / "argv").read_text().split()
    assert directory == f"--directory={tmp_path}"
    assert size == f"--vacuum-size={st.f_frsize * st.f_blocks * 25 // 100}"


def test_a_bad_share_is_refused_and_a_missing_sink_is_no_error(tmp_path):
    p = run(tmp_path, "95")
    assert p.returncode == 2 and "1..90 percent" in p.stderr and not (tmp_path / "argv").exists()
    p = run(tmp_path, sink=tmp_path / "none")
    assert p.returncode == 0 and "nothing to do" in p.stderr and not (tmp_path / "argv").exists()
