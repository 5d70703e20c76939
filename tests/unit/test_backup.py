"""Tier 1: the NAS's backup tool (overlays/storage/usr/sbin/sohocloud-backup) against a fake restic:
the steps in order, the site's retention as forget --prune arguments, and each outcome left for
Prometheus (node-exporter's textfile format), a failure as failed=1 while the last success stays."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "overlays/storage/usr/sbin/sohocloud-backup"

FAKE_RESTIC = """#!/bin/sh
echo "$*" >> "$LOG"
case "$1" in
  cat) [ -e "$REPO_MADE" ] || exit 1 ;;
  init) touch "$REPO_MADE" ;;
esac
case " $* " in *" $FAIL "*) exit 1 ;; esac
exit 0
"""


@pytest.fixture
def node(tmp_path: Path):
    root = tmp_path / "root"
    (root / "etc/sohocloud").mkdir(parents=True)
    (root / "etc/sohocloud/storage.json").write_text(json.dumps({"nas_root": "/srv/nas", "backup_root": "/srv/backup"}))
    fake = tmp_path / "restic"
    fake.write_text(FAKE_RESTIC)
    fake.chmod(0o755)
    log = tmp_path / "log"

    def run(step: str, fail: str = "nothing-fails") -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SOHOCLOUD_ROOT=str(root), SOHOCLOUD_RESTIC=str(fake), LOG=str(log),
                   REPO_MADE=str(tmp_path / "made"), FAIL=fail)
        return subprocess.run([sys.executable, str(TOOL), step], env=env, capture_output=True, text=True, timeout=30)
    run.root, run.log = root, log
    return run


def metrics(root: Path) -> dict[str, float]:
    text = (root / "var/lib/prometheus/node-exporter/sohocloud_backup.prom").read_text()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}


def test_a_run_backs_up_then_prunes_by_the_sites_retention(node):
    (node.root / "etc/sohocloud/backup.json").write_text('{"keep_daily": 3, "keep_weekly": 0, "keep_monthly": 2}')
    assert node("run").returncode == 0
    calls = node.log.read_text().splitlines()
    assert calls == ["cat config", "init", "backup --one-file-system --tag nas /srv/nas",
                     "forget --prune --tag nas --keep-daily 3 --keep-monthly 2"]  # 0 keeps none of that kind
    m = metrics(node.root)
    assert m['sohocloud_backup_failed{step="backup"}'] == 0 and m['sohocloud_backup_failed{step="prune"}'] == 0
    assert m['sohocloud_backup_last_success_timestamp_seconds{step="backup"}'] > 1.7e9
    # the check's clock starts with the first backup: a check that never runs raises BackupNotChecked
    assert m['sohocloud_backup_last_success_timestamp_seconds{step="check"}'] > 1.7e9
    prom = node.root / "var/lib/prometheus/node-exporter/sohocloud_backup.prom"
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644 and not list(prom.parent.glob(".*.tmp"))
    assert node("run").returncode == 0 and node.log.read_text().count("init") == 1  # the repository once


def test_a_failed_backup_is_failed_1_and_its_last_success_stays(node):
    assert node("run").returncode == 0
    first = metrics(node.root)['sohocloud_backup_last_success_timestamp_seconds{step="backup"}']
    r = node("run", fail="backup")
    assert r.returncode != 0 and "backup failed" in r.stderr
    m = metrics(node.root)
    assert m['sohocloud_backup_failed{step="backup"}'] == 1
    assert m['sohocloud_backup_last_success_timestamp_seconds{step="backup"}'] == first
    assert "forget" not in node.log.read_text().splitlines()[-1]  # nothing pruned after a failed backup
    assert node("run").returncode == 0 and metrics(node.root)['sohocloud_backup_failed{step="backup"}'] == 0


@pytest.mark.parametrize("step, fail", [("run", "forget"), ("check", "check")])
def test_a_failed_prune_or_check_is_reported(node, step, fail):
    assert node("run").returncode == 0
    assert node(step, fail=fail).returncode != 0
    name = {"forget": "prune", "check": "check"}[fail]
    assert metrics(node.root)[f'sohocloud_backup_failed{{step="{name}"}}'] == 1
    assert node(step).returncode == 0 and metrics(node.root)[f'sohocloud_backup_failed{{step="{name}"}}'] == 0
    if step == "check":
        assert "check --read-data-subset=5%" in node.log.read_text()


@pytest.mark.parametrize("policy, why", [('{"keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}', "keeps nothing"),
                                         ('{"keep_last": 1}', "keep_last"), ('{"keep_daily": -1}', "keep_daily")])
def test_a_policy_that_would_forget_everything_or_is_unknown_is_refused_before_any_step(node, policy, why):
    (node.root / "etc/sohocloud/backup.json").write_text(policy)
    r = node("run")
    assert r.returncode != 0 and why in r.stderr and not node.log.exists()
