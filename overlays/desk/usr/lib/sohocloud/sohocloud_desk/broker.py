"""The sign-in decision: who is this, may they have a desktop, where does it run.

One broker for the site (on the node that provides `desktops`), so the rules that span machines hold
everywhere: a TOTP code is used once site-wide, failures count per person across every PC, a person
has one session, and sessions spread over the hosts. The panels ask it over mutual TLS; this module
is the decision only (no sockets), so each rule is tested on its own.

Refusals carry two texts: `message` for the person (an unknown name reads like a wrong password)
and `reason` for the audit log.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from . import placement, policy, totp
from .checkers import PasswordChecker
from .inputs import SignIn
from .ratelimit import Limiter

WRONG = "Wrong name or password."


class Refused(Exception):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.message, self.reason = message, reason


@dataclass(frozen=True)
class Person:
    name: str
    uid: int
    groups: frozenset[str]
    totp_secret: str | None = None


@dataclass(frozen=True)
class Placed:
    session: str  # a new session id (random)
    person: Person
    host: str
    grant: policy.Grant
    replaced: str | None = None  # the session it took over (to stop first), if any


@dataclass(frozen=True)
class Rules:
    otp: bool  # the second factor is required with a password
    second_sign_in: str  # "take-over" | "refuse"
    host_reserve: int  # bytes
    policy: tuple[dict[str, str], ...]
    machine_types: dict[str, policy.MachineType]


@dataclass
class Broker:
    rules: Rules
    people: dict[str, Person]
    passwords: list[PasswordChecker]  # any one proves the password
    token_ok: Callable[[str, str, str], bool]  # (name, token, scope)
    hosts: Callable[[], list[placement.HostState]]
    clock: Callable[[], float]
    audit: Callable[..., None]
    totp_used: dict[str, int] = field(default_factory=dict)  # person -> last step used (persist: save_totp)
    save_totp: Callable[[dict[str, int]], None] = lambda used: None
    limiter: Limiter = field(default_factory=Limiter)
    sessions: dict[str, tuple[str, str]] = field(default_factory=dict)  # person -> (session, host)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sign_in(self, req: SignIn, source: str, seat: str | None = None) -> Placed:
        """A new session for the person, or Refused. Every outcome is audited."""
        try:
            placed = self._decide(req, source, seat)
        except Refused as r:
            self.audit("sign-in-refused", f"sign-in refused: {r.reason}", person=req.name, source=source,
                       reason=r.reason)
            raise
        how = "token" if req.token else "password+otp" if self.rules.otp else "password"
        self.audit("sign-in", f"{req.name} signed in ({how}) from {source}; session on {placed.host}",
                   person=req.name, source=source, host=placed.host, session=placed.session, method=how)
        return placed

    def _decide(self, req: SignIn, source: str, seat: str | None) -> Placed:
        now = self.clock()
        wait = self.limiter.blocked(req.name, source, now)
        if wait > 0:
            raise Refused(f"Too many failed sign-ins: try again in {int(wait) + 1} s.", "rate-limited")
        person = self._first_factor(req, source, now)  # outside the lock: a slow directory delays one person
        with self._lock:  # one decision at a time: the TOTP step and the session table change together
            if self.rules.otp and not req.token:
                self._second_factor(person, req.otp, source, now)
            grant = policy.grant_for(set(person.groups), list(self.rules.policy), self.rules.machine_types)
            if grant is None:
                raise Refused("Your account does not get a desktop here; ask the office's admin.",
                              "not in a desktop group")
            replaced = self._one_session_rule(person)
            old_host = self.sessions[person.name][1] if replaced else None
            hosts = [self._without(h, grant) if h.name == old_host else h for h in self.hosts()]
            host = placement.choose_host(hosts, grant.machine.memory, self.rules.host_reserve, prefer=seat)
            if host is None:
                raise Refused("No desktop machine has room right now; try again in a few minutes.",
                              "no host with capacity")
            placed = Placed(secrets.token_urlsafe(24), person, host.name, grant, replaced)
            self.sessions[person.name] = (placed.session, host.name)
            self.limiter.succeeded(person.name)
            return placed

    def _first_factor(self, req: SignIn, source: str, now: float) -> Person:
        person = self.people.get(req.name)
        if req.token:
            ok = self.token_ok(req.name, req.token, "session:start")
        else:
            # Unknown names are checked too (the checkers take as long), then refused alike.
            ok = any(check(req.name, req.password) for check in self.passwords)
        if not ok or person is None:
            self.limiter.failed(req.name, source, now)
            raise Refused(WRONG if not req.token else "That token is not valid (expired, revoked or not yours).",
                          "bad token" if req.token else "bad password" if person else "unknown name")
        return person

    def _second_factor(self, person: Person, code: str, source: str, now: float) -> None:
        if not person.totp_secret:
            raise Refused("Your second factor is not set up; ask the office's admin.", "no totp secret")
        if not code:
            raise Refused("Enter the 6-digit code from your authenticator app.", "totp missing")
        key = totp.decode_secret(person.totp_secret)
        step = totp.accept(key, code, now, self.totp_used.get(person.name))
        if step is None:
            self.limiter.failed(person.name, source, now)
            used = totp.matching_step(key, code, now) is not None
            raise Refused("That code was already used: wait for the next one." if used else "Wrong code.",
                          "totp reused" if used else "bad totp")
        self.totp_used[person.name] = step
        self.save_totp(dict(self.totp_used))

    def _one_session_rule(self, person: Person) -> str | None:
        current = self.sessions.get(person.name)
        if current is None:
            return None
        if self.rules.second_sign_in == "refuse":
            raise Refused(f"You already have a desktop (on {current[1]}); sign out there first.",
                          "already has a session")
        return current[0]

    @staticmethod
    def _without(h: placement.HostState, grant: policy.Grant) -> placement.HostState:
        """The host as it will be once the session being taken over has stopped."""
        return placement.HostState(h.name, h.up, h.memory_total, max(0, h.sessions_memory - grant.machine.memory),
                                   max(0, h.sessions - 1))

    def ended(self, person: str, session: str, host: str, reason: str) -> None:
        """A host reports a session gone (sign-out, timeout, taken over, host reboot)."""
        with self._lock:
            if self.sessions.get(person, (None,))[0] == session:
                del self.sessions[person]
        self.audit("session-stop", f"session of {person} on {host} ended: {reason}", person=person, host=host,
                   session=session, reason=reason)
