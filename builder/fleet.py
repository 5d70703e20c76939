"""`sohocloud fleet build`: per-site secrets (once), each role image once, one seed per node.

Secrets live in secrets/<site>/ (0600 files in a 0700 tree, git-ignored) and
reach nodes only inside their seeds (0600). Nothing secret is logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SohoError
from .schema import Profile
from .secrets import ensure_secret, issue_cert, make_ca, random_secret, wireguard_keypair, wireguard_public
from .seed import default_instance_id, render_seed, write_cidata
from .site import Site, SiteNode

log = logging.getLogger("sohocloud.fleet")


@dataclass(frozen=True)
class SiteSecrets:
    root: Path  # secrets/<site>

    def ca(self) -> tuple[bytes, bytes]:
        key_path, cert_path = self.root / "ca.key", self.root / "ca.crt"
        if key_path.is_file() != cert_path.is_file():
            raise SohoError(f"{self.root}: ca.key and ca.crt must both exist or both be absent: restore the "
                            "missing one (every node certificate depends on this CA), or remove both for a new CA")
        if not key_path.is_file():
            key, cert = make_ca(f"sohocloud {self.root.name} site CA")
            ensure_secret(key_path, lambda: key)
            ensure_secret(cert_path, lambda: cert)
        return key_path.read_bytes(), cert_path.read_bytes()

    def node_tls(self, site: Site, node: SiteNode) -> tuple[bytes, bytes]:
        """The node's key and certificate (server + client auth) from the site CA."""
        d = self.root / "nodes"
        key_path, cert_path = d / f"{node.name}.key", d / f"{node.name}.crt"
        dns, ips = [node.name, f"{node.name}.{site.domain}"], [node.address]
        if not (key_path.is_file() and cert_path.is_file()) or not cert_fits(cert_path.read_bytes(), self.ca()[1],
                                                                             dns, ips):
            # A lone key or certificate is useless, and one from another CA, for other
            # names or about to expire is wrong: issue a fresh pair.
            key_path.unlink(missing_ok=True)
            cert_path.unlink(missing_ok=True)
            ca_key, ca_cert = self.ca()
            key, cert = issue_cert(ca_key, ca_cert, node.name, dns=dns, ips=ips)
            ensure_secret(key_path, lambda: key)
            ensure_secret(cert_path, lambda: cert)
        return key_path.read_bytes(), cert_path.read_bytes()

    def wireguard(self, node: SiteNode) -> tuple[str, str]:
        priv = ensure_secret(self.root / "wireguard" / f"{node.name}.key", lambda: wireguard_keypair()[0])
        priv_s = priv.decode().strip()
        return priv_s, wireguard_public(priv_s)

    def secret(self, name: str) -> str:
        return ensure_secret(self.root / f"{name}.secret", random_secret).decode().strip()

    def user_password(self, user: str) -> str:
        """A person's initial password (SMB, and LDAP unless the site gives a hash): hand it to them."""
        return ensure_secret(self.root / "users" / f"{user}.password", random_secret).decode().strip()


def cert_fits(cert_pem: bytes, ca_pem: bytes, dns: list[str], ips: list[str], margin_days: int = 30) -> bool:
    """The node certificate is signed by this CA, names exactly these DNS names and IPs, and is not about to expire."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    cert, ca = x509.load_pem_x509_certificate(cert_pem), x509.load_pem_x509_certificate(ca_pem)
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:  # noqa: BLE001 - any failure means: not this CA's
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names_ok = (sorted(san.get_values_for_type(x509.DNSName)) == sorted(dns)
                and sorted(map(str, san.get_values_for_type(x509.IPAddress))) == sorted(str(ipaddress.ip_address(i))
                                                                                        for i in ips))
    expires = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return names_ok and expires - datetime.datetime.now(datetime.timezone.utc) > datetime.timedelta(days=margin_days)


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

    def fqdn(self, node: SiteNode) -> str:
        return f"{node.name}.{self.site.domain}"

    def where(self, service: str) -> dict[str, str]:
        n = self.providers[service]
        return {"name": n.name, "fqdn": self.fqdn(n), "address": n.address}

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
        "users": [{"name": u.name, "uid": u.uid, "smb_password": c.secrets.user_password(u.name)}
                  for u in c.site.users]}}


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
    "git": lambda c: {"git_server": {"site_file": c.site_text, "keys": list(c.site.admin_ssh_keys)}},
    "ldap": _ldap_server,
    "logs": lambda c: {},
    "metrics": _metrics_server,
    "nas": _nas_server,
    "pxe": lambda c: {},  # its settings are router.hosts (netboot: true); the volume comes with fleet up
}
CLIENT_SECTIONS: dict[str, Callable[[SeedContext], dict[str, Any]]] = {
    "cluster": _cluster_client,
    "git": lambda c: {},
    "ldap": _ldap_client,
    "logs": lambda c: {"logs": {"host": c.where("logs")["fqdn"], "port": LOGS_PORT}},
    "metrics": lambda c: {},
    "nas": lambda c: {"nas": {"server": c.where("nas")["fqdn"], "export": NAS_EXPORT, "mountpoint": NAS_MOUNT}},
    "pxe": lambda c: {},
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


def k3s_files(site: Site, site_dir: Path, arch: str) -> tuple:
    """The site's k3s binary and air-gap images, verified now (before any build) and baked into member images."""
    from .cache import sha256_file
    from .s1_resolve import ExtraFile

    k = site.cluster.k3s
    if site.cluster.engine != "k3s" or k is None:
        return ()
    out = []
    for key, dest, mode in (("binary", "/usr/local/bin/k3s", 0o755),
                            ("images", f"/var/lib/rancher/k3s/agent/images/k3s-airgap-images-{arch}.tar", 0o644)):
        path = (site_dir / getattr(k, key)).resolve()
        want = getattr(k, f"{key}_sha256")
        got = sha256_file(path)
        if got != want:
            raise SohoError(f"site {site.name}: cluster.k3s.{key}: {path} has sha256 {got}, the site file says {want}")
        out.append(ExtraFile(dest, path, want, mode))
    return tuple(out)


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
    return block


def write_node_seed(site: Site, node: SiteNode, secrets: SiteSecrets, out_dir: Path,
                    profiles: dict[str, Profile] | None = None, site_text: str = "",
                    netboot: frozenset[str] = frozenset()) -> Path:
    services = None
    if profiles is not None:
        services = SeedContext(site, node, profiles, find_providers(site, profiles), secrets, site_text)
    settings = node_settings(site, node, secrets, services, netboot)
    network = node_network(site, node)
    # The instance-id (a new one re-provisions the node) ignores the site file's
    # text in the git section: a comment or another node's edit is no re-install.
    identity = json.loads(json.dumps(settings))
    identity.get("git_server", {}).pop("site_file", None)
    files = render_seed(node.name, list(site.admin_ssh_keys), network=network, sohocloud=settings,
                        instance_id=default_instance_id(node.name, {"settings": identity, "network": network,
                                                                    "keys": list(site.admin_ssh_keys)}))
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = write_cidata(files, out_dir / f"{node.name}.img")
    os.chmod(path, 0o600)  # it carries the node's private keys
    return path
