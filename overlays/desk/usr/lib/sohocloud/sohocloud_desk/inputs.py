"""What a sign-in request may contain. Anything else is a 400 before any checker, container or
log line of the person's name sees it: the name reaches LDAP filters, file names and journal fields,
so it must be a plain lowercase login name (the rule the site file's names follow)."""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass

from sohocloud_firstboot.seedrules import LABEL_RE

MAX_BODY = 8192  # bytes of a sign-in request
MAX_PASSWORD = 512  # bytes (UTF-8)
MAX_TOKEN = 1024
NAME_RE = LABEL_RE  # the site file's rule for names: no dots, no LDAP or shell metacharacters, at most 63
OTP_RE = re.compile(r"[0-9]{6}")
TOKEN_RE = re.compile(r"[A-Za-z0-9._-]+")
FIELDS = frozenset({"name", "password", "otp", "token"})


class BadInput(ValueError):
    """The request is malformed (a 400); the message names the field, never its value."""


@dataclass(frozen=True)
class SignIn:
    name: str
    password: str = ""
    otp: str = ""
    token: str = ""


def parse_body(body: bytes, content_type: str) -> dict[str, str]:
    """A form post (application/x-www-form-urlencoded) or JSON object of strings."""
    if len(body) > MAX_BODY:
        raise BadInput(f"request larger than {MAX_BODY} bytes")
    try:
        text = body.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise BadInput("request is not UTF-8") from None
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/json":
        try:
            data = json.loads(text)
        except ValueError:
            raise BadInput("request is not a JSON object") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise BadInput("request is not a JSON object of strings")
        return data
    if kind == "application/x-www-form-urlencoded":
        try:
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                                           errors="strict", max_num_fields=len(FIELDS))
        except (ValueError, UnicodeDecodeError):
            raise BadInput("request is not a form") from None
        data = {}
        for k, v in pairs:
            if k in data:
                raise BadInput(f"field {k!r} given twice")
            data[k] = v
        return data
    raise BadInput("expected a form or JSON request")


def sign_in(data: dict[str, str]) -> SignIn:
    unknown = set(data) - FIELDS
    if unknown:
        raise BadInput(f"unknown field(s): {', '.join(sorted(repr(k)[:40] for k in unknown))}")
    name = data.get("name", "")
    if not NAME_RE.fullmatch(name):
        raise BadInput("name: expected a login name (lowercase letters, digits and '-', at most 63)")
    password, otp, token = data.get("password", ""), data.get("otp", ""), data.get("token", "")
    if len(password.encode()) > MAX_PASSWORD or "\0" in password:
        raise BadInput(f"password: longer than {MAX_PASSWORD} bytes or contains NUL")
    if otp and not OTP_RE.fullmatch(otp):
        raise BadInput("otp: expected 6 digits")
    if token and (len(token) > MAX_TOKEN or not TOKEN_RE.fullmatch(token)):
        raise BadInput("token: not a sohocloud token")
    if bool(password) == bool(token):
        raise BadInput("expected a password or a token (one of them)")
    return SignIn(name, password, otp, token)
