"""The broker as a service: the sign-in decision (broker.py) behind HTTPS with mutual TLS, and the
site's table of hosts and sessions.

Only the site's workstation hosts talk to it (their node certificate's CN must be one of the
hosts in its seed), and the admin on the broker's own node (its own certificate):

    POST /v1/sign-in    a panel relays a person's sign-in: {name, password|token, otp, source, seat}
                        -> 200 {session, host, fqdn, person, uid} | 400/403/429/503 {message}
                        The broker starts the container on the chosen host before it answers.
    POST /v1/sign-out   a panel ends a session: {person, session, reason}
    POST /v1/stop-mine  a panel relays a script's "stop my session": {name, token} (scope session:stop)
    POST /v1/host       a host's heartbeat every HEARTBEAT s: {memory_total, sessions: [ids it runs],
                        browsers: [ids its signed-in browsers hold]} -> {stop: [ids], gone: [ids]}
    GET  /v1/sessions   (admin) the sessions now: [{person, session, host, started, machine}]
    POST /v1/end        (admin) {person}: end that person's session

The hosts' containers do what the broker says: POST /v1/start and /v1/stop on the host (agent.py).
A host that missed its heartbeats is down (placement skips it); a session its host no longer
reports (the host restarted) has ended.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import inputs, placement
from .broker import Broker, Placed, Refused
from .https import Request, Response

HEARTBEAT = 10.0  # seconds between a host's reports
HOST_DOWN_AFTER = 3 * HEARTBEAT + 5  # no report for this long: the host is down
START_GRACE = 120.0  # a session placed this recently may not be in its host's report yet

HostCall = Callable[[str, str, str, Any], tuple[int, Any]]  # (host name, method, path, data) -> (status, data)


@dataclass
class Live:
    person: str
    session: str
    host: str  # where it runs
    seat: str  # the panel the person signed in at (it holds their browser session)
    memory: int
    started: float
    machine: str
    browser: bool  # signed in at a panel (its browser session holds it), not started by a script's token


@dataclass
class HostSeen:
    memory_total: int
    at: float


@dataclass
class BrokerService:
    broker: Broker
    hosts: dict[str, dict[str, str]]  # name -> {name, fqdn, address} (from the seed)
    own_name: str  # the broker's node: its certificate is the admin's
    host_call: HostCall
    live: dict[str, Live] = field(default_factory=dict)  # session id -> Live
    seen: dict[str, HostSeen] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.broker.hosts = self.host_states  # placement sees what the hosts report and what was placed

    # ------------------------------------------------------------------ state

    def host_states(self) -> list[placement.HostState]:
        now = self.broker.clock()
        with self._lock:
            out = []
            for name in sorted(self.hosts):
                seen = self.seen.get(name)
                mine = [s for s in self.live.values() if s.host == name]
                out.append(placement.HostState(name, seen is not None and now - seen.at < HOST_DOWN_AFTER,
                                               seen.memory_total if seen else 0, sum(s.memory for s in mine),
                                               len(mine)))
            return out

    def _forget(self, session: str, reason: str) -> Live | None:
        with self._lock:
            gone = self.live.pop(session, None)
        if gone:
            self.broker.ended(gone.person, gone.session, gone.host, reason)
        return gone

    # ------------------------------------------------------------------ HTTP

    def __call__(self, req: Request) -> Response:
        route = ROUTES.get((req.method, req.path))
        if route is None:
            return Response.of_json(404, {"error": "no such endpoint"})
        who, handler = route
        if who == "host" and req.peer not in self.hosts:
            return Response.of_json(403, {"error": "only the site's workstation hosts call this"})
        if who == "admin" and req.peer != self.own_name:
            return Response.of_json(403, {"error": "only the broker's own node (its admin) calls this"})
        try:
            data = req.json() if req.body else {}
        except ValueError:
            return Response.of_json(400, {"message": "expected a JSON request"})
        if not isinstance(data, dict):
            return Response.of_json(400, {"message": "expected a JSON object"})
        return handler(self, req, data)

    def sign_in(self, req: Request, data: dict[str, Any]) -> Response:
        source, seat = data.pop("source", None), data.pop("seat", None)
        if not isinstance(source, str) or seat != req.peer:
            return Response.of_json(400, {"message": "expected the browser's address, and the caller as the seat"})
        try:
            if not all(isinstance(v, str) for v in data.values()):
                raise inputs.BadInput("expected a JSON object of strings")
            sign_in = inputs.sign_in(data)
        except inputs.BadInput as e:
            self.broker.audit("bad-request", f"bad sign-in request from {source}: {e}", source=source, reason=str(e))
            return Response.of_json(400, {"message": f"Bad request: {e}."})
        try:
            placed = self.broker.sign_in(sign_in, source, seat)
        except Refused as r:
            return Response.of_json(429 if r.reason == "rate-limited" else 403, {"message": r.message})
        old = self.live.get(placed.replaced or "")
        if old:
            self._stop(old, "taken over by a sign-in elsewhere")
        return self._start(placed, seat, browser=not sign_in.token)

    def stop_mine(self, req: Request, data: dict[str, Any]) -> Response:
        """A script's "stop my session" with a token of scope session:stop."""
        name, token = data.get("name"), data.get("token")
        if not (isinstance(name, str) and inputs.NAME_RE.fullmatch(name) and isinstance(token, str)
                and len(token) <= inputs.MAX_TOKEN):
            return Response.of_json(400, {"message": "Bad request: expected {name, token}."})
        if not self.broker.token_ok(name, token, "session:stop"):
            self.broker.audit("sign-in-refused", f"stop refused for {name}: bad token", person=name,
                              source=str(data.get("source", "")), reason="bad token")
            return Response.of_json(403, {"message": "That token is not valid (expired, revoked or not yours)."})
        found = [s for s in list(self.live.values()) if s.person == name]
        for s in found:
            self._stop(s, "stopped by the person's script")
        return Response.of_json(200, {"ended": [s.session for s in found]})

    def _start(self, placed: Placed, seat: str, browser: bool) -> Response:
        live = Live(placed.person.name, placed.session, placed.host, seat, placed.grant.machine.memory,
                    self.broker.clock(), placed.grant.machine.name, browser)
        with self._lock:
            self.live[placed.session] = live
        order = {"session": placed.session, "person": placed.person.name, "uid": placed.person.uid, "seat": seat,
                 "machine": {"name": placed.grant.machine.name, "cpus": placed.grant.machine.cpus,
                             "memory": placed.grant.machine.memory, "pids": placed.grant.machine.pids},
                 "network": placed.grant.network}
        try:
            status, answer = self.host_call(placed.host, "POST", "/v1/start", order)
        except OSError as e:
            status, answer = 0, {"error": str(e)}
        if status != 200:
            self._forget(placed.session, f"could not start on {placed.host}: {answer}")
            return Response.of_json(503, {"message": "Your desktop could not be started; try again in a minute."})
        self.broker.audit("session-start", f"session of {live.person} started on {live.host} ({live.machine})",
                          person=live.person, host=live.host, session=live.session, machine=live.machine)
        host = self.hosts[placed.host]
        return Response.of_json(200, {"session": placed.session, "person": live.person, "uid": placed.person.uid,
                                      "host": placed.host, "fqdn": host["fqdn"]})

    def _stop(self, live: Live, reason: str) -> None:
        try:
            self.host_call(live.host, "POST", "/v1/stop", {"session": live.session, "reason": reason})
        except OSError:
            pass  # a host that is down runs nothing; its next heartbeat (after its restart) confirms it
        self._forget(live.session, reason)

    def sign_out(self, req: Request, data: dict[str, Any]) -> Response:
        live = self.live.get(str(data.get("session", "")))
        if live is None or live.person != data.get("person") or req.peer not in (live.seat, live.host):
            return Response.of_json(404, {"error": "no such session"})
        reason = str(data.get("reason", "signed out"))[:80]
        self._stop(live, reason)
        return Response.of_json(200, {"ended": live.session})

    def heartbeat(self, req: Request, data: dict[str, Any]) -> Response:
        try:
            memory, running = int(data["memory_total"]), {str(s) for s in data["sessions"]}
            held = {str(s) for s in data.get("browsers", [])}
        except (KeyError, TypeError, ValueError):
            return Response.of_json(400, {"error": "expected {memory_total, sessions, browsers}"})
        now = self.broker.clock()
        with self._lock:
            restarted = req.peer in self.seen and now - self.seen[req.peer].at >= HOST_DOWN_AFTER
            self.seen[req.peer] = HostSeen(memory, now)
            settled = [s for s in self.live.values() if now - s.started > START_GRACE]
        for s in settled:
            if s.host == req.peer and s.session not in running:
                self._forget(s.session, "host restarted" if restarted else "no longer running on its host")
            elif s.seat == req.peer and s.browser and s.session not in held:
                # Its panel lost the browser session (the panel restarted, or a sign-out that could
                # not reach the broker): nobody can reach this desktop any more.
                self._stop(s, "its browser session is gone")
        # Sessions the host runs that the broker does not know (it restarted): the host stops them.
        known = {s.session for s in self.live.values() if s.host == req.peer}
        held_live = {s.session for s in self.live.values() if s.seat == req.peer}
        return Response.of_json(200, {"stop": sorted(running - known), "gone": sorted(held - held_live)})

    def sessions(self, req: Request, data: dict[str, Any]) -> Response:
        return Response.of_json(200, [{"person": s.person, "session": s.session, "host": s.host,
                                       "started": s.started, "machine": s.machine}
                                      for s in sorted(self.live.values(), key=lambda s: s.started)])

    def end(self, req: Request, data: dict[str, Any]) -> Response:
        found = [s for s in list(self.live.values()) if s.person == data.get("person")]
        for s in found:
            self._stop(s, "ended by the admin")
        return Response.of_json(200 if found else 404, {"ended": [s.session for s in found]})


ROUTES: dict[tuple[str, str], tuple[str, Callable[[BrokerService, Request, dict[str, Any]], Response]]] = {
    ("POST", "/v1/sign-in"): ("host", BrokerService.sign_in),
    ("POST", "/v1/sign-out"): ("host", BrokerService.sign_out),
    ("POST", "/v1/stop-mine"): ("host", BrokerService.stop_mine),
    ("POST", "/v1/host"): ("host", BrokerService.heartbeat),
    ("GET", "/v1/sessions"): ("admin", BrokerService.sessions),
    ("POST", "/v1/end"): ("admin", BrokerService.end),
}
