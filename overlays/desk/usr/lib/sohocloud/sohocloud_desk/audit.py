"""Audit events to the journal with structured fields (the journal's native protocol), from where
journal-upload forwards them to the site's log sink on control.

    SOHOCLOUD_EVENT    (the broker) sign-in | sign-in-refused | session-start | session-stop | bad-request
                       (the host running it) container-start | container-failed | container-stop
    SOHOCLOUD_PERSON   the name signed in as (only a name that passed inputs.NAME_RE)
    SOHOCLOUD_SOURCE   the browser's address          SOHOCLOUD_HOST     where the session runs
    SOHOCLOUD_SESSION  the session id                  SOHOCLOUD_REASON   why refused or ended
    SOHOCLOUD_UNIT     the session's systemd unit on its host

Never a password, a TOTP code or a token.
"""

from __future__ import annotations

import socket
import struct

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "sohocloud-desk"
PRIORITIES = {"sign-in": 5, "session-start": 5, "session-stop": 5, "sign-in-refused": 4, "bad-request": 4,
              "container-start": 5, "container-stop": 5, "container-failed": 3}


def encode(fields: dict[str, str]) -> bytes:
    """Fields in the native protocol: KEY=value lines; a value with a line break in the binary form."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", errors="replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def event_fields(event: str, message: str, **fields: str) -> dict[str, str]:
    out = {"MESSAGE": message, "PRIORITY": str(PRIORITIES.get(event, 6)), "SYSLOG_IDENTIFIER": IDENTIFIER,
           "SOHOCLOUD_EVENT": event}
    out.update({f"SOHOCLOUD_{k.upper()}": v for k, v in fields.items() if v})
    return out


def send(fields: dict[str, str], path: str = JOURNAL_SOCKET) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(encode(fields), path)


def event(event: str, message: str, **fields: str) -> None:
    send(event_fields(event, message, **fields))
