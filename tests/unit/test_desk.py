"""The desktop sign-in core (overlays/desk/usr/lib/sohocloud/sohocloud_desk): pure parts, each
against its specification or a real counterpart (RFC 6238's vectors, crypt(3), a unix socket)."""

from __future__ import annotations

import io
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "overlays/desk/usr/lib/sohocloud"))

from sohocloud_desk import (
    audit,
    broker,
    checkers,
    container,
    inputs,
    placement,
    policy,
    ratelimit,
    tokens,
    totp,
    wsproxy,
)
from sohocloud_desk.broker import Refused

# --------------------------------------------------------------------------- TOTP

RFC6238_KEY = b"12345678901234567890"  # RFC 6238 appendix B, SHA-1


@pytest.mark.parametrize("now, code", [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
                                       (1234567890, "89005924"), (2000000000, "69279037"),
                                       (20000000000, "65353130")])
def test_totp_matches_rfc6238_test_vectors(now, code):
    assert totp.totp(RFC6238_KEY, now, digits=8) == code


def test_totp_accepts_a_code_once_and_within_one_step_of_drift():
    now = 1_700_000_000.0
    code = totp.totp(RFC6238_KEY, now)
    step = totp.accept(RFC6238_KEY, code, now + 29, None)
    assert step == int(now // 30)
    assert totp.accept(RFC6238_KEY, code, now, step) is None  # replay
    assert totp.accept(RFC6238_KEY, code, now + 95, None) is None  # three steps later: too old
    earlier = totp.totp(RFC6238_KEY, now - 30)
    assert totp.accept(RFC6238_KEY, earlier, now, step) is None  # older than the last one used
    assert totp.accept(RFC6238_KEY, "000000" if code != "000000" else "111111", now, None) is None


def test_totp_secret_decodes_as_phone_apps_write_it():
    assert totp.decode_secret("gezd gnbv gy3t qojq gezd gnbv gy3t qojq") == RFC6238_KEY


# --------------------------------------------------------------------------- sign-in input


def test_a_good_sign_in_form_parses():
    data = inputs.parse_body(b"name=alice&password=p%C3%A4ss+word&otp=012345", "application/x-www-form-urlencoded")
    assert inputs.sign_in(data) == inputs.SignIn("alice", "päss word", "012345")


@pytest.mark.parametrize("body, ctype, field", [
    (b"name=alice&password=" + b"x" * 9000, "application/x-www-form-urlencoded", "larger than"),
    (b"name=al\xffice&password=x", "application/x-www-form-urlencoded", "not UTF-8"),
    (b"name=alice&name=bob&password=x", "application/x-www-form-urlencoded", "twice"),
    (b'["alice"]', "application/json", "JSON object"),
    (b"name=alice", "text/plain", "form or JSON"),
])
def test_malformed_requests_are_refused_before_anything_reads_them(body, ctype, field):
    with pytest.raises(inputs.BadInput, match=field):
        inputs.sign_in(inputs.parse_body(body, ctype))


@pytest.mark.parametrize("name", ["alice)(uid=*", "*", "alice;reboot", "$(id)", "Alice", "uid=alice,ou=people",
                                  "a" * 64, "", "../etc", "alice\n", "al ice", "-alice"])
def test_names_with_metacharacters_are_bad_input(name):
    with pytest.raises(inputs.BadInput, match="name"):
        inputs.sign_in({"name": name, "password": "x"})


@pytest.mark.parametrize("data, field", [
    ({"name": "alice", "password": "x", "otp": "12345"}, "otp"),
    ({"name": "alice", "password": "x", "otp": "12345a"}, "otp"),
    ({"name": "alice", "password": "x" * 600}, "password"),
    ({"name": "alice", "password": "a\0b"}, "password"),
    ({"name": "alice"}, "password or a token"),
    ({"name": "alice", "password": "x", "token": "sct1.a.b"}, "password or a token"),
    ({"name": "alice", "token": "sct1.a b.c"}, "token"),
    ({"name": "alice", "password": "x", "admin": "1"}, "unknown field"),
])
def test_bad_fields_name_the_field_never_the_value(data, field):
    with pytest.raises(inputs.BadInput, match=field) as exc:
        inputs.sign_in(data)
    assert "x" * 20 not in str(exc.value)


# --------------------------------------------------------------------------- tokens


def test_a_token_is_good_for_its_person_scope_and_lifetime_only():
    key = b"k" * 32
    text, tok = tokens.issue(key, "alice", {"session:start"}, exp=1000)
    check = checkers.token_checker(key, set, lambda: 999.0)
    assert check("alice", text, "session:start")
    assert not check("bob", text, "session:start")
    assert not check("alice", text, "session:stop")
    assert not checkers.token_checker(key, set, lambda: 1000.0)("alice", text, "session:start")  # expired
    assert not checkers.token_checker(key, lambda: {tok.jti}, lambda: 1.0)("alice", text, "session:start")
    assert not checkers.token_checker(b"other" * 8, set, lambda: 1.0)("alice", text, "session:start")


def test_a_token_with_an_edited_payload_is_refused():
    key = b"k" * 32
    text, _tok = tokens.issue(key, "bob", {"session:stop"}, exp=10**10)
    prefix, payload, mac = text.split(".")
    forged = payload.replace(payload[5], "A" if payload[5] != "A" else "B", 1)
    assert tokens.verify(key, f"{prefix}.{forged}.{mac}", 0, set()) is None
    assert tokens.verify(key, text, 0, set()) is not None
    with pytest.raises(ValueError, match="scope"):
        tokens.issue(key, "bob", {"root"}, exp=1)


# --------------------------------------------------------------------------- rate limits


def test_failures_lock_a_person_and_a_source_for_the_window():
    lim = ratelimit.Limiter(window=300, per_person=3, per_source=5)
    for i in range(3):
        assert lim.blocked("alice", "10.0.0.5", 100 + i) == 0
        lim.failed("alice", "10.0.0.5", 100 + i)
    assert lim.blocked("alice", "10.0.0.9", 103) == pytest.approx(297)  # the name, from anywhere
    assert lim.blocked("bob", "10.0.0.5", 103) == 0  # the source not yet
    lim.failed("bob", "10.0.0.5", 104)
    lim.failed("carol", "10.0.0.5", 105)
    assert lim.blocked("dave", "10.0.0.5", 106) == pytest.approx(294)  # the source now
    assert lim.blocked("alice", "10.0.0.9", 400.5) == 0  # window passed


def test_a_success_clears_the_person_not_the_source():
    lim = ratelimit.Limiter(window=300, per_person=2, per_source=2)
    lim.failed("alice", "10.0.0.5", 1)
    lim.failed("bob", "10.0.0.5", 2)
    lim.succeeded("alice")
    assert lim.blocked("alice", "10.0.0.6", 3) == 0
    assert lim.blocked("alice", "10.0.0.5", 3) > 0


# --------------------------------------------------------------------------- checkers


def test_htpasswd_checks_real_crypt_hashes(tmp_path):
    import crypt
    f = tmp_path / "desk.htpasswd"
    f.write_text(f"# people\nalice:{crypt.crypt('right horse', crypt.mksalt(crypt.METHOD_SHA512))}\n"
                 f"bob:{crypt.crypt('battery', crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}\n")
    check = checkers.password_checkers({"htpasswd": {"file": str(f)}})["htpasswd"]
    assert check("alice", "right horse")
    assert check("bob", "battery")
    assert not check("alice", "battery")
    assert not check("nobody", "right horse")
    assert not check("alice", "")


# --------------------------------------------------------------------------- policy and placement

TYPES = policy.machine_types({"small": {"cpus": 1, "memory": "1G", "pids": 256},
                              "standard": {"cpus": "1.5", "memory": "2G", "pids": 512}})
RULES = [{"group": "interns", "machine": "small", "network": "none"},
         {"group": "office", "machine": "standard", "network": "lan"}]


def test_the_first_matching_group_rule_decides():
    assert policy.grant_for({"office", "interns"}, RULES, TYPES) == policy.Grant(TYPES["small"], "none")
    assert policy.grant_for({"office"}, RULES, TYPES).machine.memory == 2 << 30
    assert policy.grant_for({"visitors"}, RULES, TYPES) is None


G = 1 << 30


def test_sessions_spread_and_skip_full_or_down_hosts():
    hosts = [placement.HostState("ws1", True, 8 * G, 0, 0), placement.HostState("pc1", True, 4 * G, 0, 0),
             placement.HostState("pc2", False, 16 * G, 0, 0)]
    first = placement.choose_host(hosts, 2 * G, 1 * G, prefer="pc1")
    assert first.name == "ws1"  # both empty: the one with more room left; pc2 is down
    hosts[0] = placement.HostState("ws1", True, 8 * G, 2 * G, 1)
    assert placement.choose_host(hosts, 2 * G, 1 * G).name == "pc1"  # spread: the host without a session
    hosts[1] = placement.HostState("pc1", True, 4 * G, 2 * G, 1)
    assert placement.choose_host(hosts, 2 * G, 1 * G).name == "ws1"  # pc1 full (4 - 1 reserve - 2 < 2)
    assert placement.choose_host(hosts, 8 * G, 1 * G) is None


def test_a_tie_goes_to_the_pc_the_person_sits_at():
    hosts = [placement.HostState("pc1", True, 4 * G, 0, 0), placement.HostState("pc2", True, 4 * G, 0, 0)]
    assert placement.choose_host(hosts, G, G, prefer="pc2").name == "pc2"
    assert placement.choose_host(hosts, G, G).name == "pc1"


# --------------------------------------------------------------------------- the container


def test_the_session_container_is_confined_and_limited():
    s = container.Session("abcdefghijklmnopqrstuvwx", "alice", 2001, "/nas/home/alice", "/run/sohocloud-desk/sessions/abc",
                          policy.Grant(TYPES["standard"], "none"))
    argv = container.run_argv(s, 5000)
    unit, podman = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    # systemd holds the limits on the whole session, in the person's user slice, as the person.
    for prop in ("--slice=user-2001.slice", "--uid=2001", "--gid=5000", f"--property=MemoryMax={2 << 30}",
                 "--property=MemorySwapMax=0", "--property=TasksMax=512", "--property=CPUQuota=150%",
                 "--unit=desk-abcdefghijklmnop.service", "--setenv=HOME=/run/sohocloud-desk/sessions/abc"):
        assert prop in unit
    for flag in ("--rm", "--userns=keep-id", "--read-only", "--cap-drop=all", "--security-opt=no-new-privileges",
                 "--network=none", "--cgroups=disabled", "--runtime=crun"):
        assert flag in podman
    assert podman[podman.index("/nas/home/alice:/home/alice:rw") - 1] == "--volume"
    assert podman[podman.index("/run/sohocloud-desk/sessions/abc/vnc:/run/sohocloud-desktop:rw") - 1] == "--volume"
    assert podman[podman.index("/run/sohocloud-desk/sessions/abc/machine-id:/etc/machine-id:ro") - 1] == "--volume"
    assert not any(a.startswith(("--privileged", "--cap-add", "-p", "--publish", "--device")) for a in podman)
    # --rootfs is a flag: the tree and the command come last, after every option.
    assert podman[-3:] == ["--rootfs", container.TEMPLATE, container.DESKTOP]
    lan = container.run_argv(container.Session("x" * 16, "bob", 2002, "/h", "/d", policy.Grant(TYPES["small"],
                                                                                                "lan")), 2002)
    assert "--network=slirp4netns:allow_host_loopback=false" in lan and "--property=CPUQuota=100%" in lan
    assert container.stop_argv(s) == ["systemctl", "stop", "desk-abcdefghijklmnop.service"]


# --------------------------------------------------------------------------- audit


def test_audit_events_reach_a_journal_socket_in_its_native_format(tmp_path):
    path = str(tmp_path / "journal.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        audit.send(audit.event_fields("sign-in-refused", "wrong password", person="alice", source="10.44.0.21",
                                      reason="bad password\nsecond line", host=""), path)
        data = server.recv(65536)
    lines = data.split(b"\n")
    assert b"SOHOCLOUD_EVENT=sign-in-refused" in lines and b"SOHOCLOUD_PERSON=alice" in lines
    assert b"PRIORITY=4" in lines and b"SYSLOG_IDENTIFIER=sohocloud-desk" in lines
    assert not any(line.startswith(b"SOHOCLOUD_HOST") for line in lines)  # empty fields are left out
    i = data.index(b"SOHOCLOUD_REASON\n") + len(b"SOHOCLOUD_REASON\n")
    (n,) = struct.unpack("<Q", data[i:i + 8])
    assert data[i + 8:i + 8 + n] == b"bad password\nsecond line"


# --------------------------------------------------------------------------- the broker's decision

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_broker(second_sign_in="take-over", hosts=None, passwords=None):
    events: list[tuple[str, dict]] = []
    people = {"alice": broker.Person("alice", 2001, frozenset({"office"}), SECRET),
              "bob": broker.Person("bob", 2002, frozenset({"office"}), SECRET),
              "eve": broker.Person("eve", 2003, frozenset({"visitors"}), SECRET)}
    pw = passwords or {"alice": "alice-pw", "bob": "bob-pw", "eve": "eve-pw"}
    states = hosts or [placement.HostState("ws1", True, 8 * G, 0, 0), placement.HostState("pc1", True, 8 * G, 0, 0)]
    clock = Clock()
    b = broker.Broker(
        rules=broker.Rules(otp=True, second_sign_in=second_sign_in, host_reserve=G, policy=tuple(RULES),
                           machine_types=TYPES),
        people=people, passwords=[lambda n, p: pw.get(n) == p],
        token_ok=checkers.token_checker(b"k" * 32, set, clock), hosts=lambda: states, clock=clock,
        audit=lambda event, msg, **f: events.append((event, f)))
    return b, clock, events, states


def code(clock, secret=SECRET) -> str:
    return totp.totp(totp.decode_secret(secret), clock())


def sign(name, password="", otp="", token=""):
    return inputs.SignIn(name, password, otp, token)


def test_a_good_sign_in_is_placed_and_audited():
    b, clock, events, _hosts = make_broker()
    placed = b.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.21", seat="pc1")
    assert placed.host == "pc1" and placed.grant.machine.name == "standard" and len(placed.session) >= 32
    assert events == [("sign-in", {"person": "alice", "source": "10.44.0.21", "host": "pc1",
                                   "session": placed.session, "method": "password+otp"})]


@pytest.mark.parametrize("req, message, reason", [
    (lambda c: sign("alice", "wrong", code(c)), "Wrong name or password.", "bad password"),
    (lambda c: sign("mallory", "alice-pw", code(c)), "Wrong name or password.", "unknown name"),
    (lambda c: sign("alice", "alice-pw", ""), "Enter the 6-digit code", "totp missing"),
    (lambda c: sign("alice", "alice-pw", str((int(code(c)) + 1) % 10**6).zfill(6)), "Wrong code.", "bad totp"),
    (lambda c: sign("eve", "eve-pw", code(c)), "does not get a desktop", "not in a desktop group"),
    (lambda c: sign("alice", token="sct1.e30.AAAA"), "That token is not valid", "bad token"),
])
def test_refusals_say_why_to_the_person_and_to_the_log(req, message, reason):
    b, clock, events, _hosts = make_broker()
    with pytest.raises(Refused) as exc:
        b.sign_in(req(clock), "10.44.0.21")
    assert message in exc.value.message and exc.value.reason == reason
    assert events[-1][0] == "sign-in-refused" and events[-1][1]["reason"] == reason
    assert b.sessions == {}


def test_a_totp_code_works_once_across_the_site():
    b, clock, _events, _hosts = make_broker(second_sign_in="take-over")
    c = code(clock)
    b.sign_in(sign("alice", "alice-pw", c), "10.44.0.21")
    clock.now += 5
    with pytest.raises(Refused, match="already used") as exc:
        b.sign_in(sign("alice", "alice-pw", c), "10.44.0.22")  # same code, another PC
    assert exc.value.reason == "totp reused"
    clock.now += 30
    b.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.22")  # the next code is fine


def test_repeated_failures_are_rate_limited_per_person_even_with_the_right_password():
    b, clock, events, _hosts = make_broker()
    for i in range(5):
        with pytest.raises(Refused):
            b.sign_in(sign("alice", f"guess{i}", code(clock)), f"10.44.0.{30 + i}")
    with pytest.raises(Refused, match="Too many failed sign-ins") as exc:
        b.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.21")
    assert exc.value.reason == "rate-limited"
    assert [e for e, _f in events] == ["sign-in-refused"] * 6
    clock.now += 301
    assert b.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.21").host


def test_one_session_per_person_take_over_or_refuse():
    b, clock, _events, _hosts = make_broker(second_sign_in="take-over")
    first = b.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.21")
    clock.now += 30
    second = b.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.22")
    assert second.replaced == first.session and b.sessions["alice"][0] == second.session
    r, clock, _events, _hosts = make_broker(second_sign_in="refuse")
    held = r.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.21")
    clock.now += 30
    with pytest.raises(Refused, match=f"already have a desktop \\(on {held.host}\\)"):
        r.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.22")
    r.ended("alice", held.session, held.host, "sign-out")
    clock.now += 30  # that code was spent: the refusal came after the person proved who they are
    assert r.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.22").replaced is None


def test_two_people_get_two_hosts_and_a_full_site_refuses():
    hosts = [placement.HostState("ws1", True, 4 * G, 0, 0), placement.HostState("pc1", True, 4 * G, 0, 0)]
    b, clock, _events, states = make_broker(hosts=hosts)
    a = b.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.21")
    states[[h.name for h in states].index(a.host)] = placement.HostState(a.host, True, 4 * G, 2 * G, 1)
    bob = b.sign_in(sign("bob", "bob-pw", code(clock)), "10.44.0.22")
    assert {a.host, bob.host} == {"ws1", "pc1"}
    states[:] = [placement.HostState(h.name, True, 4 * G, 2 * G, 1) for h in states]
    b.sessions.clear()
    clock.now += 30
    with pytest.raises(Refused, match="No desktop machine has room"):
        b.sign_in(sign("alice", "alice-pw", code(clock)), "10.44.0.21")


def test_a_token_starts_a_session_without_the_second_factor():
    b, clock, events, _hosts = make_broker()
    text, _tok = tokens.issue(b"k" * 32, "bob", {"session:start"}, exp=int(clock()) + 3600)
    assert b.sign_in(sign("bob", token=text), "10.44.0.40").person.name == "bob"
    assert events[-1][1]["method"] == "token"
    stop_only, _tok = tokens.issue(b"k" * 32, "alice", {"session:stop"}, exp=int(clock()) + 3600)
    with pytest.raises(Refused, match="token is not valid"):
        b.sign_in(sign("alice", token=stop_only), "10.44.0.40")


def test_the_same_code_sent_twice_at_once_signs_in_once():
    b, clock, _events, _hosts = make_broker(second_sign_in="take-over")
    c, barrier, results = code(clock), threading.Barrier(8), []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            results.append(b.sign_in(sign("alice", "alice-pw", c), f"10.44.0.{21 + i}").session)
        except Refused as r:
            results.append(r.reason)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if r in ("totp reused", "rate-limited")]  # failures count towards the limit
    assert len(results) == 8 and len(refused) == 7 and "totp reused" in refused


# --------------------------------------------------------------------------- the WebSocket (RFC 6455)


def client_frame(opcode: int, payload: bytes, final: bool = True, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    n = len(payload)
    head = bytes([(0x80 if final else 0) | opcode])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_websocket_accept_key_matches_rfc6455_example():
    assert wsproxy.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_websocket_messages_are_unmasked_joined_and_pings_answered():
    sent = []
    stream = io.BytesIO(client_frame(wsproxy.OP_PING, b"hi") + client_frame(wsproxy.OP_BINARY, b"RFB ", final=False)
                        + client_frame(wsproxy.OP_CONT, b"003.008\n") + client_frame(wsproxy.OP_CLOSE, b"\x03\xe8"))
    assert wsproxy.messages(stream, sent.append) == b"RFB 003.008\n"
    assert sent == [wsproxy.encode(wsproxy.OP_PONG, b"hi")]
    assert wsproxy.messages(stream, sent.append) == b""  # the close, answered
    assert sent[-1] == wsproxy.encode(wsproxy.OP_CLOSE, b"\x03\xe8")
    assert wsproxy.encode(wsproxy.OP_BINARY, b"x" * 70000)[:4] == bytes([0x82, 127, 0, 0])


@pytest.mark.parametrize("frame, problem", [
    (bytes([0x82, 0x02]) + b"hi", "not masked"),
    (bytes([0x82, 0xFF]) + struct.pack(">Q", (1 << 20) + 1) + b"mask", "larger than"),
    (bytes([0xC2, 0x80]) + b"mask", "reserved bits"),
])
def test_websocket_refuses_frames_a_browser_never_sends(frame, problem):
    with pytest.raises(wsproxy.ProtocolError, match=problem):
        wsproxy.read_frame(io.BytesIO(frame))


@pytest.mark.parametrize("headers, problem", [
    ({"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "8",
      "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}, "version 13"),
    ({"upgrade": "h2c", "connection": "Upgrade"}, "not a WebSocket"),
    ({"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13", "sec-websocket-key": "x"},
     "Sec-WebSocket-Key"),
])
def test_websocket_upgrade_requests_are_checked(headers, problem):
    with pytest.raises(wsproxy.ProtocolError, match=problem):
        wsproxy.upgrade_headers(headers)
