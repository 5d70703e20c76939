"""`sohocloud fleet build`: per-site secrets (once), each role image once, one seed per node.

Secrets live in secrets/<site>/ (0600 files in a 0700 tree, git-ignored) and
reach nodes only inside their seeds (0600). Nothing secret is logged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SohoError
from .secrets import ensure_secret, issue_cert, make_ca, random_secret, wireguard_keypair, wireguard_public
from .seed import render_seed, write_cidata
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
        if not (key_path.is_file() and cert_path.is_file()):
            # A lone key or certificate is useless: issue a fresh pair.
            key_path.unlink(missing_ok=True)
            cert_path.unlink(missing_ok=True)
            ca_key, ca_cert = self.ca()
            key, cert = issue_cert(ca_key, ca_cert, node.name, dns=[node.name, f"{node.name}.{site.domain}"],
                                   ips=[node.address])
            ensure_secret(key_path, lambda: key)
            ensure_secret(cert_path, lambda: cert)
        return key_path.read_bytes(), cert_path.read_bytes()

    def wireguard(self, node: SiteNode) -> tuple[str, str]:
        priv = ensure_secret(self.root / "wireguard" / f"{node.name}.key", lambda: wireguard_keypair()[0])
        priv_s = priv.decode().strip()
        return priv_s, wireguard_public(priv_s)

    def secret(self, name: str) -> str:
        return ensure_secret(self.root / f"{name}.secret", random_secret).decode().strip()


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


def node_settings(site: Site, node: SiteNode, secrets: SiteSecrets) -> dict[str, Any]:
    """The `sohocloud:` block of the node's user-data (role settings and its own secrets)."""
    _ca_key, ca_cert = secrets.ca()
    tls_key, tls_cert = secrets.node_tls(site, node)
    block: dict[str, Any] = {
        "site": site.name,
        "domain": site.domain,
        "role": node.role,
        "ca_cert": ca_cert.decode(),
        "tls": {"cert": tls_cert.decode(), "key": tls_key.decode()},
    }
    if node.name == site.gateway:
        # The gateway role's hook reads its LAN settings from `router:` (see README).
        block["router"] = {
            "domain": site.domain,
            "hosts": [{"name": n.name, "mac": n.mac, "address": n.address} for n in site.nodes],
        }
    return block


def write_node_seed(site: Site, node: SiteNode, secrets: SiteSecrets, out_dir: Path) -> Path:
    files = render_seed(node.name, list(site.admin_ssh_keys), network=node_network(site, node),
                        sohocloud=node_settings(site, node, secrets))
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = write_cidata(files, out_dir / f"{node.name}.img")
    os.chmod(path, 0o600)  # it carries the node's private keys
    return path
