"""The broker's settings as its seed carries them (the `desk_broker` section that `fleet build`
writes: builder/fleet/seeds.py), turned into the broker's rules, people and checkers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import checkers, policy
from .broker import Person, Rules


def rules(section: dict[str, Any]) -> Rules:
    r = section["rules"]
    return Rules(otp=bool(r["otp"]), second_sign_in=r["second_sign_in"], host_reserve=int(r["host_reserve"]),
                 policy=tuple(r["policy"]), machine_types=policy.machine_types(r["machine_types"]))


def people(section: dict[str, Any]) -> dict[str, Person]:
    return {p["name"]: Person(p["name"], int(p["uid"]), frozenset(p["groups"]), p.get("totp"))
            for p in section["people"]}


def password_checkers(section: dict[str, Any], ca_file: Path, htpasswd_file: Path) -> list[checkers.PasswordChecker]:
    """The password checkers the site chose. The htpasswd text (in the seed) must already be at
    *htpasswd_file* (firstboot writes it 0600)."""
    conf = section["checkers"]
    wanted: dict[str, dict[str, Any]] = {}
    if "ldap" in conf:
        wanted["ldap"] = {**conf["ldap"], "ca_file": str(ca_file)}
    if "htpasswd" in conf:
        wanted["htpasswd"] = {"file": str(htpasswd_file)}
    return list(checkers.password_checkers(wanted).values())
