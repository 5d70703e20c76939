"""fleet audit: Lynis's report read, and a node held to its profile (no Lynis run here)."""

import io
import tarfile

import pytest

from builder.fleet import audit
from builder.fleet.audit import NodeAudit, parse_report

REPORT = """# Lynis Report
report_version_major=1
hardening_index=91
warning[]=PKGS-7392|Found one or more vulnerable packages.|-|-|
suggestion[]=FILE-6310|To decrease the impact of a full /home file system, place /home on a separate partition|-|-|
suggestion[]=SSH-7408|Consider hardening SSH configuration|Port (set 22 to )|-|
suggestion[]=MALW-3280|Check if anti-virus software is installed|-|-|
"""


def test_the_report_is_read_into_lists():
    r = parse_report(REPORT)
    assert r["hardening_index"] == ["91"]
    assert len(r["suggestion"]) == 3 and r["warning"][0].startswith("PKGS-7392|")


def _node(report: str, answers: dict[str, str], minimum: int = 90) -> NodeAudit:
    r = parse_report(report)
    return NodeAudit("gw", "router", int(r["hardening_index"][0]), minimum, audit._findings(r.get("warning", [])),
                     audit._findings(r.get("suggestion", [])), answers)


def test_a_node_passes_only_with_the_index_no_warning_and_every_suggestion_answered():
    answers = {"FILE-6310": "one root filesystem", "SSH-7408": "port 22 on the LAN only",
               "MALW-3280": "no anti-virus", "AUTH-9262": "not suggested here: not printed"}
    clean = REPORT.replace("warning[]=PKGS-7392|Found one or more vulnerable packages.|-|-|\n", "")
    assert _node(clean, answers).passed
    warned = _node(REPORT, answers)
    assert not warned.passed and warned.warnings == (("PKGS-7392", "Found one or more vulnerable packages."),)
    low = _node(clean, answers, minimum=92)
    assert not low.passed
    missing = _node(clean, {k: v for k, v in answers.items() if k != "MALW-3280"})
    assert not missing.passed and [t for t, _ in missing.unanswered] == ["MALW-3280"]
    text = "\n".join(_node(clean, answers).lines())
    assert "hardening index 91 (at least 90)" in text
    assert "answered SSH-7408: port 22 on the LAN only" in text and "AUTH-9262" not in text
    assert "Port (set 22 to )" in "\n".join(missing.lines()) or "SSH-7408" in text


def test_the_bundle_is_roots_and_runs_from_its_folder(monkeypatch, tmp_path):
    if not audit.LYNIS.is_file():
        pytest.skip("lynis not installed on this host (make deps)")
    with tarfile.open(fileobj=io.BytesIO(audit.lynis_bundle())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert {"lynis", "include/functions", "db/languages/en", "default.prf", "custom.prf"} <= set(members)
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert not any(m.mode & 0o002 for m in members.values())
