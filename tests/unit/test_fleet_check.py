"""Tier 1: the port scan and HTTP probe of `fleet test` (builder/fleet/checks.py) against real sockets;
the time check's reading of chronyc.

It runs in a throwaway network namespace with only loopback and a few listeners, so
what it reports is exactly what this test opened (nothing else of the host is in there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass

import pytest

from builder.fleet.checks import CheckFailed, http_status, scan_ports, tracking_problem

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns)")


@dataclass
class NetnsProbe:
    """The one FleetProbe method scan_ports uses."""
    netns: str

    def in_netns(self, argv, **kw):
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True, **kw)


@pytest.fixture
def netns():
    name = f"sc-unit-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


LISTENER = """
import socket, sys
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.bind(("127.0.0.2", port))
    s.listen(64)
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def listen_in(netns: str, ports: list[int]) -> subprocess.Popen:
    """A process inside *netns* listening on *ports* until its stdin is closed."""
    p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", LISTENER, *map(str, ports)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    return p


def test_scan_finds_exactly_the_listening_ports_at_each_end_of_the_range(netns):
    ports = [1, 22, 4001, 8000, 8001, 65535]  # batch edges included
    listener = listen_in(netns, ports)
    try:
        # Not 127.0.0.1, the source address: a connect from it to itself on an ephemeral port
        # can meet itself (TCP simultaneous open), which no remote node can do.
        seen = scan_ports(NetnsProbe(netns), ["127.0.0.2", "127.0.0.3"], timeout=300)
    finally:
        listener.stdin.close()
        listener.wait(timeout=30)
    assert seen["127.0.0.2"] == ports
    assert seen["127.0.0.3"] == []  # bound to .2 only: .3 refuses every port


def test_scan_that_cannot_run_is_a_failed_check_not_an_empty_answer(netns):
    with pytest.raises(CheckFailed, match="port scan failed"):
        scan_ports(NetnsProbe(netns), ["not-an-address"], timeout=60)


HTTP_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 403 if self.path.startswith("/seeds/52:54:00:44:00:21/") else 404
        self.send_response(code); self.end_headers()
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.2", 8080), H)
print("ready", flush=True)
s.serve_forever()
"""


def test_http_status_reads_the_servers_answer_and_ignores_the_hosts_proxy(netns, monkeypatch):
    # The site LAN has no proxy: a host's http_proxy must not send the seed request elsewhere.
    monkeypatch.setenv("http_proxy", "http://192.0.2.1:3128")
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", HTTP_SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n"
        probe = NetnsProbe(netns)
        assert http_status(probe, "http://127.0.0.2:8080/seeds/52:54:00:44:00:21/user-data") == 403
        assert http_status(probe, "http://127.0.0.2:8080/seeds/52:54:00:ff:ff:00/user-data") == 404
        assert http_status(probe, "http://127.0.0.3:8080/") == -1  # nothing listens there
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("line,problem", [
    ("0A2C0001,10.44.0.1,11,1796600000.123,-0.000042,0.0001,0.0002,-3.1,0.01,0.2,0.001,0.002,64.1,Normal\n", None),
    ("0A2C0001,10.44.0.1,11,1796600000.123,0.734000,0.0001,0.0002,-3.1,0.01,0.2,0.001,0.002,64.1,Normal", "is +0.734 s off"),
    ("7F7F0101,127.127.1.1,10,1796600000.1,0.0,0,0,0,0,0,0,0,0,Normal", "follows 127.127.1.1"),  # its own clock
    ("00000000,,0,0.0,0.0,0,0,0,0,0,0,0,0,Not synchronised", "follows nothing"),
    ("", "follows nothing"),  # chronyc could not ask chronyd
])
def test_a_nodes_tracking_line_says_whether_it_keeps_the_sites_time(line, problem):
    assert tracking_problem(line, "10.44.0.1") == problem


def test_swarm_members_are_judged_by_name_and_a_nameless_entry_is_no_members():
    from builder.fleet.checks import swarm_status
    out = "control Ready\nnas Ready\n Unknown\nws1 Down\nws1 Ready\npc1 Down\n\n"
    assert swarm_status(out) == {"control": "Ready", "nas": "Ready", "ws1": "Ready", "pc1": "Down"}
