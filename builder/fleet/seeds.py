"""Each node's seed: its network, its own keys and certificate, and for each site service its role
provides or uses, a server or client section with the provider's address and the credentials.

A seed is the only way a secret reaches a node (0600 on the host; nothing secret is logged).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SohoError
from ..image.schema import Profile, parse_size
from ..seed import default_instance_id, render_seed, write_cidata
from . import vpn
from .desktops import parse_duration
from .secrets import SiteSecrets
from .sitefile import SITE_IDS, Site, SiteNode

log = logging.getLogger("sohocloud.fleet")


def ssha(password: str) -> str:
    """An LDAP {SSHA} hash. The salt derives from the password so a seed is the
    same on every `fleet build` (its instance-id is a hash of its content)."""
    salt = hashlib.sha256(b"sohocloud-ssha-salt\0" + password.encode()).digest()[:8]
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


def base_dn(domain: str) -> str:
    return ",".join(f"dc={part}" for part in domain.split("."))


# --------------------------------------------------------------------------- site services
# A role `provides` services and `uses` others (profiles). For each, the
# provider's node gets a server section and each user's node a client section
# of its seed. The names are capabilities, never role names.

NAS_EXPORT, NAS_MOUNT = "/home", "/nas/home"  # storage exports <nas_root>/home as /home (NFSv4 pseudo-root)
LOGS_PORT, JOIN_PORT, EXPORTER_PORT = 19532, 7443, 9100


@dataclass(frozen=True)
class SeedContext:
    site: Site
    node: SiteNode
    profiles: dict[str, Profile]  # role -> resolved profile
    providers: dict[str, SiteNode]  # service -> node
    secrets: SiteSecrets
    site_text: str  # the site file as written (it contains no secrets)
    site_dir: Path = Path(".")  # where the site's relative files are (desktops' htpasswd), as its checks found them
    # The other images the node uses as the PXE server serves them: {file, url, sha256} (the desktop template).
    images: tuple[dict[str, str], ...] = ()

    def fqdn(self, node: SiteNode) -> str:
        return f"{node.name}.{self.site.domain}"

    def where(self, service: str) -> dict[str, str]:
        n = self.providers[service]
        return {"name": n.name, "fqdn": self.fqdn(n), "address": n.address}

    def template(self) -> dict[str, str]:
        """The container template the node runs sessions on (a squashfs it fetches and mounts)."""
        found = [i for i in self.images if i["file"].endswith(".squashfs")]
        if len(found) != 1:
            raise SohoError(f"role {self.node.role}: uses desktops, so its profile's `images` must name one "
                            f"template (e.g. {{role: desktop, target: template}}), got {len(found)}")
        return dict(found[0])

    def home(self, user: str) -> str:
        return f"{NAS_MOUNT}/{user}" if "nas" in self.providers else f"/home/{user}"

    def user_hash(self, user) -> str:
        if user.password_hash:
            return "{CRYPT}" + user.password_hash
        return ssha(self.secrets.user_password(user.name))


def find_providers(site: Site, profiles: dict[str, Profile]) -> dict[str, SiteNode]:
    """Which node serves each service; every used service must have exactly one provider."""
    providers: dict[str, SiteNode] = {}
    for n in site.nodes:
        for svc in profiles[n.role].provides:
            if svc in providers:
                raise SohoError(f"site {site.name}: service '{svc}' is provided by both {providers[svc].name} "
                                f"({providers[svc].role}) and {n.name} ({n.role}); a site has one of each")
            providers[svc] = n
    for n in site.nodes:
        for svc in profiles[n.role].uses:
            if svc not in providers:
                roles = sorted({r for r, p in profiles.items() if svc in p.provides}) or ["none of the known roles"]
                raise SohoError(f"site {site.name}: node {n.name} ({n.role}) uses '{svc}', but no node provides it "
                                f"(add a node with one of the roles: {', '.join(roles)})")
    return providers


def _cluster_block(c: SeedContext, role: str) -> dict[str, Any]:
    return {"engine": c.site.cluster.engine, "role": role, "node_role": c.node.role,
            "manager": c.where("cluster"), "join_port": JOIN_PORT}


def _ldap_server(c: SeedContext) -> dict[str, Any]:
    users = [{"name": u.name, "uid": u.uid, "groups": list(u.groups), "ssh_keys": list(u.ssh_keys),
              "home": c.home(u.name), "password_hash": c.user_hash(u)} for u in c.site.users]
    return {"ldap_server": {"admin_password_hash": ssha(c.secrets.secret("ldap-admin")),
                            "nss_password_hash": ssha(c.secrets.secret("ldap-nss")), "users": users,
                            "groups": [{"name": g.name, "gid": g.gid} for g in c.site.groups]}}


def _ldap_client(c: SeedContext) -> dict[str, Any]:
    base = base_dn(c.site.domain)
    return {"ldap": {"uri": f"ldaps://{c.where('ldap')['fqdn']}", "base_dn": base, "bind_dn": f"cn=nss,{base}",
                     "bind_password": c.secrets.secret("ldap-nss")}}


def _nas_server(c: SeedContext) -> dict[str, Any]:
    if not c.site.groups:
        raise SohoError(f"site {c.site.name}: the NAS's shared folder belongs to the site's first group: "
                        "declare at least one under groups")
    return {"nas_server": {
        "lan": c.site.lan,
        "clients": [n.address for n in c.site.nodes if c.profiles[n.role].consumes("nas")],
        "shared_group": {"name": c.site.groups[0].name, "gid": c.site.groups[0].gid},
        "backup_password": c.secrets.secret("restic"),
        "retention": dataclasses.asdict(c.site.backups),
        "users": [{"name": u.name, "uid": u.uid, "smb_password": c.secrets.user_password(u.name)}
                  for u in c.site.users]}}


def _desk_broker(c: SeedContext) -> dict[str, Any]:
    """The desktop broker's settings (sohocloud_desk.settings reads them): the rules from the site
    file, and the people who may get a desktop with their TOTP secrets. Only the broker's node gets
    these secrets; the panels on the (possibly diskless) PCs ask it."""
    d = c.site.desktops
    groups = {rule.group for rule in d.policy}
    checkers: dict[str, Any] = {}
    if d.checker("ldap"):
        checkers["ldap"] = {"uri": f"ldaps://{c.where('ldap')['fqdn']}", "base_dn": base_dn(c.site.domain)}
    if d.checker("htpasswd"):
        checkers["htpasswd"] = {"text": (c.site_dir / d.checker("htpasswd").file).read_text()}
    people = [{"name": u.name, "uid": u.uid, "groups": list(u.groups),
               **({"totp": c.secrets.totp(c.site.name, u.name)[0]} if d.checker("otp") else {})}
              for u in c.site.users if groups & set(u.groups)]
    return {"desk_broker": {
        "rules": {"otp": d.checker("otp") is not None, "tokens": d.checker("token") is not None,
                  "second_sign_in": d.second_sign_in, "host_reserve": parse_size(d.host_reserve),
                  "idle_timeout": parse_duration(d.idle_timeout),
                  "disconnect_timeout": parse_duration(d.disconnect_timeout),
                  "token_max_days": d.tokens.max_days,
                  "policy": [{"group": r.group, "machine": r.machine, "network": r.network} for r in d.policy],
                  "machine_types": {name: {"cpus": str(m.cpus), "memory": m.memory, "pids": m.pids}
                                    for name, m in d.types().items()}},
        "checkers": checkers,
        "people": people,
        "token_key": c.secrets.secret("desk-token-key"),
        "hosts": [{"name": n.name, "fqdn": c.fqdn(n), "address": n.address} for n in c.site.nodes
                  if c.profiles[n.role].consumes("desktops")]}}


def _metrics_server(c: SeedContext) -> dict[str, Any]:
    targets = [{"fqdn": c.fqdn(n), "port": EXPORTER_PORT} for n in c.site.nodes
               if c.profiles[n.role].consumes("metrics")]
    return {"metrics_server": {"targets": targets}}


def _cluster_manager(c: SeedContext) -> dict[str, Any]:
    block = _cluster_block(c, "manager")
    block["members"] = {n.name: {"role": n.role, "cluster": c.profiles[n.role].cluster} for n in c.site.nodes
                        if c.profiles[n.role].cluster != "none"}
    if c.site.cluster.engine == "k3s":
        block["k3s_token"] = c.secrets.secret("k3s-token")
        block["k3s_agent_token"] = c.secrets.secret("k3s-agent-token")  # workers join as agents only
    return {"cluster": block}


def _cluster_client(c: SeedContext) -> dict[str, Any]:
    role = c.profiles[c.node.role].cluster
    if role == "none" or c.providers["cluster"] == c.node:
        return {}
    return {"cluster": _cluster_block(c, role)}


PROVIDER_SECTIONS: dict[str, Callable[[SeedContext], dict[str, Any]]] = {
    "cluster": _cluster_manager,
    "desktops": _desk_broker,
    "git": lambda c: {"git_server": {"site_file": c.site_text, "keys": list(c.site.admin_ssh_keys)}},
    "ldap": _ldap_server,
    "logs": lambda c: {},
    "metrics": _metrics_server,
    "nas": _nas_server,
    "pxe": lambda c: {},  # its settings are router.hosts (netboot: true); the volume comes with fleet up
    "time": lambda c: {"time": {"upstream": list(c.site.time_servers)}},  # what it serves: its role's
}
CLIENT_SECTIONS: dict[str, Callable[[SeedContext], dict[str, Any]]] = {
    "cluster": _cluster_client,
    "desktops": lambda c: {"desk": {"broker": c.where("desktops"), "template": c.template(),
                                    "lan": c.site.lan,
                                    "people_uids": [SITE_IDS.start, SITE_IDS.stop - 1],
                                    "idle_timeout": parse_duration(c.site.desktops.idle_timeout),
                                    "disconnect_timeout": parse_duration(c.site.desktops.disconnect_timeout)}},
    "git": lambda c: {},
    "ldap": _ldap_client,
    "logs": lambda c: {"logs": {"host": c.where("logs")["fqdn"], "port": LOGS_PORT}},
    "metrics": lambda c: {},
    "nas": lambda c: {"nas": {"server": c.where("nas")["fqdn"], "export": NAS_EXPORT, "mountpoint": NAS_MOUNT}},
    "pxe": lambda c: {},
    # By address: a node keeps its clock while the router's DNS is down.
    "time": lambda c: {"time": {"servers": [c.where("time")["address"]]}},
}


def service_sections(c: SeedContext) -> dict[str, Any]:
    profile = c.profiles[c.node.role]
    out: dict[str, Any] = {}
    for svc in profile.uses + tuple(s for s in profile.may_use if s in c.providers):
        out.update(CLIENT_SECTIONS[svc](c))
    for svc in profile.provides:  # the provider's own section wins (e.g. the manager's cluster block)
        out.update(PROVIDER_SECTIONS[svc](c))
    out["services"] = {svc: c.where(svc) for svc in sorted(c.providers)}
    return out


def node_network(site: Site, node: SiteNode) -> dict[str, Any]:
    """network-config v2: the node's LAN NIC by MAC, static address; route and DNS via the gateway."""
    net = site.network
    gateway = site.node(site.gateway)
    lan: dict[str, Any] = {"match": {"macaddress": node.mac}, "set-name": "lan",
                           "addresses": [f"{node.address}/{net.prefixlen}"]}
    if node.name != site.gateway:
        lan["gateway4"] = gateway.address
        lan["nameservers"] = {"addresses": [gateway.address], "search": [site.domain]}
    return {"version": 2, "ethernets": {"lan": lan}}


def node_settings(site: Site, node: SiteNode, secrets: SiteSecrets, services: SeedContext | None = None,
                  netboot: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The `sohocloud:` block of the node's user-data (role settings and its own secrets).
    *netboot*: the nodes whose target boots from the network (the PXE server serves their seeds)."""
    _ca_key, ca_cert = secrets.ca()
    tls_key, tls_cert = secrets.node_tls(site, node)
    block: dict[str, Any] = {
        "site": site.name,
        "domain": site.domain,
        "role": node.role,
        "ca_cert": ca_cert.decode(),
        "tls": {"cert": tls_cert.decode(), "key": tls_key.decode()},
        "hosts": [{"name": n.name, "fqdn": f"{n.name}.{site.domain}", "address": n.address} for n in site.nodes],
    }
    if services is not None:
        block.update(service_sections(services))
    if node.name != site.gateway:
        gw = site.node(site.gateway)
        block["dns"] = {"servers": [gw.address], "search": [site.domain]}
    if node.name == site.gateway:
        # The gateway role's hook reads its LAN settings from `router:` (see README).
        block["router"] = {
            "domain": site.domain,
            "hosts": [{"name": n.name, "mac": n.mac, "address": n.address,
                       **({"netboot": True} if n.name in netboot else {})} for n in site.nodes],
        }
        if site.vpn is not None:
            block["wireguard"] = vpn.gateway_block(site, secrets)
    return block


def write_node_seed(site: Site, node: SiteNode, secrets: SiteSecrets, out_dir: Path,
                    profiles: dict[str, Profile] | None = None, site_text: str = "",
                    netboot: frozenset[str] = frozenset(), site_dir: Path = Path("."),
                    images: tuple[dict[str, str], ...] = ()) -> Path:
    services = None
    if profiles is not None:
        services = SeedContext(site, node, profiles, find_providers(site, profiles), secrets, site_text, site_dir,
                               images)
    settings = node_settings(site, node, secrets, services, netboot)
    network = node_network(site, node)
    # The instance-id (a new one re-provisions the node) ignores the site file's
    # text in the git section: a comment or another node's edit is no re-install; nor is a
    # renewed certificate (`fleet renew` installs it on the running node).
    identity = json.loads(json.dumps(settings))
    identity.get("git_server", {}).pop("site_file", None)
    identity.pop("tls", None)
    files = render_seed(node.name, list(site.admin_ssh_keys), network=network, sohocloud=settings,
                        instance_id=default_instance_id(node.name, {"settings": identity, "network": network,
                                                                    "keys": list(site.admin_ssh_keys)}))
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = write_cidata(files, out_dir / f"{node.name}.img")
    os.chmod(path, 0o600)  # it carries the node's private keys
    return path
