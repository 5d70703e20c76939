"""Tier 3, opt-in: the example site with cluster engine k3s, end to end.

k3s is in no registry reachable from the CI machine, so this runs only with
the air-gap files at hand:  K3S_ARTIFACTS=dir make test-k3s
(dir/k3s and dir/k3s-airgap-images-amd64.tar). Everything before executing
k3s (hash checks, baking, config.yaml, token hand-out) is covered by unit tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.fleet.checks import CHECKS, FleetProbe

from bootkit import OUT, REPO  # tests/boot is on sys.path (prepend import mode)

ARTIFACTS = os.environ.get("K3S_ARTIFACTS")
SITE = "officek3s"
pytestmark = [pytest.mark.boot, pytest.mark.skipif(not ARTIFACTS, reason="needs K3S_ARTIFACTS=dir (k3s air-gap files)")]


def cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def k3s_site(tmp_path_factory, test_key):
    d = tmp_path_factory.mktemp("k3s")
    art = Path(ARTIFACTS).resolve()
    binary, images = art / "k3s", art / "k3s-airgap-images-amd64.tar"
    text = (REPO / "sites/example.yaml").read_text()
    text = re.sub(r"(?m)^site: example$", f"site: {SITE}", text)
    text = re.sub(r"(?m)^  - ssh-ed25519 \S+ admin@example$", f"  - {test_key.with_suffix('.pub').read_text().strip()}",
                  text)
    text = re.sub(r"(?m)^  engine: swarm.*$",
                  f"  engine: k3s\n  k3s: {{binary: {binary}, binary_sha256: {sha256(binary)}, "
                  f"images: {images}, images_sha256: {sha256(images)}}}", text)
    site_file = d / f"{SITE}.yaml"
    site_file.write_text(text)
    r = cli("fleet", "build", str(site_file), "-o", str(OUT), "--secrets", str(d / "secrets"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("fleet", "up", str(site_file), "-o", str(OUT))
    assert r.returncode == 0, r.stderr[-3000:]
    yield FleetProbe.open(SITE, OUT, d / "secrets" / SITE, str(test_key))
    cli("fleet", "down", str(site_file), "-o", str(OUT))


def test_every_member_ready_with_its_role(k3s_site):
    probe = k3s_site
    manager = probe.provider("cluster")
    members = {n.name: n.role for n in probe.site.nodes if probe.node_record(n).cluster != "none"}
    deadline = time.monotonic() + 600
    got = {}
    while time.monotonic() < deadline:
        out = probe.ssh(manager, "sudo k3s kubectl get nodes -o json", check=False).stdout
        if out.strip():
            items = json.loads(out)["items"]
            got = {i["metadata"]["name"]: (i["metadata"]["labels"].get("sohocloud.role"),
                                           any(c["type"] == "Ready" and c["status"] == "True"
                                               for c in i["status"]["conditions"])) for i in items}
            if got == {n: (r, True) for n, r in members.items()}:
                return
        time.sleep(10)
    raise AssertionError(f"k3s nodes {got}, expected {members} all Ready")


def test_k3s_config_is_private(k3s_site):
    probe = k3s_site
    for n in probe.site.nodes:
        if probe.node_record(n).cluster != "none":
            assert probe.ssh(n, "sudo stat -c %a /etc/rancher/k3s/config.yaml").stdout.strip() == "600"


def test_units_settled(k3s_site):
    CHECKS["units"](k3s_site)
