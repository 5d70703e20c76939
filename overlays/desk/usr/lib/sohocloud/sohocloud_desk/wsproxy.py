"""The desktop's bytes between the browser and the session's VNC server (a unix socket, never a
port): the server side of a WebSocket (RFC 6455) that noVNC speaks, and a plain byte bridge.

Only what noVNC needs: binary messages, ping/pong, close. A client frame must be masked (the RFC's
rule, so a page cannot forge frames through a proxy), and no message may exceed MAX_MESSAGE.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import BinaryIO

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 1 << 20  # bytes: noVNC's client messages are small (keys, pointer, update requests)
CHUNK = 65536
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class ProtocolError(ValueError):
    pass


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def upgrade_headers(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The 101 answer's headers for a browser's upgrade request (lower-case *headers*), or
    ProtocolError naming what is missing."""
    if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in headers.get("connection", "").lower():
        raise ProtocolError("not a WebSocket upgrade")
    if headers.get("sec-websocket-version") != "13":
        raise ProtocolError("WebSocket version 13 expected")
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise ProtocolError("bad Sec-WebSocket-Key") from None
    out = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept_key(key))]
    offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    if "binary" in offered:
        out.append(("Sec-WebSocket-Protocol", "binary"))
    return tuple(out)


def encode(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (the server's)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) < n:
        raise EOFError
    return data


def read_frame(f: BinaryIO) -> tuple[bool, int, bytes]:
    """(final, opcode, unmasked payload) of the client's next frame."""
    b0, b1 = _read_exact(f, 2)
    if b0 & 0x70:
        raise ProtocolError("reserved bits set")
    if not b1 & 0x80:
        raise ProtocolError("client frame not masked")
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", _read_exact(f, 2))
    elif n == 127:
        (n,) = struct.unpack(">Q", _read_exact(f, 8))
    if n > MAX_MESSAGE:
        raise ProtocolError(f"frame larger than {MAX_MESSAGE} bytes")
    mask = _read_exact(f, 4)
    data = bytearray(_read_exact(f, n))
    for i in range(n):
        data[i] ^= mask[i % 4]
    return bool(b0 & 0x80), b0 & 0x0F, bytes(data)


def messages(f: BinaryIO, send: Callable[[bytes], None]) -> bytes:
    """The client's next data message (its fragments joined), answering pings through *send* on
    the way; b"" when the client closes."""
    parts: list[bytes] = []
    while True:
        final, op, data = read_frame(f)
        if op == OP_CLOSE:
            send(encode(OP_CLOSE, data[:2]))
            return b""
        if op == OP_PING:
            send(encode(OP_PONG, data[:125]))
            continue
        if op == OP_PONG:
            continue
        if op not in (OP_CONT, OP_TEXT, OP_BINARY) or (op == OP_CONT) != bool(parts):
            raise ProtocolError("unexpected frame")
        parts.append(data)
        if sum(map(len, parts)) > MAX_MESSAGE:
            raise ProtocolError(f"message larger than {MAX_MESSAGE} bytes")
        if final:
            return b"".join(parts)


def _shut(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _both_ways(a: socket.socket, b: socket.socket, forward: Callable[[], None], back: Callable[[], None]) -> None:
    """*back* in a thread, *forward* here; whichever ends first (a close, an error) shuts both
    sockets, which ends the other; then *b* is closed (*a* is its server's to close)."""
    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except (EOFError, OSError, ProtocolError):
            pass
        finally:
            _shut(a, b)

    t = threading.Thread(target=guarded, args=(back,), daemon=True)
    t.start()
    guarded(forward)
    t.join(5)
    b.close()


def websocket_bridge(client: socket.socket, client_in: BinaryIO, target: socket.socket) -> None:
    """Browser (WebSocket) <-> target (bytes) until either side closes; then both are closed."""
    lock = threading.Lock()

    def send(frame: bytes) -> None:
        with lock:
            client.sendall(frame)

    def to_target() -> None:
        while data := messages(client_in, send):
            target.sendall(data)

    def to_browser() -> None:
        while chunk := target.recv(CHUNK):
            send(encode(OP_BINARY, chunk))
        send(encode(OP_CLOSE, struct.pack(">H", 1000)))

    _both_ways(client, target, to_target, to_browser)


def byte_bridge(a: socket.socket, a_in: BinaryIO, b: socket.socket) -> None:
    """Bytes both ways between two sockets (*a_in* is a's buffered reader: it may hold bytes already)."""
    def a_to_b() -> None:
        while chunk := a_in.read1(CHUNK):
            b.sendall(chunk)

    def b_to_a() -> None:
        while chunk := b.recv(CHUNK):
            a.sendall(chunk)

    _both_ways(a, b, a_to_b, b_to_a)
