"""Tier 1: the roles' firstboot hooks run against a fake root (SOHOCLOUD_ROOT).

With a root other than "/" the hooks never touch the running system
(sohocloud_hooks.LIVE), so they run here as they would on a node, fed the
seed blocks builder/fleet.py makes for sites/example.yaml.
"""

from __future__ import annotations

import configparser
import copy
import json
import os
import runpy
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from test_fleet_services import EXAMPLE, NODES, REPO, load_example, seed_block  # a sibling: tests/unit is on sys.path

from builder.fleet.secrets import SiteSecrets
from builder.seed import render_seed

OVERLAYS = REPO / "overlays"
SITE_NODE = OVERLAYS / "site-node/usr/lib/sohocloud/firstboot.d/20-site-node"
LDAP_CLIENT = OVERLAYS / "ldap-client/usr/lib/sohocloud/firstboot.d/30-ldap-client"
CONTROL = OVERLAYS / "control/usr/lib/sohocloud/firstboot.d/40-control"
STORAGE = OVERLAYS / "storage/usr/lib/sohocloud/firstboot.d/40-storage"

# Accounts the hooks chown to (they look them up in the fake root's files).
PASSWD = "root:x:0:0:root:/root:/bin/bash\nopenldap:x:101:104::/var/lib/ldap:/bin/false\n" \
         "git:x:102:105::/srv/git:/usr/bin/git-shell\nsyncthing:x:103:106::/var/lib/syncthing:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nopenldap:x:104:\ngit:x:105:\nsyncthing:x:106:\nsystemd-network:x:107:\n"
ADDRESSES = {"gw": "10.44.0.1", "control": "10.44.0.2", "nas": "10.44.0.3", "ws1": "10.44.0.10"}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, dict]:
    """Each example node's `sohocloud:` block (a fresh copy per test: tests may edit it)."""
    site, profiles = load_example()
    secrets = SiteSecrets(tmp_path_factory.mktemp("secrets") / site.name)
    return {n: seed_block(site, n, profiles, secrets) for n in NODES}


@pytest.fixture
def seed(seeds):
    return lambda name: copy.deepcopy(seeds[name])


def make_root(tmp_path: Path, node: str) -> Path:
    """A fake root as firstboot leaves it for the role hooks: accounts, the seed's LAN network file."""
    root = tmp_path / "root"
    (root / "etc/systemd/network").mkdir(parents=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n")
    (root / "etc/systemd/network/10-seed-lan.network").write_text(
        f"[Match]\nName=lan\n\n[Network]\nAddress={ADDRESSES[node]}/24\n")
    return root


def run_hook(hook: Path, root: Path, block: dict, iid: str = "x") -> subprocess.CompletedProcess[str]:
    seed_json = root.parent / "seed.json"
    seed_json.write_text(json.dumps(block))
    env = dict(os.environ, SOHOCLOUD_ROOT=str(root), SOHOCLOUD_SEED_JSON=str(seed_json),
               SOHOCLOUD_LIB=str(REPO / "firstboot"), SOHOCLOUD_INSTANCE_ID=iid)
    return subprocess.run([sys.executable, str(hook)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, p.stderr
    return p


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def ldif_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """dn -> attribute -> values."""
    out: dict[str, dict[str, list[str]]] = {}
    for chunk in text.strip().split("\n\n"):
        attrs: dict[str, list[str]] = {}
        for line in chunk.splitlines():
            key, _, value = line.partition(": ")
            attrs.setdefault(key, []).append(value)
        out[attrs["dn"][0]] = attrs
    return out


# --------------------------------------------------------------------------- 20-site-node


def test_site_node_tls_hosts_resolv_and_journal_upload(tmp_path, seed):
    block = seed("ws1")
    root = make_root(tmp_path, "ws1")
    ok(run_hook(SITE_NODE, root, block))
    tls = root / "etc/sohocloud/tls"
    assert (tls / "ca.crt").read_text() == block["ca_cert"].strip() + "\n" and mode(tls / "ca.crt") == 0o644
    assert (tls / "node.crt").read_text() == block["tls"]["cert"].strip() + "\n" and mode(tls / "node.crt") == 0o644
    assert (tls / "node.key").read_text() == block["tls"]["key"].strip() + "\n" and mode(tls / "node.key") == 0o600
    hosts = (root / "etc/hosts").read_text().splitlines()
    assert hosts[0] == "127.0.0.1\tlocalhost"
    assert "10.44.0.3\tnas.example.lan\tnas" in hosts and "10.44.0.2\tcontrol.example.lan\tcontrol" in hosts
    resolv = (root / "etc/resolv.conf").read_text().splitlines()
    assert resolv[1:] == ["nameserver 10.44.0.1", "search example.lan"]
    upload = (root / "etc/systemd/journal-upload.conf.d/50-sohocloud.conf").read_text()
    assert "URL=https://control.example.lan:19532\n" in upload
    assert "TrustedCertificateFile=/etc/sohocloud/tls/ca.crt\n" in upload
    exporter = (root / "etc/default/prometheus-node-exporter").read_text()
    assert "--web.listen-address=10.44.0.10:9100" in exporter
    assert "--no-collector.systemd" in exporter  # its D-Bus walk of every unit at each scrape


def test_site_node_hosts_block_replaced_not_duplicated(tmp_path, seed):
    block = seed("ws1")
    root = make_root(tmp_path, "ws1")
    ok(run_hook(SITE_NODE, root, block))
    block["hosts"][2]["address"] = "10.44.0.33"  # nas moved
    ok(run_hook(SITE_NODE, root, block))
    text = (root / "etc/hosts").read_text()
    assert text.count("# BEGIN sohocloud site hosts\n") == 1 and text.count("# END sohocloud site hosts\n") == 1
    assert text.count("localhost") == 1
    assert "10.44.0.33\tnas.example.lan\tnas\n" in text and "10.44.0.3\t" not in text
    assert len(text.splitlines()) == 1 + 2 + len(NODES)


def test_site_node_without_logs_or_dns(tmp_path, seed):
    """The gateway's block has no dns; a site without a log sink has no logs: nothing written for them."""
    root = make_root(tmp_path, "gw")
    ok(run_hook(SITE_NODE, root, seed("gw")))
    conf = root / "etc/systemd/journal-upload.conf.d/50-sohocloud.conf"
    assert conf.is_file()
    block = seed("gw")
    del block["logs"]
    p = ok(run_hook(SITE_NODE, root, block))
    assert not conf.exists()  # removed again
    assert "journal stays local" in p.stderr
    assert not (root / "etc/resolv.conf").exists()


def test_site_node_time_follows_the_router_which_follows_the_sites_servers(tmp_path, seed):
    root = make_root(tmp_path, "ws1")
    p = ok(run_hook(SITE_NODE, root, seed("ws1")))
    sources = (root / "etc/chrony/sources.d/sohocloud.sources").read_text()
    assert sources.splitlines()[1:] == ["server 10.44.0.1 iburst"] and "time: from 10.44.0.1" in p.stderr
    gw = make_root(tmp_path / "gw", "gw")
    ok(run_hook(SITE_NODE, gw, seed("gw")))
    assert (gw / "etc/chrony/sources.d/sohocloud.sources").read_text().splitlines()[1:] == [
        "pool 2.debian.pool.ntp.org iburst"]
    block = seed("gw")
    block["time"]["upstream"] = []
    p = ok(run_hook(SITE_NODE, gw, block))
    assert (gw / "etc/chrony/sources.d/sohocloud.sources").read_text().splitlines()[1:] == []
    assert "from this clock only" in p.stderr


def test_only_the_router_serves_time_to_the_lan_bound_to_its_lan_interface():
    served = (OVERLAYS / "router/etc/chrony/conf.d/50-sohocloud-server.conf").read_text().splitlines()
    assert {"allow", "binddevice lan", "local stratum 10"} <= set(served)
    others = [p for p in OVERLAYS.glob("*/etc/chrony/**/*") if p.is_file() and "router" not in p.parts]
    assert others and not any(line.split()[:1] in (["allow"], ["local"]) for p in others
                              for line in p.read_text().splitlines()), others


def test_site_node_refuses_a_bad_time_server(tmp_path, seed):
    for key, value in (("servers", ["ntp.example.org"]), ("servers", ["10.44.0.1; rm -rf /"])):
        block = seed("ws1")
        block["time"][key] = value
        p = run_hook(SITE_NODE, make_root(tmp_path / str(len(value[0])), "ws1"), block)
        assert p.returncode != 0 and "time.servers" in p.stderr
    block = seed("gw")
    block["time"]["upstream"] = ["pool.ntp.org\nallow all"]
    p = run_hook(SITE_NODE, make_root(tmp_path / "gw", "gw"), block)
    assert p.returncode != 0 and "time.upstream" in p.stderr


def test_site_node_refuses_a_bad_host_address(tmp_path, seed):
    block = seed("ws1")
    block["hosts"][0]["address"] = "10.44.0.1 evil.example.com"
    root = make_root(tmp_path, "ws1")
    p = run_hook(SITE_NODE, root, block)
    assert p.returncode != 0 and "hosts[0].address" in p.stderr
    assert (root / "etc/hosts").read_text() == "127.0.0.1\tlocalhost\n"


# --------------------------------------------------------------------------- 30-ldap-client


def test_ldap_client_sssd_conf(tmp_path, seed):
    block = seed("ws1")
    root = make_root(tmp_path, "ws1")
    ok(run_hook(LDAP_CLIENT, root, block))
    conf = root / "etc/sssd/sssd.conf"
    assert mode(conf) == 0o600
    lines = conf.read_text().splitlines()
    for line in ("ldap_uri = ldaps://control.example.lan", "ldap_search_base = dc=example,dc=lan",
                 "ldap_default_bind_dn = cn=nss,dc=example,dc=lan",
                 f"ldap_default_authtok = {block['ldap']['bind_password']}", "ldap_tls_reqcert = demand",
                 "ldap_tls_cacert = /etc/sohocloud/tls/ca.crt"):
        assert line in lines
    # Every sssd process gets a 60 s heartbeat (default 10 s: on a starved guest they were killed).
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(conf.read_text())
    assert {s: ini[s].get("timeout") for s in ini.sections()} == {
        s: "60" for s in ("sssd", "nss", "pam", "ssh", "domain/site")}
    ldap_conf = (root / "etc/ldap/ldap.conf").read_text().splitlines()
    assert "URI ldaps://control.example.lan" in ldap_conf and "BASE dc=example,dc=lan" in ldap_conf


@pytest.mark.parametrize("key, value", [
    ("uri", "ldap://x"),
    ("uri", "ldaps://control.example.lan\nldap_tls_reqcert = never"),
    ("bind_password", "A" * 20 + "\nldap_tls_reqcert = never"),
    ("base_dn", "dc=example,dc=lan\nenumerate = true"),
])
def test_ldap_client_refuses_bad_values(tmp_path, seed, key, value):
    block = seed("ws1")
    block["ldap"][key] = value
    root = make_root(tmp_path, "ws1")
    p = run_hook(LDAP_CLIENT, root, block)
    assert p.returncode != 0
    assert f"ldap.{key}" in p.stderr
    assert not (root / "etc/sssd/sssd.conf").exists()
    assert block["ldap"]["bind_password"] not in p.stderr  # the refusal never echoes the secret


# --------------------------------------------------------------------------- 40-control


@pytest.fixture
def control_root(tmp_path, seed) -> Path:
    """Control's fake root after 20-site-node: accounts, LAN address and the node's TLS files."""
    block = seed("control")
    root = make_root(tmp_path, "control")
    tls = root / "etc/sohocloud/tls"
    tls.mkdir(parents=True)
    (tls / "ca.crt").write_text(block["ca_cert"])
    (tls / "node.crt").write_text(block["tls"]["cert"])
    (tls / "node.key").write_text(block["tls"]["key"])
    return root


def test_control_directory(control_root, seed):
    block = seed("control")
    ok(run_hook(CONTROL, control_root, block))
    srv = block["ldap_server"]
    config = (control_root / "etc/ldap/slapd.d/config.ldif").read_text().splitlines()
    assert "olcSuffix: dc=example,dc=lan" in config and "olcRootDN: cn=admin,dc=example,dc=lan" in config
    assert f"olcRootPW: {srv['admin_password_hash']}" in config
    data = ldif_entries((control_root / "var/lib/ldap/data.ldif").read_text())
    assert data["cn=nss,dc=example,dc=lan"]["userPassword"] == [srv["nss_password_hash"]]
    users = {u["name"]: u for u in srv["users"]}
    for name, uid in (("alice", "2001"), ("bob", "2002")):
        person = data[f"uid={name},ou=people,dc=example,dc=lan"]
        assert "posixAccount" in person["objectClass"]
        assert person["uidNumber"] == [uid] and person["gidNumber"] == [uid]
        assert person["homeDirectory"] == [f"/nas/home/{name}"]
        assert person["userPassword"] == [users[name]["password_hash"]]
        assert person["userPassword"][0].startswith("{SSHA}")
        private = data[f"cn={name},ou=groups,dc=example,dc=lan"]
        assert private["gidNumber"] == [uid] and "memberUid" not in private
    office = data["cn=office,ou=groups,dc=example,dc=lan"]
    assert office["gidNumber"] == ["5000"] and office["memberUid"] == ["alice", "bob"]
    assert mode(control_root / "etc/ldap/slapd.d") == 0o750 and mode(control_root / "var/lib/ldap") == 0o750
    assert (control_root / "var/lib/ldap/.sohocloud-instance").read_text() == "x\n"
    key = control_root / "etc/ldap/tls/node.key"
    assert mode(key) == 0o640 and key.read_text() == block["tls"]["key"]
    if os.geteuid() == 0:
        assert key.stat().st_gid == 104  # openldap, from the fake root's etc/group
    slapd = (control_root / "etc/default/slapd").read_text()
    assert 'SLAPD_SERVICES="ldaps://10.44.0.2/ ldapi:///"\n' in slapd


def test_control_directory_made_once_per_instance(control_root, seed):
    block = seed("control")
    ok(run_hook(CONTROL, control_root, block, iid="i-1"))
    data = control_root / "var/lib/ldap/data.ldif"
    first = data.read_text()
    block["ldap_server"]["users"].pop()
    ok(run_hook(CONTROL, control_root, block, iid="i-1"))
    assert data.read_text() == first  # same instance: the directory stays
    ok(run_hook(CONTROL, control_root, block, iid="i-2"))
    assert "uid=bob," not in data.read_text() and "uid=alice," in data.read_text()


def test_control_refuses_a_bad_user_name(control_root, seed):
    block = seed("control")
    block["ldap_server"]["users"][1]["name"] = "bad;name"
    p = run_hook(CONTROL, control_root, block)
    assert p.returncode != 0 and "ldap_server.users[1].name" in p.stderr
    assert not (control_root / "var/lib/ldap/data.ldif").exists()


def test_control_prometheus_targets(control_root, seed):
    ok(run_hook(CONTROL, control_root, seed("control")))
    conf = json.loads((control_root / "etc/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in conf["scrape_configs"]}
    assert jobs == {"node": [f"{n}.example.lan:9100" for n in NODES], "prometheus": ["10.44.0.2:9090"]}
    # The site's alerts: the image's rule file, whose every rule names an alert and a query.
    assert conf["rule_files"] == ["/etc/prometheus/sohocloud-rules.yml"]
    rules = yaml.safe_load((OVERLAYS / "control/etc/prometheus/sohocloud-rules.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert {"BackupStepFailed", "BackupTooOld", "BackupNotChecked"} <= set(alerts)
    assert "--web.listen-address=10.44.0.2:9090" in (control_root / "etc/default/prometheus").read_text()


def test_control_cluster_members(control_root, seed):
    ok(run_hook(CONTROL, control_root, seed("control")))
    members = json.loads((control_root / "etc/sohocloud/cluster-members.json").read_text())
    assert members == {"engine": "swarm", "address": "10.44.0.2", "nodes": {
        "control": {"role": "control", "cluster": "manager"},
        "nas": {"role": "storage", "cluster": "worker"},
        "ws1": {"role": "workstation-host", "cluster": "worker"},
        "pc1": {"role": "workstation-host", "cluster": "worker"},
        "pc2": {"role": "workstation-host", "cluster": "worker"}}}


def git_show(repo: Path, rev: str) -> str:
    return subprocess.run(["git", "--git-dir", str(repo), "show", rev], capture_output=True, text=True,
                          check=True).stdout


def test_control_git_repository_created_once(control_root, seed):
    block = seed("control")
    ok(run_hook(CONTROL, control_root, block))
    repo = control_root / "srv/git/site.git"
    assert git_show(repo, "main:site.yaml") == EXAMPLE.read_text()
    head = git_show(repo, "main")
    keys = (control_root / "srv/git/.ssh/authorized_keys").read_text().splitlines()
    assert keys == [f"restrict {k}" for k in block["git_server"]["keys"]]
    assert mode(control_root / "srv/git/.ssh/authorized_keys") == 0o600 and mode(control_root / "srv/git/.ssh") == 0o700
    block["git_server"]["site_file"] = "site: replaced\n"
    ok(run_hook(CONTROL, control_root, block, iid="y"))
    assert git_show(repo, "main") == head  # the site's history is never replaced
    assert git_show(repo, "main:site.yaml") == EXAMPLE.read_text()


def test_control_accepts_the_admin_keys_fleet_build_accepts(tmp_path, control_root):
    text = EXAMPLE.read_text().replace(" admin@example\n", " jürgen@example\n")
    assert text != EXAMPLE.read_text()
    (tmp_path / "sites").mkdir()
    site_file = tmp_path / "sites" / "example.yaml"
    site_file.write_text(text)
    site, profiles = load_example(site_file)
    render_seed("control", list(site.admin_ssh_keys))  # the build host's check: accepted
    block = seed_block(site, "control", profiles, SiteSecrets(tmp_path / "secrets" / site.name))
    assert block["git_server"]["keys"][0].endswith(" jürgen@example")
    p = run_hook(CONTROL, control_root, block)
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------- 40-storage


@pytest.fixture
def storage_root(tmp_path) -> Path:
    root = make_root(tmp_path, "nas")
    (root / "etc/sohocloud").mkdir(parents=True)
    # What overlays/storage/etc/sohocloud/storage.json.j2 renders (disk paths unused off a node).
    (root / "etc/sohocloud/storage.json").write_text(json.dumps(
        {"data_disk": "/dev/null-x", "backup_disk": "/dev/null-y", "nas_root": "/srv/nas",
         "backup_root": "/srv/backup"}))
    return root


def test_storage_exports_backup_password_and_syncthing(storage_root, seed):
    block = seed("nas")
    ok(run_hook(STORAGE, storage_root, block))
    exports = (storage_root / "etc/exports.d/sohocloud.exports").read_text().splitlines()
    assert exports[1:] == [
        # only the site's NAS client (ws1), not the whole LAN
        "/srv/nas 10.44.0.10(rw,fsid=0,crossmnt,no_subtree_check,root_squash,sec=sys) 10.44.0.21(rw,fsid=0,crossmnt,no_subtree_check,root_squash,sec=sys) 10.44.0.22(rw,fsid=0,crossmnt,no_subtree_check,root_squash,sec=sys)",
        "/srv/nas/home 10.44.0.10(rw,sync,no_subtree_check,root_squash,sec=sys) 10.44.0.21(rw,sync,no_subtree_check,root_squash,sec=sys) 10.44.0.22(rw,sync,no_subtree_check,root_squash,sec=sys)",
        "/srv/nas/shared 10.44.0.10(rw,sync,no_subtree_check,root_squash,sec=sys) 10.44.0.21(rw,sync,no_subtree_check,root_squash,sec=sys) 10.44.0.22(rw,sync,no_subtree_check,root_squash,sec=sys)",
    ]
    restic = storage_root / "etc/sohocloud/restic.pass"
    assert restic.read_text() == block["nas_server"]["backup_password"] + "\n" and mode(restic) == 0o600
    # The site's retention for sohocloud-backup (sites/example.yaml keeps the defaults).
    assert json.loads((storage_root / "etc/sohocloud/backup.json").read_text()) == {
        "keep_daily": 7, "keep_weekly": 5, "keep_monthly": 12}
    assert mode(storage_root / "srv/nas/home") == 0o755
    shared = storage_root / "srv/nas/shared"
    if os.geteuid() == 0:
        assert shared.stat().st_gid == 5000  # the site's first group owns the shared folder
    assert mode(shared) == 0o2775
    assert os.readlink(storage_root / "nas") == "/srv/nas"  # /nas/home/<user> on every node
    config = storage_root / "var/lib/syncthing/.config/syncthing/config.xml"
    assert mode(config) == 0o600
    xml = ET.fromstring(config.read_text())
    assert xml.tag == "configuration" and xml.get("version") == "36"
    folder = xml.find("folder")
    assert folder.get("id") == "shared" and folder.get("path") == "/srv/nas/shared"
    assert xml.findtext("options/globalAnnounceEnabled") == "false"
    assert not (storage_root / "etc/fstab").exists()  # no disks touched off a node


@pytest.mark.parametrize("client", ["10.44.0.0/24(rw,no_root_squash) *", "10.44.0.10(rw)", "office"])
def test_storage_refuses_a_bad_client(storage_root, seed, client):
    block = seed("nas")
    block["nas_server"]["clients"] = [client]
    p = run_hook(STORAGE, storage_root, block)
    assert p.returncode != 0 and "nas_server.clients" in p.stderr
    assert not (storage_root / "etc/exports.d/sohocloud.exports").exists()


PXE_SERVER = OVERLAYS / "pxe-server/usr/lib/sohocloud/firstboot.d/55-pxe-server"


def test_pxe_server_binds_the_lan_and_serves_each_seed_to_its_own_address(tmp_path, seed):
    root = make_root(tmp_path, "gw")
    block = seed("gw")
    for h in block["router"]["hosts"]:
        if h["name"] in ("pc1", "pc2"):
            h["netboot"] = True
    ok(run_hook(PXE_SERVER, root, block))
    conf = (root / "etc/sohocloud/lighttpd-pxe.conf").read_text()
    assert 'server.bind = "10.44.0.1"' in conf
    assert '$HTTP["url"] =~ "^/seeds/52:54:00:44:00:21/" { $HTTP["remoteip"] != "10.44.0.21" ' in conf
    assert "52:54:00:44:00:10" not in conf  # ws1 boots from its disk: no seed served
    boot = (root / "etc/dnsmasq.d/75-pxe-boot.conf").read_text()
    assert "dhcp-boot=tag:ipxe,http://10.44.0.1/boot.ipxe" in boot


def test_pxe_server_refuses_a_bad_mac(tmp_path, seed):
    root = make_root(tmp_path, "gw")
    block = seed("gw")
    block["router"]["hosts"].append({"name": "x", "mac": '52:54:00:44:00:99" { }', "address": "10.44.0.99",
                                     "netboot": True})
    p = run_hook(PXE_SERVER, root, block)
    assert p.returncode != 0 and "seed value refused: router.hosts[].mac" in p.stderr
    assert not (root / "etc/sohocloud/lighttpd-pxe.conf").exists()


NAS_USERS = OVERLAYS / "storage/usr/lib/sohocloud/online.d/60-nas-users"


@pytest.mark.skipif(os.geteuid() != 0, reason="gives homes to other uids (root)")
def test_a_home_is_theirs_before_it_appears_and_an_interrupted_one_is_given_on_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SOHOCLOUD_LIB", str(REPO / "firstboot"))
    give_home = runpy.run_path(str(NAS_USERS), run_name="nas_users")["give_home"]
    homes = tmp_path / "home"
    homes.mkdir()
    (homes / ".alice.new").mkdir()  # a run cut before its rename: never in place, still empty
    give_home(homes / "alice", "alice", 2001)
    st = (homes / "alice").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (2001, 2001, 0o700)
    assert sorted(p.name for p in homes.iterdir()) == ["alice"]
    (homes / "bob").mkdir(mode=0o700)  # the old code cut between mkdir and chown: root's
    give_home(homes / "bob", "bob", 2002)
    assert ((homes / "bob").stat().st_uid, stat.S_IMODE((homes / "bob").stat().st_mode)) == (2002, 0o700)
    (homes / "carol").mkdir(mode=0o750)
    os.chown(homes / "carol", 3000, 3000)  # someone else's on purpose: left as it is
    give_home(homes / "carol", "carol", 2003)
    assert ((homes / "carol").stat().st_uid, stat.S_IMODE((homes / "carol").stat().st_mode)) == (3000, 0o750)


ROUTER = OVERLAYS / "router/usr/lib/sohocloud/firstboot.d/50-router"


def test_router_hook_writes_its_files_atomically_with_their_modes(tmp_path, seed):
    root = make_root(tmp_path, "gw")
    block = seed("gw")
    ok(run_hook(ROUTER, root, block))
    hosts = (root / "etc/dnsmasq.d/60-site-hosts.conf").read_text()
    assert "52:54:00:44:00:02" in hosts and "10.44.0.2" in hosts
    assert (root / "etc/dnsmasq.d/50-lan-range.conf").is_file()
    assert mode(root / "etc/dnsmasq.d/60-site-hosts.conf") == 0o644
    assert not list(root.rglob("*.tmp")) and not list(root.rglob(".*.tmp"))  # nothing half-written left


def test_router_lets_vpn_clients_reach_what_the_site_names_and_nothing_else(tmp_path, seed):
    """sites/example.yaml's vpn: the router's DNS and the NAS's SMB. The firewall file opens the
    WireGuard port on the WAN, the router's DNS on wg0, forwarding to nas:445 only; dnsmasq
    answers on wg0. The private key stays in the 0640 netdev (group systemd-network)."""
    root = make_root(tmp_path, "gw")
    block = seed("gw")
    ok(run_hook(ROUTER, root, block))
    nft = [line for line in (root / "etc/nftables.d/50-wireguard.nft").read_text().splitlines()
           if not line.startswith("#")]
    assert nft == ['add element inet filter seed_ports { "wan" . udp . 51820 }',
                   'add element inet filter seed_ports { "wg0" . udp . 53 }',
                   'add element inet filter seed_forward { "wg0" . "lan" . 10.44.0.3 . tcp . 445 }']
    assert mode(root / "etc/nftables.d/50-wireguard.nft") == 0o600
    assert (root / "etc/dnsmasq.d/55-vpn.conf").read_text().splitlines()[1:] == ["interface=wg0",
                                                                                 "no-dhcp-interface=wg0"]
    netdev = root / "etc/systemd/network/30-wg0.netdev"
    assert block["wireguard"]["private_key"] in netdev.read_text() and mode(netdev) == 0o640
    assert "Address=10.45.0.1/24" in (root / "etc/systemd/network/30-wg0.network").read_text()
    # Without a vpn in the seed (the site dropped it) every piece goes.
    del block["wireguard"]
    ok(run_hook(ROUTER, root, block))
    assert not [p for p in ("etc/nftables.d/50-wireguard.nft", "etc/dnsmasq.d/55-vpn.conf",
                            "etc/systemd/network/30-wg0.netdev") if (root / p).exists()]


@pytest.mark.parametrize("entry, why", [({"address": "192.168.1.5", "proto": "tcp", "ports": "22"}, "not on the LAN"),
                                        ({"address": "10.44.0.1", "proto": "tcp", "ports": "1-1000"}, "one by one"),
                                        ({"address": "10.44.0.3", "proto": "icmp", "ports": "1"}, "proto"),
                                        ({"address": "fd00::3", "proto": "tcp", "ports": "22"}, "IPv4 only"),
                                        ({"address": "10.44.0.3", "proto": "tcp", "ports": "22 } ; flush"}, "ports")])
def test_router_refuses_a_vpn_reach_beyond_the_lan_or_malformed(tmp_path, seed, entry, why):
    root = make_root(tmp_path, "gw")
    block = seed("gw")
    block["wireguard"]["reach"] = [entry]
    p = run_hook(ROUTER, root, block)
    assert p.returncode != 0 and why in p.stderr and block["wireguard"]["private_key"] not in p.stderr
    assert not (root / "etc/nftables.d/50-wireguard.nft").exists()
    assert not (root / "etc/systemd/network/30-wg0.netdev").exists()  # nothing of it half-written
