"""Script tokens: "start or stop my session" without a password, scoped and expiring.

    sct1.<payload>.<mac>    payload: base64url JSON {"sub", "scope", "exp", "jti"}
                            mac: base64url HMAC-SHA256(key, "sct1." + payload)

The key is the broker's (from its seed). A revoked token's id stays on the revocation list until
the token would have expired anyway, so the list does not grow without bound.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass

PREFIX = "sct1"
ID_RE = re.compile(r"[A-Za-z0-9_-]{16}")  # a token's id (jti): 12 random bytes, base64url
SCOPES = frozenset({"session:start", "session:stop"})


@dataclass(frozen=True)
class Token:
    sub: str
    scope: frozenset[str]
    exp: int
    jti: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, f"{PREFIX}.{payload}".encode(), hashlib.sha256).digest())


def issue(key: bytes, sub: str, scope: set[str], exp: int) -> tuple[str, Token]:
    if not scope or not scope <= SCOPES:
        raise ValueError(f"scope: expected some of {', '.join(sorted(SCOPES))}")
    tok = Token(sub, frozenset(scope), int(exp), secrets.token_urlsafe(12))
    payload = _b64(json.dumps({"sub": tok.sub, "scope": sorted(tok.scope), "exp": tok.exp, "jti": tok.jti},
                              separators=(",", ":")).encode())
    return f"{PREFIX}.{payload}.{_mac(key, payload)}", tok


def verify(key: bytes, text: str, now: float, revoked: set[str]) -> Token | None:
    """The token when its MAC is ours, it has not expired and is not revoked; else None."""
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        return None
    if not hmac.compare_digest(_mac(key, parts[1]), parts[2]):
        return None
    try:
        data = json.loads(_unb64(parts[1]))
        tok = Token(str(data["sub"]), frozenset(data["scope"]), int(data["exp"]), str(data["jti"]))
    except (ValueError, KeyError, TypeError):
        return None
    if tok.exp <= now or tok.jti in revoked:
        return None
    return tok
