"""The site file's `desktops:` section: who may sign in at the office PCs' panels, how they prove
who they are, and what desktop each gets.

Data only (checked like the rest of the site file, errors name file:line and key); the panel on
the workstation hosts enforces it from the seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sohocloud_firstboot.seedrules import LABEL_RE

from ..image.schema import Validator, parse_size

DURATION_RE = re.compile(r"^(\d+)(s|m|h|d)$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# First factors prove the name, `otp` is the second factor on top of one of them.
FIRST_FACTORS = ("ldap", "htpasswd", "token")
CHECKERS = FIRST_FACTORS + ("otp",)


def parse_duration(text: str) -> int:
    """'15m' -> 900 seconds. Durations in the site file are an integer and one of s, m, h, d."""
    m = DURATION_RE.match(text)
    if not m:
        raise ValueError(f"expected a duration like 90s, 15m, 8h or 30d, got {text!r}")
    return int(m.group(1)) * DURATION_UNITS[m.group(2)]


@dataclass(frozen=True)
class Checker:
    name: Literal["ldap", "htpasswd", "token", "otp"]
    file: str | None = None  # htpasswd: the file (bcrypt entries, `htpasswd -B`), relative to the site file


@dataclass(frozen=True)
class MachineType:
    cpus: int | str = 1  # CPUs' worth of time (an integer or a decimal like "1.5")
    memory: str = "2G"
    pids: int = 512


@dataclass(frozen=True)
class PolicyRule:
    group: str  # a group of the site's people
    machine: str  # a name under machine_types
    network: Literal["none", "lan"] = "lan"  # the site LAN only (never beyond the router), or no network


@dataclass(frozen=True)
class Tokens:
    max_days: int = 90  # the longest life a script token may be given


@dataclass(frozen=True)
class Desktops:
    # Checkers in force; a name or {name, file}. A sign-in passes one first factor and, when `otp` is
    # listed, also the person's TOTP code.
    sign_in: tuple[str | Checker, ...] = ("ldap", "otp")
    machine_types: dict[str, MachineType] | None = None
    # Who gets a desktop: the first rule whose group the person is in. No rule, no desktop.
    policy: tuple[PolicyRule, ...] = ()
    idle_timeout: str = "30m"  # no keyboard or mouse input for this long: the session ends
    disconnect_timeout: str = "2m"  # no browser attached (tab closed) for this long: the session ends
    second_sign_in: Literal["take-over", "refuse"] = "take-over"
    # A host takes sessions while the memory limits of its sessions fit in its RAM less this reserve.
    host_reserve: str = "1G"
    tokens: Tokens = Tokens()

    @property
    def checkers(self) -> tuple[Checker, ...]:
        return tuple(c if isinstance(c, Checker) else Checker(name=c) for c in self.sign_in)  # type: ignore[arg-type]

    def types(self) -> dict[str, MachineType]:
        return DEFAULT_MACHINE_TYPES if self.machine_types is None else self.machine_types

    def checker(self, name: str) -> Checker | None:
        return next((c for c in self.checkers if c.name == name), None)


DEFAULT_MACHINE_TYPES = {
    "small": MachineType(cpus=1, memory="1G", pids=256),
    "standard": MachineType(cpus=2, memory="2G", pids=512),
    "large": MachineType(cpus=4, memory="4G", pids=1024),
}


def check_desktops(d: Desktops, v: Validator, group_names: set[str], base: Path) -> None:
    """Every rule names a known group and machine type; sizes and durations parse; checkers make sense
    (an htpasswd file, relative to *base*, exists)."""
    where = ("desktops",)
    _check_checkers(d, v, base)
    for key in ("idle_timeout", "disconnect_timeout"):
        try:
            if parse_duration(getattr(d, key)) < 30:
                v.fail(where + (key,), "expected at least 30s")
        except ValueError as exc:
            v.fail(where + (key,), str(exc))
    try:
        parse_size(d.host_reserve)
    except ValueError as exc:
        v.fail(where + ("host_reserve",), str(exc))
    for name, mt in d.types().items():
        _check_machine_type(v, where + ("machine_types", name), mt)
    for i, rule in enumerate(d.policy):
        if rule.group not in group_names:
            v.fail(where + ("policy", i, "group"), f"unknown group '{rule.group}' (declare it under groups)")
        if rule.machine not in d.types():
            v.fail(where + ("policy", i, "machine"),
                   f"unknown machine type '{rule.machine}' (known: {', '.join(sorted(d.types()))})")
    if not 1 <= d.tokens.max_days <= 366:
        v.fail(where + ("tokens", "max_days"), f"expected 1 to 366 days, got {d.tokens.max_days}")


def _check_checkers(d: Desktops, v: Validator, base: Path) -> None:
    where = ("desktops", "sign_in")
    names = [c.name for c in d.checkers]
    for i, c in enumerate(d.checkers):
        if c.name not in CHECKERS:
            v.fail(where + (i,), f"unknown checker {c.name!r} (known: {', '.join(CHECKERS)})")
        if c.name in names[:i]:
            v.fail(where + (i,), f"checker '{c.name}' is listed twice")
        if (c.name == "htpasswd") != (c.file is not None):
            v.fail(where + (i,), "htpasswd needs {name: htpasswd, file: FILE}; only htpasswd takes a file")
        if c.file is not None and not (base / c.file).is_file():
            v.fail(where + (i, "file"), f"no such file: {(base / c.file).resolve()}")
        if c.file is not None:
            problem = htpasswd_problem((base / c.file).read_text(errors="replace"))
            if problem:
                v.fail(where + (i, "file"), f"{(base / c.file).resolve()}: {problem}")
    if not any(n in ("ldap", "htpasswd") for n in names):
        v.fail(where, "expected a password checker (ldap or htpasswd): people sign in at the panel with one")


# What the panels' crypt(3) checks: bcrypt (`htpasswd -B`), yescrypt, SHA-512/256 crypt. Not
# Apache's MD5 ($apr1$), SHA1 ({SHA}) or plain text: weak, and crypt(3) cannot check them.
HTPASSWD_HASH_RE = re.compile(r"\$(2[aby]|y|6|5)\$[A-Za-z0-9./$]+")


def htpasswd_problem(text: str) -> str | None:
    """Why an htpasswd file's text is unusable (line number first), or None."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, hashed = line.strip().partition(":")
        if not sep or not LABEL_RE.fullmatch(name):
            return f"line {n}: expected name:hash with a lowercase login name"
        if not HTPASSWD_HASH_RE.fullmatch(hashed):
            return (f"line {n}: {name}'s hash is not bcrypt, yescrypt or SHA-crypt "
                    "(make it with `htpasswd -B` or `mkpasswd -m yescrypt`)")
    return None


def _check_machine_type(v: Validator, where: tuple, mt: MachineType) -> None:
    try:
        cpus = float(mt.cpus)
    except ValueError:
        cpus = 0.0
    if not 0.1 <= cpus <= 256:
        v.fail(where + ("cpus",), f"expected a number of CPUs from 0.1 to 256, got {mt.cpus!r}")
    try:
        if parse_size(mt.memory) < 256 << 20:
            v.fail(where + ("memory",), "expected at least 256M (a desktop does not start in less)")
    except ValueError as exc:
        v.fail(where + ("memory",), str(exc))
    if not 64 <= mt.pids <= 65536:
        v.fail(where + ("pids",), f"expected 64 to 65536 processes, got {mt.pids}")
