"""HTTPS for the desk services: a threaded server whose TLS handshake runs in the request's own
thread (one silent connection holds no one else up), requests as plain values for the services'
pure `handle`, and a JSON client over mutual TLS for the calls between the site's nodes.

Every node has /etc/sohocloud/tls/{ca.crt,node.crt,node.key} from its seed: the site CA and its
own certificate (CN = its name, SANs = its names and address). Browsers get the node certificate
and need no client certificate; node-to-node calls present theirs and are told apart by its CN.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

MAX_BODY = 16384  # bytes: every request of these services is small; more is a 413 before it is read
TIMEOUT = 15  # seconds a client may stall before its connection is dropped


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def under(cls, folder: Path) -> TlsFiles:
        return cls(folder / "ca.crt", folder / "node.crt", folder / "node.key")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    source: str  # the client's address
    peer: str | None  # the CN of a site certificate the client presented, else None

    def cookie(self, name: str) -> str | None:
        jar = SimpleCookie()
        try:
            jar.load(self.headers.get("cookie", ""))
        except CookieError:
            return None
        return jar[name].value if name in jar else None

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


Upgrade = Callable[[socket.socket, BinaryIO], None]  # takes the connection over after a 101


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    upgrade: Upgrade | None = None  # a 101: the connection is handed over once the headers are sent

    @classmethod
    def of_json(cls, status: int, data: Any, *headers: tuple[str, str]) -> Response:
        return cls(status, json.dumps(data).encode(), "application/json", headers)


App = Callable[[Request], Response]

# Browsers get these on every answer: nothing of the panel may be framed, sniffed or sent elsewhere.
BROWSER_HEADERS = (
    ("Content-Security-Policy", ("default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                                 "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'")),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),  # not no-referrer: with it a form post says "Origin: null"
    ("Cache-Control", "no-store"),
    ("Strict-Transport-Security", "max-age=31536000"),
)


def server_context(tls: TlsFiles, client_certs: bool) -> ssl.SSLContext:
    """The server's TLS: its node certificate; with *client_certs*, a certificate from the site CA
    is asked for (optional: browsers have none, node calls do) and checked when given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL if client_certs else ssl.CERT_NONE
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def client_context(tls: TlsFiles) -> ssl.SSLContext:
    """A node calling another: the server must have a site certificate for the name called; the
    caller shows its own."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def common_name(cert: dict | None) -> str | None:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def _handler(app: App, log: Callable[[str], None]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sohocloud-desk"
        sys_version = ""
        timeout = TIMEOUT
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
            super().setup()

        def log_message(self, fmt: str, *args: Any) -> None:  # the services log what matters themselves
            pass

        def _serve(self) -> None:
            length = self.headers.get("Content-Length", "0")
            if not length.isdigit() or int(length) > MAX_BODY:
                return self._send(Response.of_json(413, {"error": f"request larger than {MAX_BODY} bytes"}))
            body = self.rfile.read(int(length))
            path, _, query = self.path.partition("?")
            req = Request(self.command, path, query, {k.lower(): v for k, v in self.headers.items()}, body,
                          self.client_address[0], common_name(self.connection.getpeercert()))
            try:
                resp = app(req)
            except Exception as e:  # noqa: BLE001 -- one request's bug must not take the service down; say it in the journal
                log(f"{req.method} {req.path} from {req.source}: {type(e).__name__}: {e}")
                resp = Response.of_json(500, {"error": "internal error (see the journal)"})
            self._send(resp)

        def _send(self, resp: Response) -> None:
            self.send_response(resp.status)
            if resp.upgrade is None:
                self.send_header("Content-Type", resp.content_type)
                self.send_header("Content-Length", str(len(resp.body)))
            for name, value in resp.headers:
                self.send_header(name, value)
            self.end_headers()
            if resp.upgrade is not None:
                self.wfile.flush()
                self.connection.settimeout(None)  # a desktop may be quiet for long; its session's timers end it
                self.close_connection = True
                resp.upgrade(self.connection, self.rfile)
            elif self.command != "HEAD":
                self.wfile.write(resp.body)

        do_GET = do_POST = do_HEAD = _serve

    return Handler


def serve(app: App, address: str, port: int, ctx: ssl.SSLContext, log: Callable[[str], None]) -> ThreadingHTTPServer:
    """A server for *app* on address:port (not yet serving: call serve_forever)."""
    server = ThreadingHTTPServer((address, port), _handler(app, log))
    server.daemon_threads = True
    # A client that fails the handshake (no site certificate where one is checked, a scanner): one line.
    server.handle_error = lambda request, addr: log(f"dropped {addr[0]}: {sys.exc_info()[1]}")
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


def call(ctx: ssl.SSLContext, host: str, port: int, method: str, path: str, data: Any = None,
         timeout: float = 20) -> tuple[int, Any]:
    """(status, decoded JSON) of a call to another node. Network failures raise OSError."""
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        body = json.dumps(data).encode() if data is not None else None
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        raw = resp.read(1 << 20)
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, {"error": raw[:200].decode(errors="replace")}
    finally:
        conn.close()


def open_stream(ctx: ssl.SSLContext, host: str, port: int, path: str, timeout: float = 20) -> ssl.SSLSocket:
    """A byte stream to another node's *path* (an upgrade to `sohocloud-stream`): the socket, once
    the other side answered 101. Headers are read a byte at a time, so nothing after them is
    buffered away from the caller. OSError when refused."""
    sock = ctx.wrap_socket(socket.create_connection((host, port), timeout=timeout), server_hostname=host)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: sohocloud-stream\r\n"
                     "Connection: Upgrade\r\nContent-Length: 0\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = sock.recv(1)
            if not byte or len(head) > 8192:
                raise OSError(f"{host}: no answer to the stream request")
            head += byte
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
        if status != b"101":
            raise OSError(f"{host}: stream refused ({head.splitlines()[0].decode(errors='replace')})")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise
