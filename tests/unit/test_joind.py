"""Tier 1: sohocloud-joind's access control, the real daemon (overlays/control) on real TLS.

It runs in a throwaway network namespace (its own loopback, port 7443 free) on a fake root:
the site CA, control's certificate and the members file as firstboot writes them, and a fake
Docker Engine API on the root's run/docker.sock (the outside: the swarm). Clients run in the
namespace too, from their own loopback addresses. Each refusal is checked while a member is
still served.
"""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from builder.fleet.secrets import SiteSecrets
from builder.fleet.sitefile import load_repo_site
from builder.image.config import Repo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns)")

REPO = Path(__file__).resolve().parents[2]
JOIND = REPO / "overlays/control/usr/lib/sohocloud/sohocloud-joind"
MEMBERS = {"engine": "swarm", "address": "127.0.0.1",
           "nodes": {"control": {"cluster": "manager", "role": "control"},
                     "ws1": {"cluster": "worker", "role": "workstation-host"},
                     "nas": {"cluster": "worker", "role": "storage"}}}
SWARM_NODES = {"n1ws1": "ws1", "n2nas": "nas"}  # swarm node id -> its hostname

# A client of joind: prints the HTTP status, or "refused: <why>" when the connection fails.
CLIENT = r"""
import http.client, json, socket, ssl, sys
src, ca, cert, key, method, path, body, length = sys.argv[1:9]
ctx = ssl.create_default_context(cafile=ca)
if cert != "-":
    ctx.load_cert_chain(cert, key)
try:
    raw = socket.create_connection(("127.0.0.1", 7443), timeout=10, source_address=(src, 0))
    s = ctx.wrap_socket(raw, server_hostname="control.example.lan")
    head = f"{method} {path} HTTP/1.1\r\nHost: control\r\nConnection: close\r\n"
    if length != "-":
        head += f"Content-Length: {length}\r\n"
    s.sendall(head.encode("latin-1") + b"\r\n" + body.encode())  # header bytes as HTTP reads them
    r = http.client.HTTPResponse(s)
    r.begin()
    print(r.status, r.read().decode())
except (OSError, ssl.SSLError) as e:
    print("refused:", type(e).__name__, e)
"""

# Idle connections from one address: open N, say how many the server closed at once.
IDLER = r"""
import socket, sys, time
src, n = sys.argv[1], int(sys.argv[2])
conns = [socket.create_connection(("127.0.0.1", 7443), timeout=5, source_address=(src, 0)) for _ in range(n)]
time.sleep(1)
closed = 0
for c in conns:
    c.settimeout(0.2)
    try:
        closed += c.recv(1) == b""
    except socket.timeout:
        pass
    except OSError:
        closed += 1
print(closed, flush=True)
sys.stdin.read()  # hold the others open until the test is done
"""


class FakeDocker(BaseHTTPRequestHandler):
    """The bits of the Engine API joind calls: the swarm's tokens, a node, a node's update."""
    updates: list[tuple[str, dict]] = []

    def log_message(self, *args) -> None:
        pass

    def answer(self, status: int, body) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path == "/swarm":
            return self.answer(200, {"JoinTokens": {"Worker": "SWMTKN-worker", "Manager": "SWMTKN-manager"}})
        if self.path == "/nodes":
            return self.answer(200, [])
        node_id = self.path.removeprefix("/nodes/")
        if node_id in SWARM_NODES:
            return self.answer(200, {"ID": node_id, "Version": {"Index": 7}, "Spec": {},
                                     "Description": {"Hostname": SWARM_NODES[node_id]}})
        self.answer(404, {"message": "no such node"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeDocker.updates.append((self.path, body))
        self.answer(200, {})


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # http.server wants an address pair
        request, _ = super().get_request()
        return request, ("docker", 0)


@pytest.fixture(scope="module")
def joind(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("joind")
    site = load_repo_site(Repo(REPO), "example")
    secrets = SiteSecrets(tmp / "secrets" / site.name)
    other = SiteSecrets(tmp / "other" / site.name)  # another site's CA
    root = tmp / "root"
    tls = root / "etc/sohocloud/tls"
    tls.mkdir(parents=True)
    (tls / "ca.crt").write_bytes(secrets.ca()[1])
    key, cert = secrets.node_tls(site, site.node("control"))
    (tls / "node.key").write_bytes(key)
    (tls / "node.crt").write_bytes(cert)
    (root / "etc/sohocloud/cluster-members.json").write_text(json.dumps(MEMBERS))
    clients = tmp / "clients"
    clients.mkdir()
    for name, store in (("ws1", secrets), ("nas", secrets), ("gw", secrets), ("other-ws1", other)):
        key, cert = store.node_tls(site, site.node(name.removeprefix("other-")))
        (clients / f"{name}.key").write_bytes(key)
        (clients / f"{name}.crt").write_bytes(cert)
    (root / "run").mkdir()
    docker = UnixServer(str(root / "run/docker.sock"), FakeDocker)
    threading.Thread(target=docker.serve_forever, daemon=True).start()

    netns = f"sc-unit-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    env = dict(os.environ, SOHOCLOUD_ROOT=str(root), SOHOCLOUD_LIB=str(REPO / "firstboot"))
    log = tmp / "joind.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(JOIND)], env=env, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield {"netns": netns, "ca": secrets.root / "ca.crt", "clients": clients, "log": log}
    finally:
        proc.terminate()
        proc.wait(10)
        docker.shutdown()
        subprocess.run(["ip", "netns", "del", netns], check=True)


def call(j: dict, who: str | None, method: str = "GET", path: str = "/v1/join", body: str = "",
         length: str | None = None, src: str = "127.0.0.2") -> str:
    cert = str(j["clients"] / f"{who}.crt") if who else "-"
    key = str(j["clients"] / f"{who}.key") if who else "-"
    if length is None:
        length = str(len(body)) if method == "POST" else "-"
    p = subprocess.run(["ip", "netns", "exec", j["netns"], sys.executable, "-c", CLIENT, src, str(j["ca"]),
                        cert, key, method, path, body, length], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def served(j: dict) -> None:
    """A member still gets its join token."""
    answer = call(j, "ws1")
    assert answer.startswith("200 ") and json.loads(answer[4:])["token"] == "SWMTKN-worker", answer


def test_a_member_gets_its_role_s_token(joind):
    served(joind)
    answer = call(joind, "nas")
    assert answer.startswith("200 ") and json.loads(answer[4:])["managers"] == ["127.0.0.1:2377"], answer


@pytest.mark.parametrize("who,why", [
    (None, "refused"),         # no client certificate: the handshake fails
    ("other-ws1", "refused"),  # ws1's name, but from another site's CA
    ("gw", "403 "),            # the site's CA, but not a cluster member
])
def test_a_client_that_is_not_a_member_is_refused(joind, who, why):
    assert call(joind, who).startswith(why)
    served(joind)


def test_a_member_labels_only_itself(joind):
    FakeDocker.updates.clear()
    assert call(joind, "ws1", "POST", "/v1/label", json.dumps({"node_id": "n2nas"})).startswith("403 ")
    assert FakeDocker.updates == []
    assert call(joind, "ws1", "POST", "/v1/label", json.dumps({"node_id": "n1ws1"})).startswith("200 ")
    assert FakeDocker.updates == [("/nodes/n1ws1/update?version=7", {"Labels": {"sohocloud.role": "workstation-host"}})]
    served(joind)


@pytest.mark.parametrize("length", ["-5", "1e3", "99999", " ", "\u00b2"])  # ² is a digit to str.isdigit
def test_a_bad_content_length_is_refused_at_once(joind, length):
    started = time.monotonic()
    assert call(joind, "ws1", "POST", "/v1/label", json.dumps({"node_id": "n1ws1"}), length=length).startswith("400 ")
    assert time.monotonic() - started < 10  # not left reading until the client hangs up
    served(joind)


def test_many_idle_connections_from_one_address_do_not_starve_the_members(joind):
    idler = subprocess.Popen(["ip", "netns", "exec", joind["netns"], sys.executable, "-c", IDLER, "127.0.0.3", "40"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        closed = int(idler.stdout.readline())
        assert closed >= 40 - 8, closed  # beyond its 8, closed at once
        served(joind)  # from another address, while that one holds its 8
    finally:
        idler.stdin.close()
        idler.wait(30)
    assert joind["log"].read_text().count("127.0.0.3: already 8 connections open") == 1  # not 32 lines
