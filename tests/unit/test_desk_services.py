"""The desk services over real HTTPS on loopback: the broker and two workstation hosts' panels, each
with its own certificate from a site CA made here, built from a broker section like the one `fleet
build` writes. A real Chromium signs in at a panel; plain HTTPS clients try every refusal.

What is faked: the container runner (it records the sessions it was told to run; the real one is
podman on a workstation host, tested in the fleet) and the clock (timeouts without waiting).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from builder.fleet.secrets import issue_cert, make_ca

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "overlays/desk/usr/lib/sohocloud"))

from sohocloud_desk import https, podman, service, tokens, totp

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

G = 1 << 30
SECRETS = {"alice": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "bob": "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU",
           "carol": "MFRGGZDFMZTWQ2LKMFRGGZDFMZTWQ2LK"}
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
TOKEN_KEY = "k" * 43


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """The container runner, faked: what it was told to run, and what runs now."""

    def __init__(self) -> None:
        self.started: list = []
        self.stopped: list = []
        self.lock = threading.Lock()

    def start(self, s) -> None:
        with self.lock:
            self.started.append(s)

    def stop(self, s) -> None:
        with self.lock:
            self.stopped.append(s)

    @property
    def running(self) -> set[str]:
        return {s.id for s in self.started} - {s.id for s in self.stopped}


class XvncRunner(Recorder):
    """A session's desktop without the container: a real Xvnc serving the session's VNC socket,
    as the template's sohocloud-desktop starts it (no TCP port, a unix socket in the session's folder)."""

    def __init__(self) -> None:
        super().__init__()
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, s) -> None:
        super().start(s)
        folder = Path(s.session_dir) / "vnc"  # as the container mounts it (container.run_argv)
        folder.mkdir(parents=True, mode=0o700)
        read, write = os.pipe()  # -displayfd: the X server picks a free display and says which
        self.procs[s.id] = subprocess.Popen(
            ["Xvnc", "-displayfd", str(write), "-rfbport", "-1", "-rfbunixpath", str(folder / "vnc.sock"), "-rfbunixmode", "0600",
             "-SecurityTypes", "None", "-nolisten", "tcp", "-geometry", "800x600", "-depth", "24"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(write,))
        os.close(write)
        with os.fdopen(read) as f:
            display = ":" + f.readline().strip()  # the server is up (closing the pipe earlier would SIGPIPE it)
        # A terminal on it, working in the session's "home" (what the person types lands there).
        home = Path(s.home)
        home.mkdir(parents=True, exist_ok=True)
        self.procs[s.id + "-xterm"] = subprocess.Popen(
            ["xterm", "-geometry", "140x50+0+0", "-e", "sh"], cwd=home, env={**os.environ, "DISPLAY": display},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not (folder / "vnc.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, s) -> None:
        super().stop(s)
        for key in (s.id + "-xterm", s.id):
            proc = self.procs.pop(key, None)
            if proc:
                proc.terminate()
                proc.wait(10)


def write_tls(folder: Path, ca: tuple[bytes, bytes], name: str) -> https.TlsFiles:
    folder.mkdir(parents=True)
    key, cert = issue_cert(*ca, name, dns=[f"{name}.office.lan", name, "localhost"], ips=["127.0.0.1"])
    (folder / "ca.crt").write_bytes(ca[1])
    (folder / "node.crt").write_bytes(cert)
    (folder / "node.key").write_bytes(key)
    return https.TlsFiles.under(folder)


def broker_section() -> dict:
    """What builder/fleet/seeds.py writes for the broker (its shape: tests/unit/test_desk_seed.py)."""
    htpasswd = "".join(f"{n}:{crypt.crypt(p, crypt.mksalt(crypt.METHOD_SHA512))}\n" for n, p in PASSWORDS.items())
    return {
        "rules": {"otp": True, "tokens": True, "second_sign_in": "take-over", "host_reserve": G,
                  "idle_timeout": 900, "disconnect_timeout": 120, "token_max_days": 90,
                  "policy": [{"group": "office", "machine": "standard", "network": "lan"}],
                  "machine_types": {"standard": {"cpus": "2", "memory": "2G", "pids": 1024}}},
        "checkers": {"htpasswd": {"text": htpasswd}},
        "people": [{"name": "alice", "uid": 2001, "groups": ["office"], "totp": SECRETS["alice"]},
                   {"name": "bob", "uid": 2002, "groups": ["office"], "totp": SECRETS["bob"]},
                   {"name": "carol", "uid": 2003, "groups": ["visitors"], "totp": SECRETS["carol"]}],
        "token_key": TOKEN_KEY,
        "hosts": [{"name": "ws1", "fqdn": "ws1.office.lan", "address": "127.0.0.1"},
                  {"name": "ws2", "fqdn": "ws2.office.lan", "address": "127.0.0.1"}],
    }


class Desk:
    """A broker and two panels on loopback, serving in threads."""

    def __init__(self, tmp: Path, broker_port: int | None = None, runner=Recorder) -> None:
        self.clock = Clock()
        self.events: list[tuple[str, dict]] = []
        self.ca = make_ca("office test CA")
        self.tls = {n: write_tls(tmp / "tls" / n, self.ca, n) for n in ("control", "ws1", "ws2", "storage")}
        self.servers = []
        self.ports: dict[str, int] = {}
        self.runners = {n: runner() for n in ("ws1", "ws2")}
        # Short: a unix socket's path has at most 107 bytes, and pytest's folders are long.
        self.sessions = Path(tempfile.mkdtemp(prefix="desk-", dir="/tmp"))
        state = tmp / "broker-state"
        state.mkdir(mode=0o700)
        if broker_port:  # a broker of its own (a process): the panels are told where
            self.ports["control"] = broker_port
        else:
            self.broker = service.broker_service(broker_section(), self.tls["control"], "control", state, self.clock,
                                                 lambda event, msg, **f: self.events.append((event, f)),
                                                 host_call=self._host_call)
            self.ports["control"] = self._serve(self.broker, self.tls["control"])
        self.panels = {}
        for n in ("ws1", "ws2"):
            ctx = https.client_context(self.tls[n])

            def broker_call(method, path, data, ctx=ctx):
                return https.call(ctx, "127.0.0.1", self.ports["control"], method, path, data)

            # Bound first (port 0), then the panel knows its origin.
            server = https.serve(lambda req, n=n: self.panels[n](req), "127.0.0.1", 0,
                                 https.server_context(self.tls[n], client_certs=True), print)
            port = server.server_address[1]
            self.panels[n] = service.panel_service(
                {"name": n, "fqdn": f"{n}.office.lan", "address": "127.0.0.1"},
                {"name": "control", "fqdn": "control.office.lan", "address": "127.0.0.1"}, self.tls[n],
                self.runners[n], {"idle_timeout": 900, "disconnect_timeout": 120}, self.clock, print,
                homes=tmp / "home", sessions_dir=self.sessions / n, port=port, broker_call=broker_call,
                host_address=lambda fqdn: ("127.0.0.1", self.ports[fqdn.split(".")[0]]),
                novnc=REPO_ROOT / "overlays/desk/usr/share/sohocloud-desk/novnc")
            self.ports[n] = port
            self._start(server)

    def _serve(self, app, tls) -> int:
        server = https.serve(app, "127.0.0.1", 0, https.server_context(tls, client_certs=True), print)
        self._start(server)
        return server.server_address[1]

    def _start(self, server) -> None:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.servers.append(server)

    def _host_call(self, name, method, path, data):
        return https.call(https.client_context(self.tls["control"]), "127.0.0.1", self.ports[name], method, path, data)

    def beat(self) -> None:
        for p in self.panels.values():
            service.heartbeat(p)

    def code(self, name: str, at: float | None = None) -> str:
        return totp.totp(totp.decode_secret(SECRETS[name]), self.clock() if at is None else at)

    def origin(self, host: str) -> str:
        return f"https://127.0.0.1:{self.ports[host]}"

    def close(self) -> None:
        for r in self.runners.values():
            for s in list(r.started):
                if s.id in r.running:
                    r.stop(s)
        for s in self.servers:
            s.shutdown()
            s.server_close()
        shutil.rmtree(self.sessions, ignore_errors=True)


@pytest.fixture
def desk(tmp_path):
    d = Desk(tmp_path)
    d.beat()  # both hosts report: up, with this machine's RAM
    yield d
    d.close()


def browser_ctx(desk: Desk) -> ssl.SSLContext:
    """A browser on the site LAN: it trusts the site CA, has no client certificate."""
    return ssl.create_default_context(cafile=str(desk.tls["control"].ca))


def post_form(desk: Desk, host: str, fields: dict[str, str], origin: str | None = "same",
              cookie: str | None = None, path: str = "/sign-in") -> http.client.HTTPResponse:
    conn = http.client.HTTPSConnection("127.0.0.1", desk.ports[host], context=browser_ctx(desk), timeout=20)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if origin:
        headers["Origin"] = desk.origin(host) if origin == "same" else origin
    if cookie:
        headers["Cookie"] = cookie
    conn.request("POST", path, body=urllib.parse.urlencode(fields), headers=headers)
    resp = conn.getresponse()
    resp.text = resp.read().decode()  # type: ignore[attr-defined]
    return resp


def sign_in(desk: Desk, host: str, name: str, **over) -> http.client.HTTPResponse:
    fields = {"name": name, "password": PASSWORDS.get(name, "x"), "otp": desk.code(name) if name in SECRETS else "123456"}
    return post_form(desk, host, {**fields, **over})


def cookie_of(resp) -> str:
    return resp.getheader("Set-Cookie").split(";", 1)[0]


# --------------------------------------------------------------------------- signing in with a browser


def spki_pin(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def desk_vnc(tmp_path):
    """The desk with real VNC servers as the sessions' desktops."""
    if not shutil.which("Xvnc"):
        pytest.fail("Xvnc is not installed (make deps installs tigervnc-standalone-server)")
    d = Desk(tmp_path, runner=XvncRunner)
    d.beat()
    yield d
    d.close()


@pytest.fixture
def chromium(tmp_path, request):
    """Debian's headless Chromium through chromium-driver. It accepts exactly the two panels' keys
    (their SPKI pins), nothing else: a browser that trusts the site."""
    desk = request.getfixturevalue("desk_vnc" if "desk_vnc" in request.fixturenames else "desk")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("chromium and chromium-driver are not installed (make deps installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1024,768",
                "--ignore-certificate-errors-spki-list=" + ",".join(spki_pin(desk.tls[n].cert) for n in ("ws1", "ws2"))):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_page(driver, page: str) -> None:
    """Until the browser shows the panel's *page* (a click's navigation takes a moment)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        WebDriverWait(driver, 20, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
            lambda d: d.find_element(By.ID, "panel").get_attribute("data-page") == page)
    except TimeoutException:
        pytest.fail(f"the browser never showed the {page!r} page:\n{driver.page_source[-800:]}")


def test_chromium_signs_in_with_password_and_totp_and_signs_out(desk, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    chromium.get(desk.origin("ws1") + "/")
    wait_page(chromium, "sign in")
    chromium.find_element(By.NAME, "name").send_keys("alice")
    chromium.find_element(By.NAME, "password").send_keys("alice-pw")
    chromium.find_element(By.NAME, "otp").send_keys(desk.code("alice"))
    chromium.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_page(chromium, "desktop")
    assert chromium.find_element(By.ID, "person").text == "alice"
    chromium.save_screenshot(str(tmp_path / "panel-desktop.png"))
    host = chromium.find_element(By.ID, "host").text
    (started,) = desk.runners[host].started
    assert (started.person, started.uid, started.grant.machine.name) == ("alice", 2001, "standard")
    assert [s["person"] for s in json.loads(desk.broker.sessions(None, {}).body)] == ["alice"]
    cookie = chromium.get_cookie("desk")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    chromium.find_element(By.ID, "sign-out").click()
    wait_page(chromium, "sign in")
    assert desk.runners[host].running == set() and desk.broker.live == {}
    assert [e for e, _ in desk.events] == ["sign-in", "session-start", "session-stop"]
    assert desk.events[2][1]["reason"] == "signed out"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name, over, status, message, reason", [
    ("alice", {"password": "wrong"}, 403, "Wrong name or password.", "bad password"),
    ("mallory", {}, 403, "Wrong name or password.", "unknown name"),
    ("alice", {"otp": "wrong"}, 403, "Wrong code.", "bad totp"),
    ("carol", {}, 403, "does not get a desktop", "not in a desktop group"),
])
def test_refusals_start_nothing_say_why_and_are_logged(desk, name, over, status, message, reason):
    if over.get("otp") == "wrong":
        over = {"otp": str((int(desk.code(name)) + 1) % 10**6).zfill(6)}
    r = sign_in(desk, "ws1", name, **over)
    assert r.status == status and message in r.text and "Set-Cookie" not in r.headers
    assert not desk.runners["ws1"].started and not desk.runners["ws2"].started and not desk.broker.live
    assert desk.events[-1] == ("sign-in-refused", {"person": name, "source": "127.0.0.1", "reason": reason})


def test_a_totp_code_is_used_once_site_wide(desk):
    first = sign_in(desk, "ws1", "alice")
    assert first.status == 303
    again = sign_in(desk, "ws2", "alice")  # same code, another PC, within its 30 s
    assert again.status == 403 and "already used" in again.text
    assert desk.events[-1][1]["reason"] == "totp reused"


def test_repeated_failures_are_rate_limited_per_person(desk):
    for _ in range(5):
        assert sign_in(desk, "ws1", "alice", password="guess").status == 403
    r = sign_in(desk, "ws2", "alice")  # the right password, from another PC: still locked
    assert r.status == 429 and "Too many failed sign-ins" in r.text
    assert not desk.broker.live and desk.events[-1][1]["reason"] == "rate-limited"


@pytest.mark.parametrize("body", [
    {"name": "alice)(uid=*", "password": "x"},
    {"name": "$(reboot)", "password": "x"},
    {"name": "alice", "password": "x" * 600},
    {"name": "alice", "password": "x", "role": "admin"},
])
def test_bad_input_is_a_400_with_no_other_effect(desk, body):
    r = post_form(desk, "ws1", body)
    assert r.status == 400 and "Bad request" in r.text
    assert not desk.events and not desk.broker.live and not desk.broker.broker.limiter._fails


def test_non_utf8_and_oversized_requests_are_400(desk):
    conn = http.client.HTTPSConnection("127.0.0.1", desk.ports["ws1"], context=browser_ctx(desk), timeout=20)
    conn.request("POST", "/sign-in", body=b"name=al\xffce&password=x",
                 headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": desk.origin("ws1")})
    r = conn.getresponse()
    assert r.status == 400 and b"not UTF-8" in r.read()
    conn.request("POST", "/sign-in", body=b"x" * 20000,
                 headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": desk.origin("ws1")})
    assert conn.getresponse().status == 413
    assert not desk.events


def test_a_post_from_another_origin_is_refused(desk):
    r = post_form(desk, "ws1", {"name": "alice", "password": "alice-pw", "otp": desk.code("alice")}, origin="https://evil.example")
    assert r.status == 403 and not desk.broker.live
    assert post_form(desk, "ws1", {"name": "alice", "password": "alice-pw"}, origin=None).status == 403


# --------------------------------------------------------------------------- the session's token


def test_the_session_belongs_to_the_browser_cookie_and_sign_out_kills_it(desk):
    r = sign_in(desk, "ws1", "alice")
    cookie = cookie_of(r)
    assert "HttpOnly" in r.getheader("Set-Cookie") and "SameSite=Strict" in r.getheader("Set-Cookie")
    conn = http.client.HTTPSConnection("127.0.0.1", desk.ports["ws1"], context=browser_ctx(desk), timeout=20)
    conn.request("GET", "/desktop", headers={"Cookie": cookie})
    page = conn.getresponse()
    assert page.status == 200 and b'id="person">alice<' in page.read()
    conn.request("GET", "/desktop", headers={"Cookie": "desk=" + "A" * 43})  # a guessed cookie
    assert conn.getresponse().status == 303
    conn.close()
    assert post_form(desk, "ws2", {}, cookie=cookie, path="/sign-out").status == 303  # another panel: not its cookie
    assert desk.broker.live
    out = post_form(desk, "ws1", {}, cookie=cookie, path="/sign-out")
    assert out.status == 303 and not desk.broker.live
    conn = http.client.HTTPSConnection("127.0.0.1", desk.ports["ws1"], context=browser_ctx(desk), timeout=20)
    conn.request("POST", "/alive", body=b"{}", headers={"Cookie": cookie, "Content-Type": "application/json",
                                                       "Origin": desk.origin("ws1")})
    assert conn.getresponse().status == 401  # the old cookie is refused


# --------------------------------------------------------------------------- timeouts


def alive(desk, host, cookie, active):
    conn = http.client.HTTPSConnection("127.0.0.1", desk.ports[host], context=browser_ctx(desk), timeout=20)
    conn.request("POST", "/alive", body=json.dumps({"active": active}).encode(),
                 headers={"Cookie": cookie, "Content-Type": "application/json", "Origin": desk.origin(host)})
    return conn.getresponse().status


def test_a_closed_tab_ends_the_session_after_the_disconnect_timeout(desk):
    cookie = cookie_of(sign_in(desk, "ws1", "alice"))
    desk.clock.now += 100
    assert alive(desk, "ws1", cookie, False) == 200
    desk.clock.now += 110
    desk.panels["ws1"].tick()
    assert desk.broker.live  # 110 s since the last beat: within 120
    desk.clock.now += 11
    desk.panels["ws1"].tick()
    assert not desk.broker.live and desk.events[-1][1]["reason"].startswith("disconnected")
    assert alive(desk, "ws1", cookie, True) == 401


def test_an_unused_desktop_ends_after_the_idle_timeout(desk):
    cookie = cookie_of(sign_in(desk, "ws1", "alice"))
    for _ in range(10):  # the tab is open (beats every 100 s), nobody touches it
        desk.clock.now += 100
        assert alive(desk, "ws1", cookie, False) == 200
        desk.panels["ws1"].tick()
    assert not desk.broker.live and desk.events[-1][1]["reason"] == "idle"


# --------------------------------------------------------------------------- the cluster


def test_two_people_run_on_two_hosts_and_a_down_host_is_skipped(desk):
    assert sign_in(desk, "ws1", "alice").status == 303
    assert sign_in(desk, "ws1", "bob").status == 303  # the same PC: bob's session goes to the other host
    hosts = {s.person: s.host for s in desk.broker.live.values()}
    assert hosts == {"alice": "ws1", "bob": "ws2"}
    assert [e[1]["host"] for e in desk.events if e[0] == "session-start"] == ["ws1", "ws2"]
    # ws2 stops reporting (switched off): new sessions go elsewhere; when it comes back empty,
    # the broker ends the sessions it had.
    desk.clock.now += 60
    service.heartbeat(desk.panels["ws1"])
    states = {h.name: h.up for h in desk.broker.host_states()}
    assert states == {"ws1": True, "ws2": False}
    desk.clock.now += 200
    desk.panels["ws2"].agent.running.clear()  # rebooted: its containers and tmpfs are gone
    service.heartbeat(desk.panels["ws2"])
    assert {s.person for s in desk.broker.live.values()} == {"alice"}
    assert desk.events[-1][1] | {"session": ""} == {"person": "bob", "host": "ws2", "session": "",
                                                    "reason": "host restarted"}


def test_a_session_whose_browser_session_is_lost_is_ended(desk):
    sign_in(desk, "ws1", "bob")
    (s,) = desk.broker.live.values()
    desk.panels["ws1"].browsers.clear()  # the panel restarted: its cookies mean nothing now
    desk.beat()
    assert desk.broker.live  # just started: it may not be in the panel's report yet
    desk.clock.now += 121
    desk.beat()
    assert not desk.broker.live and s.session not in desk.runners[s.host].running
    assert desk.events[-1][1]["reason"] == "its browser session is gone"


def test_a_second_sign_in_elsewhere_takes_the_session_over(desk):
    cookie = cookie_of(sign_in(desk, "ws1", "alice"))
    desk.clock.now += 30  # the next code
    assert sign_in(desk, "ws2", "alice").status == 303
    (first, _second) = [s for r in desk.runners.values() for s in r.started]
    assert len(desk.broker.live) == 1 and (first.id in {s.id for r in desk.runners.values() for s in r.stopped})
    desk.beat()  # ws1's panel hears the session its browser held is gone
    assert alive(desk, "ws1", cookie, True) == 401


def test_a_full_site_refuses_with_a_clear_message(desk):
    for h in desk.broker.seen.values():
        h.memory_total = 4 * G  # room for one standard session each (2G + 1G reserve)
    assert sign_in(desk, "ws1", "alice").status == 303
    assert sign_in(desk, "ws1", "bob").status == 303
    desk.broker.broker.people["carol"] = desk.broker.broker.people["bob"].__class__(
        "carol", 2003, frozenset({"office"}), SECRETS["carol"])
    r = sign_in(desk, "ws1", "carol")
    assert r.status == 403 and "No desktop machine has room" in r.text and len(desk.broker.live) == 2


# --------------------------------------------------------------------------- who may call what


def test_only_site_hosts_reach_the_broker_and_only_the_broker_orders_a_host(desk):
    storage = https.client_context(desk.tls["storage"])  # a site node, not a workstation host
    status, answer = https.call(storage, "127.0.0.1", desk.ports["control"], "POST", "/v1/sign-in",
                                {"name": "alice", "password": "alice-pw", "source": "x", "seat": "storage"})
    assert status == 403 and "workstation hosts" in answer["error"] and not desk.events
    browser = browser_ctx(desk)  # no client certificate at all
    assert https.call(browser, "127.0.0.1", desk.ports["control"], "GET", "/v1/sessions")[0] == 403
    ws2 = https.client_context(desk.tls["ws2"])  # a host ordering another host
    order = {"session": "s" * 32, "person": "alice", "uid": 2001, "network": "lan",
             "machine": {"name": "standard", "cpus": "2", "memory": 2 * G, "pids": 1024}}
    assert https.call(ws2, "127.0.0.1", desk.ports["ws1"], "POST", "/v1/start", order)[0] == 403
    assert not desk.runners["ws1"].started
    other_ca = make_ca("another CA")
    stranger = write_tls(Path(desk.tls["ws1"].ca).parent.parent / "stranger", other_ca, "ws1")
    with pytest.raises(ssl.SSLError):
        https.call(https.client_context(stranger), "127.0.0.1", desk.ports["control"], "POST", "/v1/host", {})


def test_scripts_start_and_stop_with_scoped_tokens(desk):
    start, _ = tokens.issue(TOKEN_KEY.encode(), "alice", {"session:start"}, int(desk.clock()) + 3600)
    stop, _ = tokens.issue(TOKEN_KEY.encode(), "alice", {"session:stop"}, int(desk.clock()) + 3600)
    ctx = browser_ctx(desk)
    assert https.call(ctx, "127.0.0.1", desk.ports["ws1"], "POST", "/api/stop", {"name": "alice", "token": start})[0] == 403
    status, answer = https.call(ctx, "127.0.0.1", desk.ports["ws1"], "POST", "/api/start", {"name": "alice", "token": start})
    assert status == 200 and answer["host"] in ("ws1", "ws2") and len(desk.broker.live) == 1
    assert https.call(ctx, "127.0.0.1", desk.ports["ws1"], "POST", "/api/start", {"name": "bob", "token": start})[0] == 403
    status, answer = https.call(ctx, "127.0.0.1", desk.ports["ws1"], "POST", "/api/stop", {"name": "alice", "token": stop})
    assert status == 200 and not desk.broker.live
    desk.clock.now += 3601
    assert https.call(ctx, "127.0.0.1", desk.ports["ws1"], "POST", "/api/start", {"name": "alice", "token": start})[0] == 403


def test_each_link_of_a_sign_in_waits_longer_than_the_one_below_it(tmp_path, monkeypatch):
    """A slow desktop start (a busy host) must end as the host's own answer: the broker waits on a
    host longer than the host may take, the panel on the broker longer than a take-over (stop on one
    host, start on another) may take. The services' own calls carry these timeouts."""
    host, broker = service.HOST_CALL_TIMEOUTS, service.BROKER_CALL_TIMEOUTS
    assert host["/v1/start"] > podman.START_BUDGET and host["/v1/stop"] > podman.STOP_BUDGET
    assert broker["/v1/sign-in"] > host["/v1/stop"] + host["/v1/start"]
    assert min(broker["/v1/sign-out"], broker["/v1/stop-mine"]) > host["/v1/stop"]
    calls = []
    monkeypatch.setattr(https, "call", lambda ctx, name, port, method, path, data=None, timeout=20:
                        calls.append((name, path, timeout)) or (200, {}))
    ca = make_ca("office test CA")
    tls = {n: write_tls(tmp_path / n, ca, n) for n in ("control", "ws1")}
    (tmp_path / "state").mkdir(mode=0o700)
    brokerd = service.broker_service(broker_section(), tls["control"], "control", tmp_path / "state", Clock(),
                                     lambda *a, **k: None)
    panel = service.panel_service({"name": "ws1", "fqdn": "ws1.office.lan", "address": "127.0.0.1"},
                                  {"name": "control", "fqdn": "control.office.lan", "address": "127.0.0.1"},
                                  tls["ws1"], Recorder(), {"idle_timeout": 900, "disconnect_timeout": 120}, Clock(),
                                  print, homes=tmp_path / "home", sessions_dir=tmp_path / "s")
    for path in ("/v1/start", "/v1/stop"):
        brokerd.host_call("ws1", "POST", path, {})
    for path in ("/v1/sign-in", "/v1/sign-out", "/v1/host"):
        panel.broker_call("POST", path, {})
    assert calls == [("ws1.office.lan", "/v1/start", host["/v1/start"]), ("ws1.office.lan", "/v1/stop", host["/v1/stop"]),
                     ("control.office.lan", "/v1/sign-in", broker["/v1/sign-in"]),
                     ("control.office.lan", "/v1/sign-out", broker["/v1/sign-out"]),
                     ("control.office.lan", "/v1/host", service.CALL_TIMEOUT)]


def test_the_broker_state_keeps_used_codes_across_a_restart(desk, tmp_path):
    assert sign_in(desk, "ws1", "alice").status == 303
    again = service.broker_service(broker_section(), desk.tls["control"], "control", tmp_path / "broker-state",
                                   desk.clock, lambda *a, **k: None, host_call=desk._host_call)
    assert again.broker.totp_used == desk.broker.broker.totp_used != {}
    assert oct((tmp_path / "broker-state" / "totp-used.json").stat().st_mode & 0o777) == "0o600"


# --------------------------------------------------------------------------- the broker as a process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def broker_process(tmp_path):
    """`python3 -m sohocloud_desk broker` as systemd will run it, its settings as firstboot writes
    them, its audit events to a journal socket made here (journald's native protocol)."""
    tls = tmp_path / "tls"
    ca = make_ca("office test CA")
    for n in ("control", "ws1", "ws2", "storage"):
        write_tls(tls / n, ca, n)
    settings = tmp_path / "settings"
    settings.mkdir()
    port, panel_ports = free_port(), {"ws1": free_port(), "ws2": free_port()}
    section = broker_section()
    for h in section["hosts"]:
        h.update(fqdn="127.0.0.1", port=panel_ports[h["name"]])
    (settings / "broker.json").write_text(json.dumps({**section, "name": "control", "fqdn": "127.0.0.1",
                                                       "address": "127.0.0.1"}))
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.settimeout(10)
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'overlays/desk/usr/lib/sohocloud'}:{REPO_ROOT / 'firstboot'}"}
    base = [sys.executable, "-m", "sohocloud_desk", "--settings", str(settings), "--tls", str(tls / "control"),
            "--state", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}", "--journal", str(journal.getsockname())]
    proc = subprocess.Popen([*base, "broker"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60  # a loaded CI host starts Python slowly
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the broker never listened: {proc.communicate()[1][-1500:]}")
            time.sleep(0.1)
    admin = lambda *args: subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=60,
                                          check=False)
    yield {"port": port, "panel_ports": panel_ports, "tls": tls, "journal": journal, "admin": admin, "proc": proc}
    proc.terminate()
    proc.wait(10)
    journal.close()


def journal_events(journal: socket.socket, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        data = journal.recv(65536)
        out.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))
    return out


def test_the_broker_process_places_audits_and_obeys_the_admin(broker_process, tmp_path):
    bp = broker_process
    desk = Desk.__new__(Desk)  # the panels only, in this process, on the ports the broker was told
    desk.clock, desk.events, desk.servers, desk.ports = Clock(), [], [], {"control": bp["port"]}
    desk.clock.now = time.time()  # the broker's clock is the real one
    desk.tls = {n: https.TlsFiles.under(bp["tls"] / n) for n in ("control", "ws1", "ws2")}
    desk.runners, desk.panels = {n: Recorder() for n in ("ws1", "ws2")}, {}
    desk.sessions = Path(tempfile.mkdtemp(prefix="desk-", dir="/tmp"))
    for n in ("ws1", "ws2"):
        ctx = https.client_context(desk.tls[n])
        server = https.serve(lambda req, n=n: desk.panels[n](req), "127.0.0.1", bp["panel_ports"][n],
                             https.server_context(desk.tls[n], client_certs=True), print)
        desk.panels[n] = service.panel_service(
            {"name": n, "fqdn": "127.0.0.1", "address": "127.0.0.1"}, {"name": "control", "fqdn": "127.0.0.1"},
            desk.tls[n], desk.runners[n], {"idle_timeout": 900, "disconnect_timeout": 120}, desk.clock, print,
            homes=tmp_path / "home", sessions_dir=desk.sessions / n, port=bp["panel_ports"][n],
            broker_call=lambda m, p, d, ctx=ctx: https.call(ctx, "127.0.0.1", bp["port"], m, p, d))
        desk.ports[n] = bp["panel_ports"][n]
        desk._start(server)
    try:
        desk.beat()
        assert sign_in(desk, "ws2", "alice", password="wrong").status == 403
        assert sign_in(desk, "ws2", "alice").status == 303
        events = journal_events(bp["journal"], 3)
        assert [e["SOHOCLOUD_EVENT"] for e in events] == ["sign-in-refused", "sign-in", "session-start"]
        assert events[0]["SOHOCLOUD_REASON"] == "bad password" and events[0]["PRIORITY"] == "4"
        assert events[2]["SOHOCLOUD_HOST"] == "ws2" and events[2]["SOHOCLOUD_PERSON"] == "alice"
        assert not any("alice-pw" in v or desk.code("alice") in v for e in events for v in e.values())
        listed = bp["admin"]("sessions")
        assert listed.returncode == 0 and re.search(r"(?m)^alice\s+ws2\s+standard\s", listed.stdout), listed
        ended = bp["admin"]("end", "alice")
        assert ended.returncode == 0 and "ended 1 session(s) of alice" in ended.stdout, ended
        assert [s.person for s in desk.runners["ws2"].stopped] == ["alice"]
        assert journal_events(bp["journal"], 1)[0]["SOHOCLOUD_REASON"] == "ended by the admin"
        # A script token: issued by the admin, printed once (its id to stderr), revoked by id.
        issued = bp["admin"]("token", "alice", "--scope", "start", "--days", "7")
        assert issued.returncode == 0, issued.stderr
        token, token_id = issued.stdout.strip(), re.search(r"token id (\S+)", issued.stderr).group(1)
        ctx = browser_ctx(desk)
        start = {"name": "alice", "token": token}
        assert https.call(ctx, "127.0.0.1", desk.ports["ws1"], "POST", "/api/start", start)[0] == 200
        assert bp["admin"]("end", "alice").returncode == 0
        assert bp["admin"]("revoke", token_id).returncode == 0
        status, answer = https.call(ctx, "127.0.0.1", desk.ports["ws1"], "POST", "/api/start", start)
        assert status == 403 and "not valid" in answer["message"]
        too_long = bp["admin"]("token", "alice", "--days", "91")
        assert too_long.returncode != 0 and "max_days" in too_long.stderr
        assert bp["admin"]("token", "carol").returncode != 0  # no desktop for carol: no token either
    finally:
        desk.close()


# --------------------------------------------------------------------------- the desktop in the page

# Where the boot tests keep their artefacts too (tests/boot/bootkit.py): CI keeps the folder.
LOGS = Path(os.environ.get("SOHOCLOUD_TEST_ARTIFACTS", REPO_ROOT / "out" / "test-logs"))


def sign_in_with(chromium, desk, host: str, name: str) -> None:
    from selenium.webdriver.common.by import By
    chromium.get(desk.origin(host) + "/")
    wait_page(chromium, "sign in")
    chromium.find_element(By.NAME, "name").send_keys(name)
    chromium.find_element(By.NAME, "password").send_keys(PASSWORDS[name])
    chromium.find_element(By.NAME, "otp").send_keys(desk.code(name))
    chromium.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_page(chromium, "desktop")


def wait_connected(chromium) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        WebDriverWait(chromium, 30).until(
            lambda d: d.find_element(By.ID, "screen").get_attribute("data-state") == "connected")
    except TimeoutException:
        logs = chromium.get_log("browser") if hasattr(chromium, "get_log") else []
        pytest.fail(f"noVNC never connected: {chromium.find_element(By.ID, 'screen').get_attribute('data-state')}"
                    f" {logs[-5:]}")


def type_into(chromium, canvas, text: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(chromium).move_to_element_with_offset(canvas, 0, 0).click().perform()  # focus (the xterm's corner)
    for ch in text:  # one key at a time: noVNC sends each as a key event
        ActionChains(chromium).send_keys(ch).perform()


def wait_for(check, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(message)
        time.sleep(0.2)


def test_the_desktop_shows_in_the_same_tab_through_the_panels_origin(desk_vnc, chromium):
    """alice at ws1 gets her desktop on ws1 (the VNC socket there); bob at ws1 gets his on ws2,
    carried to his browser through ws1's origin by ws2's panel. No VNC port anywhere."""
    from selenium.webdriver.common.by import By
    desk = desk_vnc
    sign_in_with(chromium, desk, "ws1", "alice")
    wait_connected(chromium)
    assert chromium.find_element(By.ID, "host").text == "ws1"
    canvas = chromium.find_element(By.CSS_SELECTOR, "#screen canvas")
    assert (canvas.size["width"], canvas.size["height"]) != (0, 0)
    # Keys typed into the page reach the terminal on the desktop: through noVNC, the WebSocket,
    # the panel and the VNC socket.
    typed = desk.sessions.parent / f"typed-{os.getpid()}"
    type_into(chromium, canvas, f"echo through-the-panel > {typed}\n")
    wait_for(typed.exists, 20, f"{typed} never appeared: the keys did not reach the desktop")
    assert typed.read_text() == "through-the-panel\n"
    typed.unlink()
    LOGS.mkdir(parents=True, exist_ok=True)
    chromium.save_screenshot(str(LOGS / "desk-novnc-local.png"))
    chromium.find_element(By.ID, "sign-out").click()
    wait_page(chromium, "sign in")
    # alice again (a new code), so that ws1 is busy, then bob, who lands on ws2.
    desk.clock.now += 30
    post_form(desk, "ws1", {"name": "alice", "password": "alice-pw", "otp": desk.code("alice")})
    sign_in_with(chromium, desk, "ws1", "bob")
    wait_connected(chromium)
    assert chromium.find_element(By.ID, "host").text == "ws2"
    typed = desk.sessions.parent / f"typed-remote-{os.getpid()}"
    type_into(chromium, chromium.find_element(By.CSS_SELECTOR, "#screen canvas"), f"echo via-ws2 > {typed}\n")
    wait_for(typed.exists, 20, f"{typed} never appeared: the keys did not reach the desktop on ws2")
    assert typed.read_text() == "via-ws2\n"
    typed.unlink()
    chromium.save_screenshot(str(LOGS / "desk-novnc-remote.png"))
    listening = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
    assert "Xvnc" not in listening  # the VNC servers listen on unix sockets only


def ws_upgrade(desk, host, cookie=None, origin="same") -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", desk.ports[host], context=browser_ctx(desk), timeout=20)
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()}
    if origin:
        headers["Origin"] = desk.origin(host) if origin == "same" else origin
    if cookie:
        headers["Cookie"] = cookie
    conn.request("GET", "/vnc", headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def test_the_desktop_stream_needs_the_signed_in_browser_and_the_seat(desk_vnc):
    desk = desk_vnc
    cookie = cookie_of(sign_in(desk, "ws1", "alice"))
    assert ws_upgrade(desk, "ws1", cookie) == 101
    assert ws_upgrade(desk, "ws1") == 401  # no cookie
    assert ws_upgrade(desk, "ws1", "desk=" + "A" * 43) == 401  # a guessed one
    assert ws_upgrade(desk, "ws1", cookie, origin="https://evil.example") == 403  # cross-site WebSocket
    assert ws_upgrade(desk, "ws2", cookie) == 401  # the cookie belongs to ws1's panel
    (s,) = desk.broker.live.values()
    # Another node asks the session's host for the stream: only the seat may.
    for node in ("ws2", "storage"):
        with pytest.raises(OSError, match="403"):
            https.open_stream(https.client_context(desk.tls[node]), "127.0.0.1", desk.ports[s.host],
                              f"/v1/vnc?session={s.session}")
    seat = https.open_stream(https.client_context(desk.tls["ws1"]), "127.0.0.1", desk.ports[s.host],
                             f"/v1/vnc?session={s.session}")
    assert seat.recv(12) == b"RFB 003.008\n"  # the VNC server's greeting, through the host's panel
    seat.close()
