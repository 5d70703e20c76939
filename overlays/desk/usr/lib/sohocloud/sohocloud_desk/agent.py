"""A workstation host's side of the sessions: it starts and stops the containers the broker orders
and reports what it runs. Only the broker may order (its certificate's CN); an order is checked
like any input, since it becomes a container's argv and a path.

    POST /v1/start  {session, person, uid, seat, machine: {name, cpus, memory, pids}, network}
    POST /v1/stop   {session, reason}

How a container is run is the Runner's business (podman as the person, in their user slice);
this module keeps the table and the rules.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import container, inputs, policy
from .https import Request, Response

SESSION_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
MIN_UID = 1000  # a person's uid: never a system account's
MAX_UNIX_PATH = 107  # bytes of a unix socket's path (sun_path less its NUL)
VNC_SOCKET = "vnc/vnc.sock"  # in the session's folder: its vnc/ is the container's container.VNC_DIR
CPUS_RE = re.compile(r"[0-9]{1,3}(\.[0-9]{1,2})?")


class Runner(Protocol):
    def start(self, s: container.Session) -> None: ...  # raises RuntimeError with a reason
    def stop(self, s: container.Session) -> None: ...


def session_of(order: dict[str, Any], homes: Path, sessions: Path) -> container.Session:
    """The container.Session an order describes; ValueError names what is wrong."""
    sid, person, uid, network = order.get("session"), order.get("person"), order.get("uid"), order.get("network")
    m = order.get("machine")
    if not (isinstance(sid, str) and SESSION_RE.fullmatch(sid)):
        raise ValueError("session: expected a session id")
    if not (isinstance(person, str) and inputs.NAME_RE.fullmatch(person)):
        raise ValueError("person: expected a login name")
    if not (isinstance(uid, int) and MIN_UID <= uid < 2**31):
        raise ValueError(f"uid: expected a person's uid (>= {MIN_UID})")
    if network not in container.NETWORKS:
        raise ValueError(f"network: expected one of {', '.join(container.NETWORKS)}")
    if not (isinstance(m, dict) and isinstance(m.get("name"), str) and inputs.NAME_RE.fullmatch(m["name"])
            and CPUS_RE.fullmatch(str(m.get("cpus"))) and isinstance(m.get("memory"), int) and m["memory"] > 0
            and isinstance(m.get("pids"), int) and m["pids"] > 0):
        raise ValueError("machine: expected {name, cpus, memory, pids}")
    grant = policy.Grant(policy.MachineType(m["name"], str(m["cpus"]), m["memory"], m["pids"]), network)
    if len(str(sessions / sid / VNC_SOCKET).encode()) > MAX_UNIX_PATH:
        raise ValueError(f"{sessions}: too long a folder for the sessions' VNC sockets")
    return container.Session(sid, person, uid, str(homes / person), str(sessions / sid), grant)


def memory_total(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{meminfo} has no MemTotal")


@dataclass
class Agent:
    broker: str  # the broker's node name: the only caller allowed to order
    runner: Runner
    homes: Path  # the people's NAS homes are homes/<name>
    sessions_dir: Path  # one folder per session (its VNC socket), on tmpfs: a reboot empties it
    # No room until the desktop template is mounted (template.keep_trying sets it).
    ready: Callable[[], bool] = lambda: True
    # The host's own audit events (audit.py): its containers started, failed, stopped.
    audit: Callable[..., None] = lambda *a, **k: None
    running: dict[str, container.Session] = field(default_factory=dict)
    seats: dict[str, str] = field(default_factory=dict)  # session id -> the panel whose browser shows it
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, req: Request, data: dict[str, Any]) -> Response:
        if req.peer != self.broker:
            return Response.of_json(403, {"error": "only the broker starts sessions"})
        try:
            s = session_of(data, self.homes, self.sessions_dir)
            seat = data.get("seat")
            if not (isinstance(seat, str) and inputs.NAME_RE.fullmatch(seat)):
                raise ValueError("seat: expected a node name")
        except ValueError as e:
            return Response.of_json(400, {"error": str(e)})
        with self._lock:
            if s.id in self.running:
                return Response.of_json(200, {"started": s.id})  # a retried order
            self.running[s.id] = s
            self.seats[s.id] = seat
        try:
            self.runner.start(s)
        except RuntimeError as e:
            with self._lock:
                self.running.pop(s.id, None)
                self.seats.pop(s.id, None)
            self.runner.stop(s)  # whatever half of it exists goes
            self.audit("container-failed", f"desktop container of {s.person} did not start: {e}", person=s.person,
                       session=s.id, reason=str(e))
            return Response.of_json(500, {"error": str(e)})
        self.audit("container-start", f"desktop container of {s.person} started ({s.grant.machine.name}, "
                   f"network {s.grant.network})", person=s.person, session=s.id, unit=container.unit_name(s))
        return Response.of_json(200, {"started": s.id})

    def stop(self, req: Request, data: dict[str, Any]) -> Response:
        if req.peer != self.broker:
            return Response.of_json(403, {"error": "only the broker stops sessions"})
        reason = data.get("reason")
        found = self.stop_session(str(data.get("session", "")),
                                  reason if isinstance(reason, str) and len(reason) < 200 else "ordered by the broker")
        return Response.of_json(200 if found else 404, {"stopped": data.get("session") if found else None})

    def stop_session(self, sid: str, reason: str) -> bool:
        with self._lock:
            s = self.running.pop(sid, None)
            self.seats.pop(sid, None)
        if s is not None:
            self.runner.stop(s)
            self.audit("container-stop", f"desktop container of {s.person} stopped and removed: {reason}",
                       person=s.person, session=s.id, reason=reason)
        return s is not None

    def session(self, sid: str) -> container.Session | None:
        return self.running.get(sid)

    def vnc_socket(self, sid: str) -> Path:
        return self.sessions_dir / sid / VNC_SOCKET

    def report(self) -> dict[str, Any]:
        # A host without its template yet reports no memory: placement finds no room on it.
        return {"memory_total": memory_total() if self.ready() else 0, "sessions": sorted(self.running)}
