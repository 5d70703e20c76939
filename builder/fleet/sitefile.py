"""A site: one YAML file describing the office (nodes, LAN, users, cluster).

Validated like profiles (file:line, key, expectation) before anything is
built; the result is one frozen Site object.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sohocloud_firstboot.seedrules import DOMAIN_RE, LABEL_RE, WG_KEY_RE, is_public_key

from ..errors import ConfigError
from ..image.config import Repo
from ..image.s1_resolve import gateway_roles
from ..image.schema import ARCHES, Validator
from ..image.yamlsrc import Origin, load_yaml
from .desktops import Desktops, check_desktops

MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
NAME_RE = re.compile(f"^{LABEL_RE.pattern}$")  # the rule the nodes' hooks check a seed's names with
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CRYPT_RE = re.compile(r"\$[0-9a-z]+\$[A-Za-z0-9./$]+")  # the same form firstboot accepts ({CRYPT})
# People and groups live above the image's own accounts (admin is 1000, service
# accounts below): a person can never share an id with a local account.
SITE_IDS = range(2000, 60000)
# Local account and group names of the images: a person named like one would
# shadow it through sssd.
RESERVED_NAMES = frozenset({"root", "admin", "git", "syncthing", "nobody", "daemon", "openldap", "prometheus",
                            "sudo", "staff", "users", "docker", "ssh", "systemd-journal"})


@dataclass(frozen=True)
class SiteNode:
    name: str
    role: str
    address: str  # LAN address, without prefix
    mac: str
    target: str = "qemu"
    arch: str = "amd64"
    # The firmware `fleet up` gives a diskless (netboot) node's VM: a real PC's is its own.
    firmware: Literal["uefi", "bios"] = "uefi"


@dataclass(frozen=True)
class LdapGroup:
    name: str
    gid: int


@dataclass(frozen=True)
class LdapUser:
    name: str
    uid: int
    groups: tuple[str, ...] = ()
    ssh_keys: tuple[str, ...] = ()
    password_hash: str | None = None


@dataclass(frozen=True)
class K3sArtifacts:
    binary: str
    binary_sha256: str
    images: str
    images_sha256: str


@dataclass(frozen=True)
class Cluster:
    engine: Literal["swarm", "k3s"] = "swarm"
    k3s: K3sArtifacts | None = None


@dataclass(frozen=True)
class Certificates:
    """The nodes' TLS certificates from the site CA: how long each is valid, and how long before it
    ends `fleet build` issues the next one (`fleet renew` installs it on running nodes)."""
    valid_days: int = 825
    renew_before_days: int = 30


@dataclass(frozen=True)
class Backups:
    """How long the NAS keeps its nightly backups (restic forget --prune): the last snapshot of each
    of the last N days, weeks and months."""
    keep_daily: int = 7
    keep_weekly: int = 5
    keep_monthly: int = 12


@dataclass(frozen=True)
class VpnPeer:
    name: str
    address: str  # its address in the tunnel (vpn.network)
    # Its own key pair's public half. Without it sohocloud makes the pair and writes the peer's
    # config to secrets/<site>/vpn/<name>.conf, to hand over.
    public_key: str | None = None


@dataclass(frozen=True)
class VpnReach:
    """One thing VPN clients may reach: a node, or one of its ports."""
    node: str
    port: int | None = None  # none: every port of the node (not for the gateway itself)
    proto: Literal["tcp", "udp"] = "tcp"


@dataclass(frozen=True)
class Vpn:
    """Remote access: WireGuard on the gateway's WAN side. Clients reach what `reach` names, and
    nothing else: not the internet through the office, not another node, not another port."""
    network: str  # the tunnel's IPv4 network; the gateway takes its first address
    peers: tuple[VpnPeer, ...]
    reach: tuple[VpnReach, ...]
    port: int = 51820
    # The gateway's public DNS name or address, for the clients' configs (else a placeholder to fill).
    endpoint: str = ""

    @property
    def tunnel(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.network)

    @property
    def gateway_address(self) -> str:
        return str(next(self.tunnel.hosts()))


@dataclass(frozen=True)
class Site:
    name: str
    domain: str
    lan: str  # CIDR of the office LAN
    admin_ssh_keys: tuple[str, ...]
    nodes: tuple[SiteNode, ...]
    cluster: Cluster = Cluster()
    groups: tuple[LdapGroup, ...] = ()
    users: tuple[LdapUser, ...] = ()
    desktops: Desktops = dataclasses.field(default_factory=Desktops)
    # Where the router takes the time it serves the LAN (NTP). None reachable: the router's own clock,
    # so the office's clocks still agree with each other (TOTP, TLS, the log sink need that).
    time_servers: tuple[str, ...] = ("2.debian.pool.ntp.org",)
    vpn: Vpn | None = None
    backups: Backups = Backups()
    certificates: Certificates = Certificates()
    gateway: str = ""  # name of the node whose role is the gateway (set by load_site, not in YAML)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.lan)

    def node(self, name: str) -> SiteNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"site '{self.name}' has no node '{name}' (nodes: {', '.join(n.name for n in self.nodes)})")

    def nodes_with_role(self, role: str) -> list[SiteNode]:
        return [n for n in self.nodes if n.role == role]

    def builds(self) -> list[tuple[str, str, str]]:
        """Each (role, arch, target) the site needs, once."""
        return sorted({(n.role, n.arch, n.target) for n in self.nodes})


def site_path(repo_root: Path, site: str) -> Path:
    """A site given by name (sites/<name>.yaml) or by path."""
    p = Path(site)
    if p.suffix in (".yaml", ".yml") or "/" in site:
        return p
    return repo_root / "sites" / f"{site}.yaml"


def load_site(path: Path, *, known_roles: list[str], gateway_roles: list[str]) -> Site:
    """The site file at *path*, checked. Files it names (k3s's, an htpasswd) are relative to its folder."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such site file")
    doc = load_yaml(path)
    v = Validator(doc.origins, Origin(path, 1))
    data = dict(doc.data)
    if "site" in data:
        data["name"] = data.pop("site")
        if ("site",) in doc.origins:
            doc.origins[("name",)] = doc.origins[("site",)]
    if "gateway" in data:
        v.fail(("gateway",), "unknown key 'gateway' (the gateway is the node whose role is one)")
    site = v.build_dataclass(Site, data, ())
    _check(site, v, known_roles, gateway_roles, path.parent)
    gateway = next(n.name for n in site.nodes if n.role in gateway_roles)
    return dataclasses.replace(site, gateway=gateway)


def load_repo_site(repo: Repo, site: str) -> Site:
    """The site named by *site* (a name in sites/ or a path), checked against the repo's roles."""
    return load_site(site_path(repo.root, site), known_roles=repo.roles(), gateway_roles=gateway_roles(repo))


def _check(site: Site, v: Validator, known_roles: list[str], gateway_roles: list[str], base: Path) -> None:
    if not NAME_RE.match(site.name):
        v.fail(("site",), f"expected a lowercase DNS label for the site name, got {site.name!r}")
    try:
        net = ipaddress.IPv4Network(site.lan)
    except ValueError as exc:
        v.fail(("lan",), f"expected an IPv4 network like 10.44.0.0/24: {exc}")
    if not site.admin_ssh_keys:
        v.fail(("admin_ssh_keys",), "expected at least one admin SSH public key")
    _check_nodes(site, v, net, known_roles)
    gateways = [n for n in site.nodes if n.role in gateway_roles]
    if len(gateways) != 1:
        v.fail(("nodes",), f"expected exactly one node with a gateway role ({', '.join(gateway_roles)}), "
               f"found {len(gateways)}")
    _check_groups(site, v)
    for i, key in enumerate(site.admin_ssh_keys):
        if not is_public_key(key.strip()):
            v.fail(("admin_ssh_keys", i), "expected an OpenSSH public key line ('ssh-ed25519 AAAA... comment')")
    _check_users(site, v)
    for i, server in enumerate(site.time_servers):
        if not (DOMAIN_RE.fullmatch(server) and len(server) <= 253):
            v.fail(("time_servers", i), f"expected an NTP server's DNS name or IPv4 address, got {server!r}")
    check_desktops(site.desktops, v, {g.name for g in site.groups}, base)
    if site.vpn is not None:
        _check_vpn(site, site.vpn, v, net, gateway_roles)
    for key, value in dataclasses.asdict(site.backups).items():
        if value < 0:
            v.fail(("backups", key), f"expected a count of snapshots to keep (0 or more), got {value}")
    c = site.certificates
    if not 1 <= c.valid_days <= 3650:
        v.fail(("certificates", "valid_days"), f"expected 1 to 3650 days (the site CA's own life), got {c.valid_days}")
    if not 0 <= c.renew_before_days < c.valid_days:
        v.fail(("certificates", "renew_before_days"), f"expected 0 or more days, fewer than valid_days "
               f"({c.valid_days}: else every build would renew every certificate), got {c.renew_before_days}")
    if not any(dataclasses.asdict(site.backups).values()):
        v.fail(("backups",), "keeps no snapshot at all: every backup would be forgotten")
    if site.cluster.engine == "k3s":
        _check_k3s(site, v, base)


def _check_nodes(site: Site, v: Validator, net: ipaddress.IPv4Network, known_roles: list[str]) -> None:
    seen: dict[str, dict[str, int]] = {"name": {}, "mac": {}, "address": {}}
    for i, node in enumerate(site.nodes):
        where = ("nodes", i)
        if not NAME_RE.match(node.name):
            v.fail(where + ("name",), f"expected a lowercase DNS label, got {node.name!r}")
        if node.role not in known_roles:
            v.fail(where + ("role",), f"unknown role '{node.role}' (known: {', '.join(known_roles)})")
        if node.arch not in ARCHES:
            v.fail(where + ("arch",), f"expected one of {', '.join(ARCHES)}, got {node.arch!r}")
        if not MAC_RE.match(node.mac):
            v.fail(where + ("mac",), f"expected a lowercase MAC like 52:54:00:44:00:01, got {node.mac!r}")
        try:
            addr = ipaddress.IPv4Address(node.address)
        except ValueError:
            v.fail(where + ("address",), f"expected an IPv4 address, got {node.address!r}")
        if addr not in net or addr in (net.network_address, net.broadcast_address):
            v.fail(where + ("address",), f"{addr} is not a host address of the site LAN {net}")
        if addr == net.broadcast_address - 1:
            v.fail(where + ("address",), f"{addr} is reserved: the LAN's last address is the host's seat on a "
                   "test LAN (fleet up)")
        for key in ("name", "mac", "address"):
            value = getattr(node, key)
            if value in seen[key]:
                v.fail(where + (key,), f"duplicate {key} {value!r} (also node {seen[key][value]})")
            seen[key][value] = i


def _check_groups(site: Site, v: Validator) -> None:
    uids = {u.uid: u.name for u in site.users}
    for i, g in enumerate(site.groups):
        if g.gid not in SITE_IDS:
            v.fail(("groups", i, "gid"), f"expected a gid from {SITE_IDS.start} to {SITE_IDS.stop - 1} "
                   f"(below are the images' own accounts), got {g.gid}")
        if g.name in RESERVED_NAMES or not NAME_RE.match(g.name):
            v.fail(("groups", i, "name"), f"{g.name!r} is reserved or not a lowercase name")
        if sum(1 for x in site.groups if x.gid == g.gid or x.name == g.name) > 1:
            v.fail(("groups", i), f"duplicate group name or gid ({g.name}, {g.gid})")
        if g.gid in uids:
            # Every person has a private group with gid == uid (Debian's scheme).
            v.fail(("groups", i, "gid"), f"gid {g.gid} is user {uids[g.gid]}'s uid (their private group)")


def _check_users(site: Site, v: Validator) -> None:
    gids = {g.name: g.gid for g in site.groups}
    for i, user in enumerate(site.users):
        for j, key in enumerate(user.ssh_keys):
            if not is_public_key(key.strip()):
                v.fail(("users", i, "ssh_keys", j), "expected an OpenSSH public key line ('ssh-ed25519 AAAA... comment')")
        if user.password_hash is not None and not CRYPT_RE.fullmatch(user.password_hash):
            v.fail(("users", i, "password_hash"), "expected a crypt(3) hash like $6$salt$... "
                   "(e.g. from `mkpasswd -m sha-512`), not a password")
        if not NAME_RE.match(user.name):
            v.fail(("users", i, "name"), f"expected a lowercase login name, got {user.name!r}")
        if user.uid not in SITE_IDS:
            v.fail(("users", i, "uid"), f"expected a uid from {SITE_IDS.start} to {SITE_IDS.stop - 1} "
                   f"(below are the images' own accounts), got {user.uid}")
        if user.name in RESERVED_NAMES:
            v.fail(("users", i, "name"), f"'{user.name}' is a local account or group of the images: choose another")
        if sum(1 for x in site.users if x.uid == user.uid or x.name == user.name) > 1:
            v.fail(("users", i), f"duplicate user name or uid ({user.name}, {user.uid})")
        if user.name in gids:
            v.fail(("users", i, "name"), f"'{user.name}' is also a group name (each person has a private group)")
        for j, g in enumerate(user.groups):
            if g not in gids:
                v.fail(("users", i, "groups", j), f"unknown group '{g}' (declare it under groups)")


def _check_vpn(site: Site, vpn: Vpn, v: Validator, lan: ipaddress.IPv4Network, gateway_roles: list[str]) -> None:
    try:
        tunnel = vpn.tunnel
    except ValueError as exc:
        v.fail(("vpn", "network"), f"expected an IPv4 network like 10.45.0.0/24: {exc}")
    if tunnel.overlaps(lan) or tunnel.prefixlen > 30:
        v.fail(("vpn", "network"), f"expected a network apart from the LAN {lan}, with room for peers (/30 or "
               f"larger), got {tunnel}")
    if not 0 < vpn.port < 65536:
        v.fail(("vpn", "port"), f"expected a UDP port 1-65535, got {vpn.port}")
    if vpn.endpoint and not (DOMAIN_RE.fullmatch(vpn.endpoint) and len(vpn.endpoint) <= 253):
        v.fail(("vpn", "endpoint"), f"expected the router's public DNS name or IPv4 address, got {vpn.endpoint!r}")
    if not vpn.peers:
        v.fail(("vpn", "peers"), "expected at least one peer {name, address[, public_key]}")
    seen: dict[str, int] = {}
    for i, peer in enumerate(vpn.peers):
        where = ("vpn", "peers", i)
        if not NAME_RE.match(peer.name):
            v.fail(where + ("name",), f"expected a lowercase name, got {peer.name!r}")
        try:
            addr = ipaddress.IPv4Address(peer.address)
        except ValueError:
            v.fail(where + ("address",), f"expected an IPv4 address, got {peer.address!r}")
        if addr not in tunnel or addr in (tunnel.network_address, tunnel.broadcast_address) \
                or str(addr) == vpn.gateway_address:
            v.fail(where + ("address",), f"expected a host address of {tunnel} other than the router's "
                   f"{vpn.gateway_address}, got {addr}")
        if peer.public_key is not None and not WG_KEY_RE.fullmatch(peer.public_key):
            v.fail(where + ("public_key",), "expected a WireGuard public key (44 characters of base64, `wg pubkey`)")
        for key in ("name", "address"):
            value = getattr(peer, key)
            if value in seen:
                v.fail(where + (key,), f"duplicate {key} {value!r} (also peer {seen[value]})")
            seen[value] = i
    if not vpn.reach:
        v.fail(("vpn", "reach"), "expected what VPN clients may reach: [{node: nas, port: 445}, ...]")
    names = {n.name: n for n in site.nodes}
    for i, r in enumerate(vpn.reach):
        if r.node not in names:
            v.fail(("vpn", "reach", i, "node"), f"unknown node '{r.node}' (nodes: {', '.join(names)})")
        if r.port is not None and not 0 < r.port < 65536:
            v.fail(("vpn", "reach", i, "port"), f"expected a port 1-65535, got {r.port}")
        if r.port is None and names[r.node].role in gateway_roles:
            v.fail(("vpn", "reach", i, "port"), f"the router {r.node} itself: name each port VPN clients may use "
                   "(e.g. {node: " + r.node + ", port: 53, proto: udp}), not all of them")


def _check_k3s(site: Site, v: Validator, base: Path) -> None:
    k = site.cluster.k3s
    if k is None:
        v.fail(("cluster", "engine"), "engine k3s needs cluster.k3s: {binary, binary_sha256, images, "
               "images_sha256} (k3s is in no registry reachable here: supply its air-gap files)")
    for key in ("binary", "images"):
        path = (base / getattr(k, key)).resolve()
        if not path.is_file():
            v.fail(("cluster", "k3s", key), f"no such file: {path}")
        digest = getattr(k, f"{key}_sha256")
        if not SHA256_RE.match(digest):
            v.fail(("cluster", "k3s", f"{key}_sha256"), "expected 64 lowercase hex digits")
