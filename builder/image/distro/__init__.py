"""Distro backends (see backend.py for the contract). BACKENDS maps a profile's `distro.name`
to its backend; adding a distro is adding a module here and its entry, no stage changes."""

from __future__ import annotations

from ...errors import ConfigError
from .backend import DistroBackend
from . import debian

BACKENDS: dict[str, DistroBackend] = {"debian": debian}


def backend_for(distro: str) -> DistroBackend:
    try:
        return BACKENDS[distro]
    except KeyError:
        raise ConfigError(f"distro '{distro}' is not supported yet (supported: {', '.join(BACKENDS)})") from None
