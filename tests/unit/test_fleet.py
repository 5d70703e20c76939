"""Tier 1: per-site secrets and per-node seeds (builder/fleet.py)."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from builder.fleet.secrets import SiteSecrets
from builder.fleet.seeds import node_network, write_node_seed
from builder.seed import read_cidata
from builder.fleet.sitefile import load_site

from test_site import GATEWAYS, GOOD, ROLES  # tests/unit is on sys.path (pytest prepend import mode)

HAVE_FAT = all(shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin") for t in ("mkfs.vfat", "mcopy", "mdir"))


@pytest.fixture
def site(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text(GOOD)
    return load_site(p, known_roles=ROLES, gateway_roles=GATEWAYS)


def modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_site_secrets_made_once_0600(site, tmp_path):
    s = SiteSecrets(tmp_path / "secrets" / site.name)
    ca = s.ca()
    key, cert = s.node_tls(site, site.node("ctl"))
    admin = s.secret("ldap-admin")
    assert SiteSecrets(s.root).ca() == ca  # reused on the next run
    assert SiteSecrets(s.root).node_tls(site, site.node("ctl")) == (key, cert)
    assert SiteSecrets(s.root).secret("ldap-admin") == admin
    for rel, mode in modes(s.root).items():
        assert mode == (0o700 if (s.root / rel).is_dir() else 0o600), rel
    c = x509.load_pem_x509_certificate(cert)
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"ctl", "ctl.office.lan"}
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.44.0.10"]


def test_node_network_by_mac_with_static_address(site):
    net = node_network(site, site.node("ws1"))["ethernets"]["lan"]
    assert net["match"] == {"macaddress": "52:54:00:44:00:1f"} and net["set-name"] == "lan"
    assert net["addresses"] == ["10.44.0.31/24"]
    assert net["gateway4"] == "10.44.0.1" and net["nameservers"]["addresses"] == ["10.44.0.1"]
    gw = node_network(site, site.node("gw"))["ethernets"]["lan"]
    assert gw["addresses"] == ["10.44.0.1/24"] and "gateway4" not in gw


@pytest.mark.skipif(not HAVE_FAT, reason="dosfstools/mtools not installed")
def test_node_seed_files(site, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = SiteSecrets(tmp_path / "secrets" / site.name)
    path = write_node_seed(site, site.node("gw"), secrets, tmp_path / "seeds")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    files = read_cidata(path)
    assert yaml.safe_load(files["meta-data"])["local-hostname"] == "gw"
    user = yaml.safe_load(files["user-data"])
    assert files["user-data"].startswith("#cloud-config\n")
    block = user["sohocloud"]
    assert block["site"] == "example" and block["role"] == "router"
    hosts = {h["name"]: (h["mac"], h["address"]) for h in block["router"]["hosts"]}
    assert hosts["nas"] == ("52:54:00:44:00:14", "10.44.0.20") and len(hosts) == 5
    assert "BEGIN CERTIFICATE" in block["ca_cert"] and "PRIVATE KEY" in block["tls"]["key"]
    # the key in the seed is the node's own, from secrets/
    assert block["tls"]["key"].encode() == (secrets.root / "nodes" / "gw.key").read_bytes()
    # nothing secret was logged on the way
    assert "PRIVATE KEY" not in caplog.text


# --------------------------------------------------------------------------- fleet build lanes

def _cfg(slug: str, arch: str):
    from types import SimpleNamespace

    return SimpleNamespace(slug=slug, arch=arch)


def test_build_lanes_run_foreign_arch_images_beside_native_ones_each_in_order() -> None:
    import threading

    from builder.fleet.build import build_lanes
    from builder.image.distro.foreign import HOST_ARCH

    other = "arm64" if HOST_ARCH != "arm64" else "amd64"
    cfgs = [_cfg("n1", HOST_ARCH), _cfg("f1", other), _cfg("n2", HOST_ARCH), _cfg("f2", other)]
    both_running = threading.Barrier(2, timeout=10)  # passes only if the two lanes overlap
    seen: list[tuple[str, str]] = []

    def build_one(cfg) -> None:
        if cfg.slug in ("n1", "f1"):
            both_running.wait()
        seen.append((threading.current_thread().name, cfg.slug))

    build_lanes("office", cfgs, build_one)
    assert [s for lane, s in seen if lane == "native"] == ["n1", "n2"]
    assert [s for lane, s in seen if lane == other] == ["f1", "f2"]


def test_build_lanes_stop_after_a_failure_and_raise_it() -> None:
    from builder.fleet.build import build_lanes
    from builder.errors import SohoError
    from builder.image.distro.foreign import HOST_ARCH

    other = "arm64" if HOST_ARCH != "arm64" else "amd64"
    built: list[str] = []

    def build_one(cfg) -> None:
        if cfg.slug == "f1":
            raise SohoError("f1: mmdebstrap failed")
        built.append(cfg.slug)

    with pytest.raises(SohoError, match="f1: mmdebstrap failed"):
        build_lanes("office", [_cfg("f1", other), _cfg("f2", other), _cfg("n1", HOST_ARCH)], build_one)
    assert "f2" not in built  # its lane stopped at the failure


def test_build_lanes_one_arch_builds_in_order_in_this_thread() -> None:
    import threading

    from builder.fleet.build import build_lanes
    from builder.image.distro.foreign import HOST_ARCH

    seen = []
    build_lanes("office", [_cfg("a", HOST_ARCH), _cfg("b", HOST_ARCH)],
                lambda cfg: seen.append((threading.current_thread() is threading.main_thread(), cfg.slug)))
    assert seen == [(True, "a"), (True, "b")]


def _boots(behaviour: dict[str, float | str]):
    """A fake boot(): a node named in *behaviour* 'fails' at once, or waits its seconds (stopping,
    as the real one does, with Aborted once abort is set)."""
    import threading
    import time as _time

    from builder.errors import SohoError
    from builder.errors import Aborted

    abort = threading.Event()
    waited: dict[str, str] = {}

    def boot(node) -> None:
        what = behaviour[node.name]
        if what == "fails":
            _time.sleep(0.05)
            raise SohoError(f"node {node.name}: no SSH banner")
        deadline = _time.monotonic() + float(what)
        while _time.monotonic() < deadline:
            if abort.is_set():
                waited[node.name] = "aborted"
                raise Aborted(f"node {node.name}: not waited for")
            _time.sleep(0.01)
        waited[node.name] = "booted"

    return boot, abort, waited


def test_a_failed_boot_stops_the_others_and_is_the_error_raised() -> None:
    """Any node's failure (not only the first listed one's) ends the others' waits, and the error
    names the failed node, not one that stopped waiting because of it."""
    import time as _time
    from types import SimpleNamespace

    from builder.errors import SohoError
    from builder.fleet.up import boot_in_parallel

    nodes = [SimpleNamespace(name=n) for n in ("ws1", "nas", "pc1")]
    boot, abort, waited = _boots({"ws1": 30, "nas": "fails", "pc1": 30})
    t0 = _time.monotonic()
    with pytest.raises(SohoError, match="node nas: no SSH banner"):
        boot_in_parallel(boot, nodes, abort)
    assert _time.monotonic() - t0 < 5
    assert waited == {"ws1": "aborted", "pc1": "aborted"}

    boot, abort, waited = _boots({"ws1": 0.1, "nas": 0.2, "pc1": 0})
    boot_in_parallel(boot, nodes, abort)
    assert waited == {"ws1": "booted", "nas": "booted", "pc1": "booted"} and not abort.is_set()


def test_wait_settled_names_the_late_node_with_its_consoles_failures(site, tmp_path):
    from builder.errors import SohoError
    from builder.fleet.running import FleetPaths
    from builder.fleet.up import wait_settled

    paths = FleetPaths(tmp_path, site.name)
    paths.run.mkdir(parents=True)
    for n in site.nodes:
        (paths.run / f"{n.name}.console.log").write_text("sohocloud-firstboot: done (online phase)\n")
    late = site.nodes[-1].name
    (paths.run / f"{late}.console.log").write_text(
        "\x1b[0;1;31m[FAILED]\x1b[0m Failed to start sssd.service - System Security Services Daemon.\n"
        "sohocloud-online: 70-cluster: not yet\n")
    with pytest.raises(SohoError) as e:
        wait_settled(site, paths, timeout=0)
    msg = str(e.value)
    assert msg.startswith(f"fleet {site.name}: {late} did not finish first boot within 0 s")
    assert "[FAILED] Failed to start sssd.service" in msg and "70-cluster: not yet" in msg
    assert msg.count("the end of its console") == 1  # only the late node's


def test_the_gateways_wan_is_a_tap_on_the_wan_side_and_nothing_is_user_net(site):
    """`fleet up`: the LAN NIC on the site bridge (site MAC), the gateway's WAN on the WAN side's
    bridge (its own MAC), so a VPN peer there reaches its UDP port; no NIC of a site node is user-net."""
    from builder.fleet.up import node_nics
    from builder.fleet.running import wan_mac
    gw = site.node("gw")
    wan, lan = node_nics(["wan", "lan"], gw, gateway=True)
    assert (lan.kind, lan.ifname, lan.mac) == ("tap", "t-gw", gw.mac)
    assert (wan.kind, wan.ifname, wan.mac) == ("tap", "w-gw", wan_mac(gw)) and wan_mac(gw) != gw.mac
    assert wan_mac(gw).startswith("52:54:01:") and wan_mac(gw)[9:] == gw.mac[9:]
    (only,) = node_nics(["lan"], site.node("ws1"))
    assert only.kind == "tap" and only.mac == site.node("ws1").mac


def test_only_expiring_certificates_are_renewed_and_instance_ids_stay(site, tmp_path):
    """A node certificate is issued for the site's valid_days; the next `fleet build` re-issues only
    one that ends within renew_before_days, and the node's seed keeps its instance-id (so the node is
    not re-provisioned: `fleet renew` installs the new pair)."""
    import dataclasses
    from builder.fleet.sitefile import Certificates
    from builder.seed import read_cidata
    short = dataclasses.replace(site, certificates=Certificates(valid_days=10, renew_before_days=5))
    s = SiteSecrets(tmp_path / "secrets" / site.name)
    ctl_key, ctl_cert = s.node_tls(short, site.node("ctl"))  # 10 days
    nas_pair = s.node_tls(site, site.node("nas"))  # 825 days
    c = x509.load_pem_x509_certificate(ctl_cert)
    assert 9 <= (c.not_valid_after_utc - c.not_valid_before_utc).days <= 10
    seeds = tmp_path / "seeds"
    iid = read_cidata(write_node_seed(short, site.node("ctl"), s, seeds))["meta-data"]
    assert s.node_tls(short, site.node("ctl")) == (ctl_key, ctl_cert)  # 10 days left: kept
    due = dataclasses.replace(site, certificates=Certificates(valid_days=30, renew_before_days=15))
    new_key, new_cert = s.node_tls(due, site.node("ctl"))
    assert new_cert != ctl_cert and new_key != ctl_key
    assert x509.load_pem_x509_certificate(new_cert).serial_number != c.serial_number
    assert s.node_tls(due, site.node("nas")) == nas_pair  # 825 days left: not touched
    assert read_cidata(write_node_seed(due, site.node("ctl"), s, seeds))["meta-data"] == iid
    user_data = yaml.safe_load(read_cidata(seeds / "ctl.img")["user-data"])
    assert user_data["sohocloud"]["tls"]["cert"].strip() == new_cert.decode().strip()  # the new pair rides in it
