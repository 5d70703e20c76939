"""A seed's three files, parsed: meta-data, user-data (#cloud-config), network-config."""

from __future__ import annotations

import yaml

from .seedrules import NETWORK_CONFIG_VERSION, USER_DATA_HEADER, valid_instance_id

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see main.py)
if TYPE_CHECKING:
    from typing import Any

    from .context import Ctx

# libyaml's parser (python3-yaml ships it): the pure-Python one spends most of a
# second of an emulated first boot on a seed of a few lines.
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=SafeLoader)  # noqa: S506 (a safe loader)


class Seed:
    def __init__(self, source: str) -> None:
        self.source = source
        self.instance_id: str | None = None
        self.hostname: str | None = None
        self.hostname_key = "meta-data: local-hostname"  # where hostname came from, for messages
        self.user: dict[str, Any] | None = None  # None: absent or unreadable
        self.network: dict[str, Any] | None = None  # None: absent (or unreadable, see network_ok)
        self.network_ok = True


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Problem + position only: str(exc) quotes the offending line, which may
    hold a key or a token."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        m = exc.problem_mark
        return f"{exc.problem or 'syntax error'} at line {m.line + 1}, column {m.column + 1}"
    return type(exc).__name__


def decode(ctx: Ctx, name: str, raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        ctx.error(f"{name}: not UTF-8 text (byte {e.start})")
        return None


def load_yaml_mapping(ctx: Ctx, name: str, text: str) -> dict[str, Any] | None:
    try:
        data = safe_load(text)
    except yaml.YAMLError as e:
        ctx.error(f"{name}: not valid YAML: {yaml_problem(e)}")
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        ctx.error(f"{name}: expected a YAML mapping at the top level, got {type(data).__name__}")
        return None
    return data


def parse_seed(ctx: Ctx, source: str, raw: dict[str, bytes | None]) -> Seed:
    seed = Seed(source=source)

    meta_raw = raw.get("meta-data")
    if meta_raw is None:
        ctx.error(f"meta-data: missing from {source}")
    else:
        text = decode(ctx, "meta-data", meta_raw)
        meta = load_yaml_mapping(ctx, "meta-data", text) if text is not None else None
        if meta is not None:
            iid = meta.get("instance-id")
            if valid_instance_id(iid):
                seed.instance_id = str(iid).strip()
            else:
                ctx.error("meta-data: 'instance-id' missing or not a one-line string")
            lh = meta.get("local-hostname")
            if lh is not None:
                seed.hostname = str(lh)

    user_raw = raw.get("user-data")
    if user_raw is not None:
        text = decode(ctx, "user-data", user_raw)
        if text is not None and text.split("\n", 1)[0].rstrip() != USER_DATA_HEADER:
            ctx.error(f"user-data: first line must be '{USER_DATA_HEADER}'")
            text = None
        seed.user = load_yaml_mapping(ctx, "user-data", text) if text is not None else None
        if seed.user is not None and seed.hostname is None and seed.user.get("hostname"):
            seed.hostname = str(seed.user["hostname"])
            seed.hostname_key = "user-data: hostname"

    net_raw = raw.get("network-config")
    if net_raw is not None:
        text = decode(ctx, "network-config", net_raw)
        net = load_yaml_mapping(ctx, "network-config", text) if text is not None else None
        if net is not None and isinstance(net.get("network"), dict):
            net = net["network"]  # cloud-init accepts both layouts
        if net is not None and net and net.get("version") != NETWORK_CONFIG_VERSION:
            ctx.error(f"network-config: only 'version: {NETWORK_CONFIG_VERSION}' (netplan) is supported")
            net = None
        seed.network = net or None
        seed.network_ok = net is not None
    return seed
