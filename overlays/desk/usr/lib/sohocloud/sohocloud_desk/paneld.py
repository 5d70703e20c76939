"""The sign-in panel on every workstation host: the page a person signs in at (on the PC's own
screen, or from any browser on the site LAN), their desktop page, sign-out, and the timeouts.

    GET  /             sign-in form (or, signed in, to /desktop)
    POST /sign-in      name, password, otp (a form) -> the broker decides and starts the session
    GET  /desktop      the person's desktop page (signed in only): noVNC in the page
    GET  /vnc          (WebSocket) the desktop itself: to the session's VNC socket, here or, through
                       that host's panel, on the host that runs it
    GET  /novnc/...    noVNC's client library (Debian's, vendored: /usr/share/sohocloud-desk/novnc)
    POST /alive        the desktop page's heartbeat, every ALIVE s: {"active": bool}
    POST /sign-out     ends the session
    POST /api/start    a script: {name, token} (scope session:start) -> {host}
    POST /api/stop     a script: {name, token} (scope session:stop)
    POST /v1/start, /v1/stop   the broker's orders to this host (agent.py)
    GET  /v1/vnc?session=ID    (a byte stream) a session this host runs, for the panel whose browser shows it

The browser session is a random id in a cookie (Secure, HttpOnly, SameSite=Strict) that only this
panel knows; the desktop's session belongs to it and to nothing the page can read or pass on.
A form post must come from this panel's own origin (the Origin header), against cross-site posts.
"""

from __future__ import annotations

import html
import secrets
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import https, inputs, wsproxy
from .agent import Agent
from .https import BROWSER_HEADERS, Request, Response

COOKIE = "desk"
ALIVE = 15  # seconds between the desktop page's heartbeats
STATIC = Path(__file__).with_name("static")
STATIC_FILES = {"/panel.css": "text/css", "/panel.js": "text/javascript", "/desktop.js": "text/javascript"}
NOVNC = Path("/usr/share/sohocloud-desk/novnc")

BrokerCall = Callable[[str, str, Any], tuple[int, Any]]  # (method, path, data) -> (status, data)


@dataclass
class Browser:
    """A signed-in browser: whose session it holds, and when it was last seen and last used."""
    person: str
    session: str
    host: str
    fqdn: str
    seen: float
    active: float


@dataclass
class PanelService:
    name: str  # this host's node name (its certificate's CN)
    origins: frozenset[str]  # https://<fqdn>, https://<name>, https://<address>
    broker_call: BrokerCall
    agent: Agent
    idle_timeout: float
    disconnect_timeout: float
    clock: Callable[[], float]
    log: Callable[[str], None]
    node_ctx: ssl.SSLContext  # this node's client TLS, for the stream from another host's panel
    host_address: Callable[[str], tuple[str, int]]  # a host's fqdn -> where its panel listens
    novnc: Path = NOVNC
    browsers: dict[str, Browser] = field(default_factory=dict)  # cookie value -> Browser
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, req: Request) -> Response:
        if req.path == "/v1/vnc":
            return self.vnc_stream(req)
        if req.method == "GET" and req.path.startswith("/novnc/"):
            return self.novnc_file(req)
        if req.path in ("/v1/start", "/v1/stop"):
            try:
                data = req.json()
            except ValueError:
                return Response.of_json(400, {"error": "expected JSON"})
            return (self.agent.start if req.path == "/v1/start" else self.agent.stop)(req, data)
        route = BROWSER_ROUTES.get((req.method, req.path))
        if route is None:
            return self._page(404, "Not found", "<p>There is nothing here. <a href=\"/\">Sign in</a>.</p>")
        # Form posts and the WebSocket must come from this panel's own pages (cross-site request and
        # cross-site WebSocket forgery); browsers always send Origin on both.
        if ((req.method == "POST" or req.path == "/vnc") and req.headers.get("origin") not in self.origins
                and not req.path.startswith("/api/")):
            return self._page(403, "Refused", "<p>This form must be sent from the panel's own page.</p>")
        return route(self, req)

    # ------------------------------------------------------------------ pages

    def _page(self, status: int, title: str, body: str, *headers: tuple[str, str]) -> Response:
        text = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                f" - {html.escape(self.name)}</title><link rel=\"stylesheet\" href=\"/panel.css\"></head>"
                f"<body><main id=\"panel\" data-page=\"{html.escape(title.lower())}\">{body}</main>"
                "<script src=\"/panel.js\"></script></body></html>")
        return Response(status, text.encode(), "text/html; charset=utf-8", (*BROWSER_HEADERS, *headers))

    def _form(self, status: int = 200, message: str = "") -> Response:
        note = f"<p class=\"message\" id=\"message\" role=\"alert\">{html.escape(message)}</p>" if message else ""
        return self._page(status, "Sign in", f"""<h1>Sign in</h1>{note}
<form method="post" action="/sign-in" id="sign-in">
<label>Name <input name="name" autocomplete="username" autocapitalize="none" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<label>Code from your app <input name="otp" inputmode="numeric" pattern="[0-9]{{6}}" maxlength="6"
 autocomplete="one-time-code"></label>
<button type="submit">Sign in</button></form>
<p class="where">Office desktop panel on {html.escape(self.name)}</p>""")

    def _browser(self, req: Request) -> tuple[str, Browser] | None:
        sid = req.cookie(COOKIE)
        b = self.browsers.get(sid or "")
        return (sid, b) if sid and b else None

    def index(self, req: Request) -> Response:
        if self._browser(req):
            return Response(303, b"", "text/plain", (*BROWSER_HEADERS, ("Location", "/desktop")))
        return self._form()

    def static(self, req: Request) -> Response:
        return Response(200, (STATIC / req.path.lstrip("/")).read_bytes(), STATIC_FILES[req.path], BROWSER_HEADERS)

    def desktop(self, req: Request) -> Response:
        found = self._browser(req)
        if not found:
            return Response(303, b"", "text/plain", (*BROWSER_HEADERS, ("Location", "/")))
        b = found[1]
        return self._page(200, "Desktop", f"""<header><span id="person">{html.escape(b.person)}</span>
<span class="where">desktop on <span id="host">{html.escape(b.host)}</span></span>
<form method="post" action="/sign-out"><button type="submit" id="sign-out">Sign out</button></form></header>
<div id="screen" data-alive="{ALIVE}" data-state="connecting"></div>
<script type="module" src="/desktop.js"></script>""")

    def novnc_file(self, req: Request) -> Response:
        rel = urllib.parse.unquote(req.path[len("/novnc/"):])
        path = (self.novnc / rel).resolve()
        if not (path.is_relative_to(self.novnc.resolve()) and path.suffix == ".js" and path.is_file()):
            return Response.of_json(404, {"error": "no such file"})
        return Response(200, path.read_bytes(), "text/javascript", BROWSER_HEADERS)

    # ------------------------------------------------------------------ the desktop's stream

    def vnc(self, req: Request) -> Response:
        """The browser's WebSocket to its desktop: only with the cookie of the browser session that
        signed in, from this panel's own page."""
        found = self._browser(req)
        if not found:
            return Response.of_json(401, {"error": "not signed in"})
        try:
            headers = wsproxy.upgrade_headers(req.headers)
        except wsproxy.ProtocolError as e:
            return Response.of_json(400, {"error": str(e)})
        b = found[1]
        try:
            target = self._open_desktop(b)
        except OSError as e:
            self.log(f"desktop of {b.person} on {b.host}: {e}")
            return Response.of_json(502, {"error": "the desktop is not reachable (starting, or ended)"})
        return Response(101, headers=headers, upgrade=lambda conn, rfile: wsproxy.websocket_bridge(conn, rfile, target))

    def _open_desktop(self, b: Browser) -> socket.socket:
        if b.host == self.name:
            return self._vnc_socket(b.session)
        host, port = self.host_address(b.fqdn)
        return https.open_stream(self.node_ctx, host, port, f"/v1/vnc?session={b.session}")

    def _vnc_socket(self, session: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.agent.vnc_socket(session)))
        except OSError:
            sock.close()
            raise
        return sock

    def vnc_stream(self, req: Request) -> Response:
        """Another host's panel asks for a session this host runs: only the panel whose browser
        shows that session (its seat, from the broker's order)."""
        session = urllib.parse.parse_qs(req.query).get("session", [""])[0]
        if self.agent.session(session) is None or req.peer != self.agent.seats.get(session):
            return Response.of_json(403, {"error": "not your session's seat"})
        try:
            target = self._vnc_socket(session)
        except OSError:
            return Response.of_json(502, {"error": "the desktop is not reachable"})
        return Response(101, headers=(("Upgrade", "sohocloud-stream"), ("Connection", "Upgrade")),
                        upgrade=lambda conn, rfile: wsproxy.byte_bridge(conn, rfile, target))

    # ------------------------------------------------------------------ sign-in and out

    def sign_in(self, req: Request) -> Response:
        try:
            fields = inputs.parse_body(req.body, req.headers.get("content-type", ""))
            inputs.sign_in(fields)  # a bad request goes no further than this panel
        except inputs.BadInput as e:
            return self._form(400, f"Bad request: {e}.")
        status, answer = self._ask_broker("POST", "/v1/sign-in", {**fields, "source": req.source, "seat": self.name})
        if status != 200:
            return self._form(status if status in (400, 403, 429, 503) else 503, answer.get("message", ""))
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            self.browsers[sid] = Browser(answer["person"], answer["session"], answer["host"], answer["fqdn"], now, now)
        cookie = f"{COOKIE}={sid}; Path=/; Secure; HttpOnly; SameSite=Strict"
        return Response(303, b"", "text/plain", (*BROWSER_HEADERS, ("Set-Cookie", cookie), ("Location", "/desktop")))

    def _ask_broker(self, method: str, path: str, data: Any) -> tuple[int, dict[str, Any]]:
        try:
            status, answer = self.broker_call(method, path, data)
        except OSError as e:
            self.log(f"broker unreachable: {e}")
            return 503, {"message": "The sign-in service cannot be reached; try again in a minute."}
        return status, answer if isinstance(answer, dict) else {}

    def sign_out(self, req: Request) -> Response:
        found = self._browser(req)
        if found:
            self.end(found[0], "signed out")
        gone = f"{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"
        return Response(303, b"", "text/plain", (*BROWSER_HEADERS, ("Set-Cookie", gone), ("Location", "/")))

    def end(self, sid: str, reason: str) -> None:
        with self._lock:
            b = self.browsers.pop(sid, None)
        if b:
            self._ask_broker("POST", "/v1/sign-out", {"person": b.person, "session": b.session, "reason": reason})

    def forget_sessions(self, sessions: set[str]) -> None:
        """Sign out the browsers holding these sessions (ended elsewhere): their next beat goes to /."""
        with self._lock:
            for sid in [sid for sid, b in self.browsers.items() if b.session in sessions]:
                del self.browsers[sid]

    def alive(self, req: Request) -> Response:
        found = self._browser(req)
        if not found:
            return Response.of_json(401, {"signed_in": False})
        try:
            active = bool(req.json().get("active"))
        except (ValueError, AttributeError):
            active = False
        now = self.clock()
        found[1].seen = now
        if active:
            found[1].active = now
        return Response.of_json(200, {"signed_in": True})

    def tick(self) -> None:
        """End the sessions whose tab is gone (no heartbeat) or that nobody used for too long."""
        now = self.clock()
        for sid, b in list(self.browsers.items()):
            if now - b.seen > self.disconnect_timeout:
                self.end(sid, "disconnected (the desktop's tab was closed)")
            elif now - b.active > self.idle_timeout:
                self.end(sid, "idle")

    # ------------------------------------------------------------------ scripts

    def api(self, req: Request) -> Response:
        if req.headers.get("content-type", "").split(";")[0] != "application/json":
            return Response.of_json(400, {"message": "expected a JSON request"})  # a browser cannot send it cross-site
        try:
            data = inputs.parse_body(req.body, "application/json")
        except inputs.BadInput as e:
            return Response.of_json(400, {"message": f"Bad request: {e}."})
        if set(data) != {"name", "token"}:
            return Response.of_json(400, {"message": "Bad request: expected {name, token}."})
        path = "/v1/sign-in" if req.path == "/api/start" else "/v1/stop-mine"
        status, answer = self._ask_broker("POST", path, {**data, "source": req.source, "seat": self.name})
        if status == 200 and req.path == "/api/start":
            answer = {"host": answer["host"], "panel": f"https://{answer['fqdn']}/"}
        return Response.of_json(status, answer)


BROWSER_ROUTES: dict[tuple[str, str], Callable[[PanelService, Request], Response]] = {
    ("GET", "/"): PanelService.index,
    ("GET", "/panel.css"): PanelService.static,
    ("GET", "/panel.js"): PanelService.static,
    ("GET", "/desktop.js"): PanelService.static,
    ("GET", "/vnc"): PanelService.vnc,
    ("GET", "/desktop"): PanelService.desktop,
    ("POST", "/sign-in"): PanelService.sign_in,
    ("POST", "/sign-out"): PanelService.sign_out,
    ("POST", "/alive"): PanelService.alive,
    ("POST", "/api/start"): PanelService.api,
    ("POST", "/api/stop"): PanelService.api,
}
