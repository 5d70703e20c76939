"""Engine k3s up to executing k3s: artefacts checked by sha256 and baked in, firewall openings and
config.yaml written by firstboot (on a fake root)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import ConfigError, SohoError
from builder.fleet.build import k3s_files
from builder.image.s1_resolve import ExtraFile
from builder.image.s3_customise import install_extra_files
from builder.fleet.sitefile import load_site

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "firstboot"
HOOKS = REPO / "overlays/cluster-member/usr/lib/sohocloud"


def k3s_site(tmp_path: Path, binary_sha: str | None = None) -> Path:
    (tmp_path / "k3s").write_bytes(b"\x7fELF fake k3s")
    (tmp_path / "images.tar").write_bytes(b"fake images")
    sha = lambda p: hashlib.sha256((tmp_path / p).read_bytes()).hexdigest()  # noqa: E731
    site = tmp_path / "k.yaml"
    site.write_text(f"""site: k
domain: k.lan
lan: 10.44.0.0/24
admin_ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHQ6qvWp0mKHhz8Y7Yy2WQfGgAqs2wzvWbYxN3Hq8Ekd a@b"]
cluster:
  engine: k3s
  k3s: {{binary: k3s, binary_sha256: {binary_sha or sha('k3s')}, images: images.tar, images_sha256: {sha('images.tar')}}}
nodes:
  - {{name: gw, role: router, address: 10.44.0.1, mac: "52:54:00:44:00:01"}}
  - {{name: control, role: control, address: 10.44.0.2, mac: "52:54:00:44:00:02"}}
""")
    return site


def load(site: Path):
    return load_site(site, known_roles=["router", "control"], gateway_roles=["router"])


def test_k3s_files_are_verified_and_placed(tmp_path: Path) -> None:
    files = k3s_files(load(k3s_site(tmp_path)), tmp_path, "amd64")
    assert [(f.dest, f.mode) for f in files] == [
        ("/usr/local/bin/k3s", 0o755), ("/var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar", 0o644)]
    root = tmp_path / "root"
    install_extra_files(root, files)
    k3s = root / "usr/local/bin/k3s"
    assert k3s.read_bytes() == b"\x7fELF fake k3s" and stat.S_IMODE(k3s.stat().st_mode) == 0o755


def test_k3s_wrong_sha256_is_refused_before_any_build(tmp_path: Path) -> None:
    site = load(k3s_site(tmp_path, binary_sha="a" * 64))
    with pytest.raises(SohoError, match=r"cluster.k3s.binary: .* has sha256 [0-9a-f]{64}, the site file says a{64}"):
        k3s_files(site, tmp_path, "amd64")


def test_extra_file_changed_after_check_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"new bytes")
    with pytest.raises(ConfigError, match="does not match"):
        install_extra_files(tmp_path / "root", [ExtraFile("/usr/local/bin/x", src, "1" * 64, 0o755)])
    assert not (tmp_path / "root/usr/local/bin/x").exists()


def run_hook(root: Path, hook: Path, settings: dict) -> subprocess.CompletedProcess[str]:
    seed = root / "run/seed.json"
    seed.parent.mkdir(parents=True, exist_ok=True)
    seed.write_text(json.dumps(settings))
    net = root / "etc/systemd/network/10-seed-lan.network"
    net.parent.mkdir(parents=True, exist_ok=True)
    net.write_text("[Match]\nName=lan\n\n[Network]\nAddress=10.44.0.2/24\n")
    env = dict(os.environ, SOHOCLOUD_ROOT=str(root), SOHOCLOUD_SEED_JSON=str(seed), SOHOCLOUD_LIB=str(LIB))
    return subprocess.run([sys.executable, str(hook)], env=env, capture_output=True, text=True)


MANAGER = {"engine": "k3s", "role": "manager", "node_role": "control", "join_port": 7443,
           "k3s_token": "s3cr3t-token-0123456789abcdef", "k3s_agent_token": "agent-token-0123456789abcdef",
           "manager": {"name": "control", "fqdn": "control.k.lan", "address": "10.44.0.2"}}


def test_k3s_server_config_is_private_and_complete(tmp_path: Path) -> None:
    r = run_hook(tmp_path, HOOKS / "online.d/70-cluster", {"cluster": MANAGER})
    assert r.returncode == 0, r.stderr
    conf = tmp_path / "etc/rancher/k3s/config.yaml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    data = json.loads(conf.read_text())  # JSON is YAML
    assert data == {"node-ip": "10.44.0.2", "node-label": ["sohocloud.role=control"], "write-kubeconfig-mode": "0600",
                    "token": MANAGER["k3s_token"], "agent-token": MANAGER["k3s_agent_token"],
                    "tls-san": ["control.k.lan"], "flannel-backend": "wireguard-native"}
    agent = tmp_path / "etc/sohocloud/k3s-agent-token"
    assert agent.read_text() == MANAGER["k3s_agent_token"] + "\n" and stat.S_IMODE(agent.stat().st_mode) == 0o600
    assert MANAGER["k3s_token"] not in r.stderr + r.stdout


def test_k3s_bad_token_refused(tmp_path: Path) -> None:
    r = run_hook(tmp_path, HOOKS / "online.d/70-cluster", {"cluster": dict(MANAGER, k3s_token="a b\nc")})
    assert r.returncode != 0 and "cluster.k3s_token" in r.stderr
    assert not (tmp_path / "etc/rancher/k3s/config.yaml").exists()


@pytest.mark.parametrize("role, ports", [("manager", ["tcp . 6443", "tcp . 10250", "udp . 51820"]),
                                         ("worker", ["tcp . 10250", "udp . 51820"])])
def test_k3s_ports_opened_to_the_sites_nodes_only_before_nftables(tmp_path: Path, role: str, ports: list[str]) -> None:
    """The API, the kubelet and flannel's WireGuard go into site_ports (sources: site_hosts only)."""
    r = run_hook(tmp_path, HOOKS / "firstboot.d/25-cluster-ports", {"cluster": dict(MANAGER, role=role)})
    assert r.returncode == 0, r.stderr
    nft = (tmp_path / "etc/nftables.d/40-cluster.nft").read_text()
    elements = [line for line in nft.splitlines() if "add element" in line]
    assert all(line.startswith("add element inet filter site_ports ") for line in elements), nft
    assert [line.split('"lan" . ')[1].rstrip(" }") for line in elements] == ports


def test_swarm_opens_nothing_extra(tmp_path: Path) -> None:
    r = run_hook(tmp_path, HOOKS / "firstboot.d/25-cluster-ports", {"cluster": dict(MANAGER, engine="swarm")})
    assert r.returncode == 0 and not (tmp_path / "etc/nftables.d/40-cluster.nft").exists()
