"""Tier 1: site services in seeds (builder/fleet.py): providers, per-role sections, secrets, determinism.

Profiles are resolved from the real repository and the site is sites/example.yaml,
so these tests follow the roles' real `provides`/`uses`/`cluster` settings.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from builder.errors import SohoError
from builder.fleet.secrets import SiteSecrets
from builder.fleet.seeds import SeedContext, find_providers, node_settings, service_sections, ssha, write_node_seed
from builder.image.s1_resolve import Repo, resolve
from builder.image.schema import Profile
from builder.seed import read_cidata
from builder.fleet.sitefile import Cluster, K3sArtifacts, Site, SiteNode, load_repo_site

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "sites" / "example.yaml"
SITE_ROLES = ("router", "control", "storage", "workstation-host")
NODES = ("gw", "control", "nas", "ws1", "pc1", "pc2")  # pc1, pc2: diskless (PXE)

HAVE_FAT = all(shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin") for t in ("mkfs.vfat", "mcopy", "mdir"))


# --------------------------------------------------------------------------- helpers (also used by test_role_hooks)


def load_example(path: Path = EXAMPLE) -> tuple[Site, dict[str, Profile]]:
    """sites/example.yaml (or a variant of it) and the resolved profiles of its roles."""
    repo = Repo(REPO)
    site = load_repo_site(repo, str(path))
    return site, {role: resolve(repo, role).profile for role in SITE_ROLES}


# The desktop template as `fleet build` tells the workstation hosts where it is served (build.served_images).
TEMPLATE = {"file": "desktop-debian-amd64-template.squashfs", "sha256": "ab" * 32,
            "url": "http://10.44.0.1/images/desktop-debian-amd64-template.squashfs"}


def images_of(profiles: dict[str, Profile], site: Site, name: str) -> tuple[dict[str, str], ...]:
    return (dict(TEMPLATE),) if profiles[site.node(name).role].images else ()  # a copy: tests edit blocks


def seed_block(site: Site, name: str, profiles: dict[str, Profile], secrets: SiteSecrets) -> dict:
    """The `sohocloud:` block of node *name*'s seed, exactly as write_node_seed builds it."""
    node = site.node(name)
    ctx = SeedContext(site, node, profiles, find_providers(site, profiles), secrets, EXAMPLE.read_text(),
                      images=images_of(profiles, site, name))
    return node_settings(site, node, secrets, ctx)


def ssha_matches(hashed: str, password: str) -> bool:
    """RFC 2307 {SSHA}: base64(sha1(password + salt) + salt)."""
    assert hashed.startswith("{SSHA}"), hashed
    raw = base64.b64decode(hashed[len("{SSHA}"):], validate=True)
    digest, salt = raw[:20], raw[20:]
    return len(salt) > 0 and hashlib.sha1(password.encode() + salt).digest() == digest


def read_secret(secrets: SiteSecrets, rel: str) -> str:
    return (secrets.root / rel).read_text().strip()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def example() -> tuple[Site, dict[str, Profile]]:
    return load_example()


@pytest.fixture
def site(example) -> Site:
    return example[0]


@pytest.fixture
def profiles(example) -> dict[str, Profile]:
    return example[1]


@pytest.fixture
def secrets(site, tmp_path) -> SiteSecrets:
    return SiteSecrets(tmp_path / "secrets" / site.name)


@pytest.fixture
def blocks(site, profiles, secrets) -> dict[str, dict]:
    return {n: seed_block(site, n, profiles, secrets) for n in NODES}


def with_nodes(site: Site, *nodes: SiteNode, drop: tuple[str, ...] = ()) -> Site:
    return dataclasses.replace(site, nodes=tuple(n for n in site.nodes if n.name not in drop) + nodes)


# --------------------------------------------------------------------------- find_providers


def test_example_site_providers(site, profiles):
    providers = find_providers(site, profiles)
    assert {svc: n.name for svc, n in providers.items()} == {
        "cluster": "control", "desktops": "control", "git": "control", "ldap": "control", "logs": "control",
        "metrics": "control", "nas": "nas", "pxe": "gw", "time": "gw"}


@pytest.mark.parametrize("drop, expect", [
    ("nas", ("node ws1 (workstation-host) uses 'nas'", "no node provides it", "roles: storage")),
    ("control", ("node nas (storage) uses 'cluster'", "no node provides it", "roles: control")),
])
def test_used_service_without_provider(site, profiles, drop, expect):
    """The error names the node, its role, the service and the roles that would provide it."""
    with pytest.raises(SohoError) as exc:
        find_providers(with_nodes(site, drop=(drop,)), profiles)
    for part in expect:
        assert part in str(exc.value)


def test_missing_provider_hint_with_the_profiles_fleet_build_loads(site, profiles):
    """cmd_fleet_build passes every role's profile (not only the site's), so the hint names the provider role."""
    from builder.image.s1_resolve import load_profile

    small = with_nodes(site, drop=("nas",))
    repo = Repo(REPO)
    loaded = {r: load_profile(repo, r) for r in repo.roles()}  # as builder/cli.py does
    with pytest.raises(SohoError) as exc:
        find_providers(small, loaded)
    assert "node ws1 (workstation-host) uses 'nas'" in str(exc.value)
    assert "roles: storage" in str(exc.value)


def test_two_providers_of_one_service(site, profiles):
    nas2 = SiteNode(name="nas2", role="storage", address="10.44.0.4", mac="52:54:00:44:00:04")
    with pytest.raises(SohoError) as exc:
        find_providers(with_nodes(site, nas2), profiles)
    msg = str(exc.value)
    assert "service 'nas'" in msg and "nas (storage)" in msg and "nas2 (storage)" in msg


# --------------------------------------------------------------------------- control


def test_control_ldap_server_holds_hashes_only(blocks, secrets):
    block = blocks["control"]
    srv = block["ldap_server"]
    admin, nss = read_secret(secrets, "ldap-admin.secret"), read_secret(secrets, "ldap-nss.secret")
    assert srv["admin_password_hash"].startswith("{SSHA}") and srv["nss_password_hash"].startswith("{SSHA}")
    assert ssha_matches(srv["admin_password_hash"], admin)
    assert ssha_matches(srv["nss_password_hash"], nss)
    assert srv["groups"] == [{"name": "office", "gid": 5000}]
    users = {u["name"]: u for u in srv["users"]}
    assert sorted(users) == ["alice", "bob"]
    assert users["alice"]["uid"] == 2001 and users["alice"]["groups"] == ["office"]
    assert users["alice"]["home"] == "/nas/home/alice"  # the site has a NAS: homes live there
    for name, u in users.items():
        assert ssha_matches(u["password_hash"], read_secret(secrets, f"users/{name}.password"))
    text = json.dumps(block)
    for plain in [admin, nss] + [read_secret(secrets, f"users/{n}.password") for n in users]:
        assert plain not in text


def test_control_is_cluster_manager_of_every_cluster_node(blocks):
    cluster = blocks["control"]["cluster"]
    assert cluster["role"] == "manager" and cluster["engine"] == "swarm" and cluster["node_role"] == "control"
    assert cluster["manager"] == {"name": "control", "fqdn": "control.example.lan", "address": "10.44.0.2"}
    assert cluster["members"] == {
        "control": {"role": "control", "cluster": "manager"},
        "nas": {"role": "storage", "cluster": "worker"},
        "ws1": {"role": "workstation-host", "cluster": "worker"},
        "pc1": {"role": "workstation-host", "cluster": "worker"},
        "pc2": {"role": "workstation-host", "cluster": "worker"},
    }  # not gw: the router is in no cluster
    assert "k3s_token" not in cluster


def test_control_metrics_targets_every_node(blocks):
    assert blocks["control"]["metrics_server"]["targets"] == [
        {"fqdn": f"{n}.example.lan", "port": 9100} for n in NODES]


def test_control_git_server_gets_site_file_and_admin_keys(blocks, site):
    git = blocks["control"]["git_server"]
    assert git["site_file"] == EXAMPLE.read_text()
    assert git["keys"] == list(site.admin_ssh_keys) and git["keys"][0].startswith("ssh-ed25519 ")


def test_site_password_hash_is_used_as_crypt(site, profiles, secrets):
    crypt = "$6$saltsalt$" + "a" * 86
    users = (dataclasses.replace(site.users[0], password_hash=crypt),) + site.users[1:]
    block = seed_block(dataclasses.replace(site, users=users), "control", profiles, secrets)
    hashes = {u["name"]: u["password_hash"] for u in block["ldap_server"]["users"]}
    assert hashes["alice"] == "{CRYPT}" + crypt
    assert hashes["bob"].startswith("{SSHA}")
    assert not (secrets.root / "users" / "alice.password").exists()  # nothing generated for alice
    assert (secrets.root / "users" / "bob.password").is_file()


def test_k3s_token_only_in_the_managers_seed(site, profiles, secrets):
    k3s = K3sArtifacts(binary="k3s", binary_sha256="0" * 64, images="i.tar", images_sha256="1" * 64)
    k3s_site = dataclasses.replace(site, cluster=Cluster(engine="k3s", k3s=k3s))
    manager = seed_block(k3s_site, "control", profiles, secrets)["cluster"]
    assert manager["engine"] == "k3s" and manager["k3s_token"] == read_secret(secrets, "k3s-token.secret")
    for name in ("nas", "ws1"):
        worker = seed_block(k3s_site, name, profiles, secrets)["cluster"]
        assert worker["engine"] == "k3s" and worker["role"] == "worker" and "k3s_token" not in worker


# --------------------------------------------------------------------------- storage


def test_storage_nas_server(blocks, secrets):
    srv = blocks["nas"]["nas_server"]
    assert srv["lan"] == "10.44.0.0/24"
    assert srv["shared_group"] == {"name": "office", "gid": 5000}  # the site's first group
    assert srv["backup_password"] == read_secret(secrets, "restic.secret")
    assert [(u["name"], u["uid"]) for u in srv["users"]] == [("alice", 2001), ("bob", 2002)]
    for u in srv["users"]:
        f = secrets.root / "users" / f"{u['name']}.password"
        assert u["smb_password"] == f.read_text().strip() and len(u["smb_password"]) >= 32
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE((secrets.root / "users").stat().st_mode) == 0o700


def test_ldap_clients_bind_with_the_password_control_hashed(blocks, secrets):
    nss = read_secret(secrets, "ldap-nss.secret")
    for name in ("nas", "ws1"):
        assert blocks[name]["ldap"] == {"uri": "ldaps://control.example.lan", "base_dn": "dc=example,dc=lan",
                                        "bind_dn": "cn=nss,dc=example,dc=lan", "bind_password": nss}
    assert ssha_matches(blocks["control"]["ldap_server"]["nss_password_hash"], blocks["nas"]["ldap"]["bind_password"])


def test_nas_server_needs_a_group(site, profiles, secrets):
    with pytest.raises(SohoError, match="declare at least one under groups"):
        seed_block(dataclasses.replace(site, groups=()), "nas", profiles, secrets)


# --------------------------------------------------------------------------- workstation host, router, all


def test_workstation_host_nas_client_and_cluster_worker(blocks):
    block = blocks["ws1"]
    assert block["nas"] == {"server": "nas.example.lan", "export": "/home", "mountpoint": "/nas/home"}
    cluster = block["cluster"]
    assert cluster["role"] == "worker" and cluster["node_role"] == "workstation-host"
    assert cluster["manager"] == {"name": "control", "fqdn": "control.example.lan", "address": "10.44.0.2"}
    assert cluster["join_port"] == 7443 and "members" not in cluster
    assert "nas_server" not in block and "ldap_server" not in block


def test_router_gets_no_cluster_block(blocks):
    block = blocks["gw"]
    assert "cluster" not in block and "dns" not in block  # the gateway is the DNS server
    assert block["logs"] == {"host": "control.example.lan", "port": 19532}
    assert [h["name"] for h in block["router"]["hosts"]] == list(NODES)


def test_every_node_gets_services_hosts_and_dns(blocks, site):
    hosts = [{"name": n.name, "fqdn": f"{n.name}.example.lan", "address": n.address} for n in site.nodes]
    for name, block in blocks.items():
        assert block["hosts"] == hosts, name
        assert block["services"]["nas"] == {"name": "nas", "fqdn": "nas.example.lan", "address": "10.44.0.3"}
        assert sorted(block["services"]) == ["cluster", "desktops", "git", "ldap", "logs", "metrics", "nas", "pxe", "time"], name
        if name != "gw":
            assert block["dns"] == {"servers": ["10.44.0.1"], "search": ["example.lan"]}, name


def test_service_sections_only_for_the_nodes_role(site, profiles, secrets):
    node = site.node("ws1")
    ctx = SeedContext(site, node, profiles, find_providers(site, profiles), secrets, "", images=(TEMPLATE,))
    assert set(service_sections(ctx)) == {"logs", "cluster", "ldap", "nas", "desk", "time", "services"}


def test_the_router_serves_the_sites_time_and_every_other_node_follows_it_by_address(site, profiles, secrets):
    providers = find_providers(site, profiles)
    sections = {n.name: service_sections(SeedContext(site, n, profiles, providers, secrets, "", images=(TEMPLATE,)))
                for n in site.nodes}
    assert sections["gw"]["time"] == {"upstream": ["2.debian.pool.ntp.org"]}
    for name, block in sections.items():
        if name != "gw":
            assert block["time"] == {"servers": ["10.44.0.1"]}, name  # no DNS needed to keep the time
    offline = dataclasses.replace(site, time_servers=())
    gw = service_sections(SeedContext(offline, offline.node("gw"), profiles, providers, secrets, ""))
    assert gw["time"] == {"upstream": []}


# --------------------------------------------------------------------------- seeds and hashes


@pytest.mark.skipif(not HAVE_FAT, reason="dosfstools/mtools not installed")
def test_seed_is_deterministic(site, profiles, secrets, tmp_path):
    node = site.node("control")
    text = EXAMPLE.read_text()
    a = write_node_seed(site, node, secrets, tmp_path / "a", profiles=profiles, site_text=text)
    b = write_node_seed(site, node, secrets, tmp_path / "b", profiles=profiles, site_text=text)
    assert a.read_bytes() == b.read_bytes()
    assert stat.S_IMODE(a.stat().st_mode) == 0o600
    files = read_cidata(a)
    assert yaml.safe_load(files["user-data"])["sohocloud"] == seed_block(site, "control", profiles, secrets)
    iid = yaml.safe_load(files["meta-data"])["instance-id"]
    assert iid.startswith("control-") and len(iid) == len("control-") + 12
    # The instance-id is a hash of the content, except the site file's own text (a comment edit
    # must not re-provision control); a change that reaches the node's settings gives a new id.
    c = write_node_seed(site, node, secrets, tmp_path / "c", profiles=profiles, site_text=text + "# edit\n")
    assert yaml.safe_load(read_cidata(c)["meta-data"])["instance-id"] == iid
    moved = dataclasses.replace(site, domain="elsewhere.lan")
    d = write_node_seed(moved, moved.node("control"), secrets, tmp_path / "d", profiles=profiles, site_text=text)
    assert yaml.safe_load(read_cidata(d)["meta-data"])["instance-id"] != iid


def test_ssha_verifies_and_is_stable():
    h1 = ssha("correct horse")
    assert h1.startswith("{SSHA}") and ssha_matches(h1, "correct horse")
    assert not ssha_matches(h1, "correct horsf")
    assert len(base64.b64decode(h1[6:])) == 20 + 8  # sha1 digest + 8-byte salt
    assert ssha("correct horse") == h1  # same seed on every fleet build
    assert base64.b64decode(ssha("other")[6:])[20:] != base64.b64decode(h1[6:])[20:]  # salt differs per password


def test_router_seed_flags_the_netboot_nodes(site, profiles, secrets):
    """The PXE server serves a seed only for nodes flagged netboot, each to its reserved address."""
    node = site.node("gw")
    ctx = SeedContext(site, node, profiles, find_providers(site, profiles), secrets, "")
    hosts = node_settings(site, node, secrets, ctx, frozenset({"pc1", "pc2"}))["router"]["hosts"]
    assert {h["name"] for h in hosts if h.get("netboot")} == {"pc1", "pc2"}
    assert {h["name"]: h["address"] for h in hosts}["pc1"] == "10.44.0.21"


def test_vpn_only_in_the_routers_seed_and_each_peer_gets_its_config(site, blocks, secrets):
    """The router's seed carries its WireGuard key, the peers' public keys and what they reach; no
    other node's seed has any of it. The peer sohocloud made a key for gets a 0600 wg-quick config
    whose key is the one the router admits, routing only what it may reach."""
    from builder.fleet.secrets import wireguard_public
    from builder.fleet.vpn import write_client_configs
    wg = blocks["gw"]["wireguard"]
    assert wg["address"] == "10.45.0.1/24" and wg["listen_port"] == 51820 and wg["zone"] == "wan"
    assert wg["reach"] == [{"address": "10.44.0.1", "proto": "udp", "ports": "53"},
                           {"address": "10.44.0.3", "proto": "tcp", "ports": "445"}]
    for name, block in blocks.items():
        if name != "gw":
            assert "wireguard" not in block and wg["private_key"] not in json.dumps(block)
    write_client_configs(site, secrets)
    conf = secrets.root / "vpn" / "laptop.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    lines = dict(line.split(" = ", 1) for line in conf.read_text().splitlines() if " = " in line)
    assert wg["peers"] == [{"public_key": wireguard_public(lines["PrivateKey"]), "allowed_ips": ["10.45.0.2/32"]}]
    assert lines["PublicKey"] == wireguard_public(wg["private_key"])
    assert lines["AllowedIPs"] == "10.44.0.1/32, 10.44.0.3/32" and lines["Address"] == "10.45.0.2/32"
    assert lines["DNS"] == f"10.44.0.1, {site.domain}" and lines["Endpoint"].endswith(":51820")
