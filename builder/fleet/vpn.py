"""Remote access: the site file's `vpn` as the gateway's WireGuard seed block, and each peer's
client config (secrets/<site>/vpn/<peer>.conf, 0600) to hand over.

What a VPN client may reach is the site's `vpn.reach` and nothing else: the gateway's hook turns
each entry into one forwarding element (or, for the gateway itself, one input port) of its firewall.
"""

from __future__ import annotations

from typing import Any

from .secrets import SiteSecrets, write_secret
from .sitefile import Site, Vpn, VpnReach

ALL_PORTS = "0-65535"


def _reach_entries(site: Site, r: VpnReach) -> list[dict[str, str]]:
    address = site.node(r.node).address
    if r.port is None:
        return [{"address": address, "proto": proto, "ports": ALL_PORTS} for proto in ("tcp", "udp")]
    return [{"address": address, "proto": r.proto, "ports": str(r.port)}]


def gateway_block(site: Site, secrets: SiteSecrets) -> dict[str, Any]:
    """The gateway's `wireguard` seed block (its private key included: seeds are 0600)."""
    vpn = _vpn(site)
    private, _public = secrets.wireguard(site.node(site.gateway))
    return {"private_key": private,
            "address": f"{vpn.gateway_address}/{vpn.tunnel.prefixlen}",
            "listen_port": vpn.port,
            "zone": "wan",
            "peers": [{"public_key": peer_public(site, secrets, p.name), "allowed_ips": [f"{p.address}/32"]}
                      for p in vpn.peers],
            "reach": [e for r in vpn.reach for e in _reach_entries(site, r)]}


def peer_public(site: Site, secrets: SiteSecrets, name: str) -> str:
    peer = next(p for p in _vpn(site).peers if p.name == name)
    return peer.public_key or secrets.wireguard_peer(name)[1]


def client_config(site: Site, secrets: SiteSecrets, name: str) -> str:
    """A peer's wg-quick config: its key (when sohocloud made it), the router, and routes to what it
    may reach only (so the rest of its traffic stays off the tunnel)."""
    vpn = _vpn(site)
    peer = next(p for p in vpn.peers if p.name == name)
    _priv, router_public = secrets.wireguard(site.node(site.gateway))
    targets = sorted({site.node(r.node).address for r in vpn.reach}, key=lambda a: tuple(map(int, a.split("."))))
    gw = site.node(site.gateway)
    dns = any(r.node == gw.name and r.port == 53 for r in vpn.reach)
    key = (f"PrivateKey = {secrets.wireguard_peer(name)[0]}" if peer.public_key is None
           else "# PrivateKey = the private key of the public key the site file names for this peer")
    endpoint = vpn.endpoint or "ROUTER-PUBLIC-ADDRESS"
    return "\n".join([
        f"# sohocloud: VPN peer {name} of site {site.name}. Keep it secret: it holds the peer's key.",
        "[Interface]", key, f"Address = {peer.address}/32",
        *([f"DNS = {gw.address}, {site.domain}"] if dns else []),
        "", "[Peer]", f"PublicKey = {router_public}", f"Endpoint = {endpoint}:{vpn.port}",
        f"AllowedIPs = {', '.join(f'{a}/32' for a in targets)}", "PersistentKeepalive = 25", ""])


def write_client_configs(site: Site, secrets: SiteSecrets) -> None:
    for peer in _vpn(site).peers:
        path = secrets.root / "vpn" / f"{peer.name}.conf"
        text = client_config(site, secrets, peer.name)
        if not path.is_file() or path.read_text() != text:
            write_secret(path, text)


def _vpn(site: Site) -> Vpn:
    assert site.vpn is not None, "only for a site with a vpn"
    return site.vpn
