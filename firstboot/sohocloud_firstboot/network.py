"""network-config (a netplan version 2 subset) rendered as systemd-networkd and udev files."""

from __future__ import annotations

import re
import time
from pathlib import Path

from .context import StepError, info, tool, warn
from .files import write_atomic
from .seedrules import IFACE_ID_RE, NETWORK_CONFIG_KEYS

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see main.py)
if TYPE_CHECKING:
    from typing import Any

    from .context import Ctx
    from .seed import Seed

NETWORK_DIR = "etc/systemd/network"
SEED_NET_PREFIX = "10-seed-"
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
IFNAME_GLOB_RE = re.compile(r"[A-Za-z0-9_.*?\[\]-]{1,64}")
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
DOMAIN_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})?")
ETH_KEYS = {"match", "set-name", "dhcp4", "dhcp6", "addresses", "gateway4", "gateway6",
            "routes", "nameservers"}


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise StepError(f"network-config: {msg}")


def _plain(a: Any) -> bool:
    """No IPv6 scope id, whitespace or control characters: the value goes into a config line."""
    text = str(a)
    return "%" not in text and text.isprintable() and not any(c.isspace() for c in text)


def _ip_list(where: str, val: Any, *, prefix: bool) -> list[str]:
    # lazy: ipaddress (~1 ms, more emulated) is wanted only for static addresses and routes
    import ipaddress

    _need(isinstance(val, list), f"{where} must be a list")
    out = []
    for i, a in enumerate(val):
        _need(_plain(a), f"{where}[{i}]: not a plain IP address")
        try:
            if prefix:
                _need(isinstance(a, str) and "/" in a, f"{where}[{i}]: {a!r} needs a prefix length, e.g. 10.44.0.1/24")
                out.append(str(ipaddress.ip_interface(a)))
            else:
                out.append(str(ipaddress.ip_address(str(a))))
        except ValueError:
            raise StepError(f"network-config: {where}[{i}]: {a!r} is not an IP address") from None
    return out


def _ip(where: str, val: Any) -> str:
    # lazy: ipaddress (~1 ms, more emulated) is wanted only for static addresses and routes
    import ipaddress

    _need(_plain(val), f"{where}: not a plain IP address")
    try:
        return str(ipaddress.ip_address(str(val)))
    except ValueError:
        raise StepError(f"network-config: {where}: {val!r} is not an IP address") from None


def render_iface(ident: str, conf: Any) -> dict[str, str]:
    """One netplan ethernets entry → {filename: content} for systemd-networkd/udev."""
    w = f"ethernets.{ident}"
    _need(bool(IFACE_ID_RE.fullmatch(ident)), f"ethernets: name {ident!r} is not a simple identifier")
    _need(isinstance(conf, dict), f"{w} must be a mapping")
    for k in sorted(set(conf) - ETH_KEYS):
        warn(f"network-config: {w}.{k} is not supported, ignored")
    match = conf.get("match") or {}
    _need(isinstance(match, dict), f"{w}.match must be a mapping")
    mac = match.get("macaddress")
    if mac is not None:
        _need(isinstance(mac, str) and bool(MAC_RE.fullmatch(mac)),
              f"{w}.match.macaddress: {mac!r} is not a MAC address")
        mac = mac.lower()
    mname = match.get("name")
    if mname is not None:
        _need(isinstance(mname, str) and bool(IFNAME_GLOB_RE.fullmatch(mname)),
              f"{w}.match.name: {mname!r} is not an interface name")
    set_name = conf.get("set-name")
    if set_name is not None:
        _need(isinstance(set_name, str) and bool(IFNAME_RE.fullmatch(set_name)),
              f"{w}.set-name: {set_name!r} is not an interface name (max 15 chars)")
        if mac is None:
            warn(f"network-config: {w}.set-name needs match.macaddress to rename, ignored")
            set_name = None

    files: dict[str, str] = {}
    head = "# Written by sohocloud-firstboot from the seed's network-config; a new seed replaces it.\n"
    if set_name is not None:
        files[f"{SEED_NET_PREFIX}{ident}.link"] = (
            f"{head}[Match]\nMACAddress={mac}\n\n[Link]\nName={set_name}\n"
        )
        match_lines = [f"Name={set_name}"]
    elif mname is not None or mac is not None:
        match_lines = ([f"Name={mname}"] if mname else []) + ([f"MACAddress={mac}"] if mac else [])
    else:
        _need(bool(IFNAME_RE.fullmatch(ident)), f"{w}: without 'match' the name must be an interface name")
        match_lines = [f"Name={ident}"]

    net: list[str] = []
    for v in ("dhcp4", "dhcp6"):
        _need(conf.get(v) is None or isinstance(conf[v], bool), f"{w}.{v} must be true or false")
    d4, d6 = bool(conf.get("dhcp4")), bool(conf.get("dhcp6"))
    if d4 or d6:
        net.append("DHCP=" + ("yes" if d4 and d6 else "ipv4" if d4 else "ipv6"))
    if conf.get("addresses") is not None:
        net += [f"Address={a}" for a in _ip_list(f"{w}.addresses", conf["addresses"], prefix=True)]
    for gk in ("gateway4", "gateway6"):
        if conf.get(gk) is not None:
            net.append(f"Gateway={_ip(f'{w}.{gk}', conf[gk])}")
    ns = conf.get("nameservers")
    if ns is not None:
        _need(isinstance(ns, dict), f"{w}.nameservers must be a mapping")
        if ns.get("addresses") is not None:
            net += [f"DNS={a}" for a in _ip_list(f"{w}.nameservers.addresses", ns["addresses"], prefix=False)]
        search = ns.get("search")
        if search is not None:
            _need(isinstance(search, list) and all(isinstance(s, str) and DOMAIN_RE.fullmatch(s) for s in search),
                  f"{w}.nameservers.search must be a list of domain names")
            if search:
                net.append("Domains=" + " ".join(search))

    routes: list[str] = []
    rlist = conf.get("routes")
    if rlist is not None:
        _need(isinstance(rlist, list), f"{w}.routes must be a list")
        for i, r in enumerate(rlist):
            rw = f"{w}.routes[{i}]"
            _need(isinstance(r, dict) and "to" in r and "via" in r, f"{rw} needs 'to' and 'via'")
            via = _ip(f"{rw}.via", r["via"])
            to = str(r["to"])
            if to == "default":
                to = "::/0" if ":" in via else "0.0.0.0/0"
            # lazy: ipaddress (~1 ms, more emulated) is wanted only for static addresses and routes
            import ipaddress

            try:
                to = str(ipaddress.ip_network(to, strict=False))
            except ValueError:
                raise StepError(f"network-config: {rw}.to: {r['to']!r} is not a network") from None
            sect = f"\n[Route]\nDestination={to}\nGateway={via}\n"
            if r.get("metric") is not None:
                _need(isinstance(r["metric"], int) and r["metric"] >= 0, f"{rw}.metric must be a number")
                sect += f"Metric={r['metric']}\n"
            routes.append(sect)

    files[f"{SEED_NET_PREFIX}{ident}.network"] = (
        head + "[Match]\n" + "".join(x + "\n" for x in match_lines)
        + "\n[Network]\n" + "".join(x + "\n" for x in net) + "".join(routes)
    )
    return files


def render_network(net: dict[str, Any]) -> dict[str, str]:
    for k in sorted(set(net) - NETWORK_CONFIG_KEYS):
        warn(f"network-config: '{k}' is not supported, ignored")
    eths = net.get("ethernets") or {}
    _need(isinstance(eths, dict), "'ethernets' must be a mapping")
    files: dict[str, str] = {}
    for ident, conf in eths.items():
        files.update(render_iface(str(ident), conf))
    return files


def apply_network(ctx: Ctx, seed: Seed) -> None:
    if not seed.network_ok:
        info("network: network-config unreadable, existing configuration left unchanged")
        return
    # Validate and render everything first: a bad entry must not leave half a
    # new configuration next to half the old one.
    files = render_network(seed.network) if seed.network is not None else {}
    netdir = ctx.path(NETWORK_DIR)
    netdir.mkdir(parents=True, exist_ok=True)
    links_changed = False
    for name, text in files.items():
        p = netdir / name
        old = p.read_text() if p.is_file() else None
        if old != text:
            write_atomic(p, text.encode(), 0o644)
            links_changed |= name.endswith(".link")
    removed = 0
    for p in sorted(netdir.glob(f"{SEED_NET_PREFIX}*")):
        if p.suffix in (".network", ".link") and p.name not in files:
            p.unlink()
            removed += 1
            links_changed |= p.suffix == ".link"
    if links_changed and ctx.system:
        # Interfaces may already be named by udev's coldplug; replay the net
        # events so the new .link names apply before networkd starts. The unit
        # does not wait for udevd (it only needs it here), so wait for it now.
        deadline = time.monotonic() + 15
        while not Path("/run/udev/control").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for cmd in (["udevadm", "control", "--reload"],
                    ["udevadm", "trigger", "--action=add", "--subsystem-match=net"],
                    ["udevadm", "settle", "--timeout=10"]):
            r = tool(cmd)
            if r is None or r.returncode != 0:
                warn(f"network: '{' '.join(cmd)}' failed; interface names apply on next boot")
    info(f"network: {len(files)} file(s) in /{NETWORK_DIR}, {removed} stale removed")
