"""Sign-in checkers, chosen by name in the site file (desktops.sign_in) and built from the broker's
settings: each proves one thing about a name.

    ldap      the person's password, by a bind as them to the site directory (LDAPS, site CA)
    htpasswd  the person's password, against a file of crypt(3) hashes (bcrypt from `htpasswd -B`)
    token     a script token (tokens.py) for the person, with the scope asked for
    otp       the person's TOTP code (the second factor, on top of one of the above)

A checker answers True or False, never why: an unknown name and a wrong password look the same.
"""

from __future__ import annotations

import hmac
import ssl
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import tokens

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # crypt(3) has no stdlib successor (3.11-3.12)
    import crypt

# A hash of a random password, for a file with no entries: see Htpasswd.__call__.
DUMMY_HASH = "$6$sohocloud$GWs1pdxlobsmLM7ysgjT.S2o8gdbtUxEIdgeWCjpdtNjxrWW6KsbvfwCq4GDsN1835Okw3qmGp8WqmOMvJpuB1"


class PasswordChecker(Protocol):
    def __call__(self, name: str, password: str) -> bool: ...


def crypt_matches(password: str, hashed: str) -> bool:
    try:
        out = crypt.crypt(password, hashed)
    except OSError:  # a hash method this libcrypt does not know (fleet build refuses those)
        return False
    return out is not None and hmac.compare_digest(out.encode(), hashed.encode())


@dataclass(frozen=True)
class Htpasswd:
    path: Path

    def entries(self) -> dict[str, str]:
        out = {}
        for line in self.path.read_text().splitlines():
            name, sep, hashed = line.strip().partition(":")
            if sep and name and not name.startswith("#"):
                out[name] = hashed
        return out

    def __call__(self, name: str, password: str) -> bool:
        entries = self.entries()
        hashed = entries.get(name)
        # An unknown name still costs one hash of the file's own kind (bcrypt, say), so a miss takes
        # as long as a wrong password: no finding out names by timing.
        ok = crypt_matches(password, hashed or next(iter(entries.values()), DUMMY_HASH))
        return ok and hashed is not None


@dataclass(frozen=True)
class Ldap:
    """A simple bind as uid=NAME,ou=people,BASE over LDAPS, checked against the site CA."""
    uri: str
    base_dn: str
    ca_file: str

    def __call__(self, name: str, password: str) -> bool:
        import ldap3  # lazy: only a broker with the ldap checker needs it (python3-ldap3)
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.ca_file)
        server = ldap3.Server(self.uri, use_ssl=True, tls=tls, connect_timeout=5)
        # The name passed inputs.NAME_RE (no DN metacharacters); an empty password would be an
        # unauthenticated bind, which "succeeds": refused before binding.
        if not password:
            return False
        conn = ldap3.Connection(server, user=f"uid={name},ou=people,{self.base_dn}", password=password,
                                receive_timeout=5, raise_exceptions=False)
        try:
            return bool(conn.bind())
        finally:
            conn.unbind()


def token_checker(key: bytes, revoked: Callable[[], set[str]], clock: Callable[[], float]):
    def check(name: str, text: str, scope: str) -> bool:
        tok = tokens.verify(key, text, clock(), revoked())
        return tok is not None and tok.sub == name and scope in tok.scope
    return check


def password_checkers(settings: dict[str, Any]) -> dict[str, PasswordChecker]:
    """The password checkers the broker's settings name: {"ldap": {...}} and/or {"htpasswd": {...}}."""
    out: dict[str, PasswordChecker] = {}
    for name, conf in settings.items():
        if name in PASSWORD_CHECKERS:
            out[name] = PASSWORD_CHECKERS[name](conf)
    return out


PASSWORD_CHECKERS: dict[str, Callable[[dict[str, Any]], PasswordChecker]] = {
    "ldap": lambda c: Ldap(c["uri"], c["base_dn"], c["ca_file"]),
    "htpasswd": lambda c: Htpasswd(Path(c["file"])),
}
