"""TOTP (RFC 6238 over RFC 4226's HOTP): SHA-1, 6 digits, 30-second steps, what phone apps make.

A code is good for its own step and one on either side (clock drift), and only once: the last
step a person used is remembered, and a code from that step or an earlier one is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

STEP = 30
DIGITS = 6
DRIFT_STEPS = 1


def decode_secret(secret_b32: str) -> bytes:
    text = secret_b32.strip().replace(" ", "").upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def hotp(key: bytes, counter: int, digits: int = DIGITS) -> str:
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10 ** digits).zfill(digits)


def totp(key: bytes, now: float, digits: int = DIGITS) -> str:
    return hotp(key, int(now // STEP), digits)


def matching_step(key: bytes, code: str, now: float) -> int | None:
    """The step (within the drift window) whose code *code* is, or None. Compared in constant time."""
    step = int(now // STEP)
    found = None
    for s in range(step - DRIFT_STEPS, step + DRIFT_STEPS + 1):
        if hmac.compare_digest(hotp(key, s).encode(), code.encode()):
            found = s
    return found


def accept(key: bytes, code: str, now: float, last_used_step: int | None) -> int | None:
    """The step to remember as used when *code* is good and newer than *last_used_step*, else None."""
    step = matching_step(key, code, now)
    if step is None or (last_used_step is not None and step <= last_used_step):
        return None
    return step
