"""The swarm worker's join (online.d/70-cluster) against a fake Docker Engine: a join docker
is still carrying out from an earlier try is waited for, not left and asked for again."""

from __future__ import annotations

import calendar
import importlib.machinery
import importlib.util
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "overlays/cluster-member/usr/lib/sohocloud/online.d/70-cluster"
CLUSTER = {"engine": "swarm", "role": "worker", "node_role": "workstation-host", "join_port": 7443,
           "manager": {"fqdn": "control.example.lan"}}


class FakeEngine:
    """Swarm state as docker reports it: *pending_polls* more /info answers say pending."""

    def __init__(self, state: str, pending_polls: int) -> None:
        self.state, self.pending_polls, self.calls = state, pending_polls, []

    def docker(self, method: str, url: str, body=None, sock: str = "") -> tuple[int, dict]:
        self.calls.append(f"{method} {url}")
        if url == "/info":
            if self.state == "pending":
                if self.pending_polls <= 0:
                    self.state = "active"
                self.pending_polls -= 1
            managers = [{"Addr": "10.44.0.2:2377"}] if self.state == "active" else None
            return 200, {"Swarm": {"LocalNodeState": self.state, "NodeID": "n1", "RemoteManagers": managers}}
        if url.startswith("/swarm/leave"):
            self.state = "inactive"
            return 200, {}
        if url == "/swarm/join":
            self.state, self.pending_polls = "pending", 3
            return 200, {}
        raise AssertionError(url)


def load_script(path: Path, name: str, monkeypatch: pytest.MonkeyPatch):
    """A node-side Python script (no .py suffix) as a module, importing the hooks' helpers."""
    monkeypatch.setenv("SOHOCLOUD_LIB", str(REPO / "firstboot"))
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(mod)
    return mod


@pytest.fixture()
def hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    mod = load_script(HOOK, "cluster_hook_70", monkeypatch)
    monkeypatch.setattr(mod.h, "ROOT", tmp_path)
    clock = [1000.0]
    mod.time = types.SimpleNamespace(monotonic=lambda: clock[0],
                                     sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    asked: list[str] = []
    mod.ask_manager = lambda cluster, method, url, body=None: (
        asked.append(f"{method} {url}") or {"token": "SWMTKN-1-x", "managers": ["10.44.0.2:2377"]})
    mod.asked, mod.clock = asked, clock
    return mod


def test_a_join_still_under_way_is_waited_for(hook, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine("pending", pending_polls=20)
    monkeypatch.setattr(hook.h, "docker", engine.docker)
    hook.h.write(hook.JOIN_STARTED, f"{hook.clock[0] - 200}\n", 0o600)  # an earlier try asked 200 s ago
    hook.swarm_worker(CLUSTER, "10.44.0.10")
    assert not [c for c in engine.calls if c.startswith("POST /swarm")]  # neither left nor joined again
    assert hook.asked == ["POST /v1/label"]


def test_a_join_past_patience_or_from_an_earlier_boot_starts_over(hook, monkeypatch: pytest.MonkeyPatch) -> None:
    for started in (f"{1000.0 - hook.JOIN_PATIENCE_S - 1}\n", None):
        engine = FakeEngine("pending", pending_polls=10**6)
        monkeypatch.setattr(hook.h, "docker", engine.docker)
        hook.asked.clear()
        marker = hook.h.path(hook.JOIN_STARTED)
        marker.unlink(missing_ok=True)
        if started is not None:
            hook.h.write(hook.JOIN_STARTED, started, 0o600)
        hook.clock[0] = 1000.0
        hook.swarm_worker(CLUSTER, "10.44.0.10")
        swarm_calls = [c for c in engine.calls if c.startswith("POST /swarm")]
        assert swarm_calls == ["POST /swarm/leave?force=1", "POST /swarm/join"], started
        assert hook.asked == ["GET /v1/join", "POST /v1/label"]
        assert float(marker.read_text()) == 1000.0  # the new request's time, for the next try


def test_a_join_not_active_within_its_wait_is_left_to_the_next_try(hook, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine("inactive", pending_polls=0)
    monkeypatch.setattr(hook.h, "docker", engine.docker)
    real_join = engine.docker

    def slow_join(method, url, body=None, sock=""):
        r = real_join(method, url, body)
        if url == "/swarm/join":
            engine.pending_polls = 10**6  # docker is slow: still pending after the hook's wait
        return r

    monkeypatch.setattr(hook.h, "docker", slow_join)
    with pytest.raises(SystemExit, match="not active after 180 s"):
        hook.swarm_worker(CLUSTER, "10.44.0.10")
    # The next try, a minute later: it waits for that join instead of leaving it.
    engine.calls.clear()
    engine.pending_polls = 5
    hook.clock[0] += 60
    hook.swarm_worker(CLUSTER, "10.44.0.10")
    assert not [c for c in engine.calls if c.startswith("POST /swarm")]


def test_joind_cleanup_skips_entries_that_never_described_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager's list can hold an entry with no hostname (a join it accepted that the node gave
    up on, seen in a site run: docker node ls shows it with an empty HOSTNAME, status Unknown).
    Reading it must not break the label request after the label was set (the member then retried
    for ever: 'Remote end closed connection without response')."""
    joind = load_script(REPO / "overlays/control/usr/lib/sohocloud/sohocloud-joind", "sohocloud_joind",
                        monkeypatch)
    nodes = [
        {"ID": "new", "Description": {"Hostname": "ws1"}, "Status": {"State": "ready"}},
        {"ID": "half", "Description": {}, "Status": {"State": "unknown"}},
        {"ID": "bare", "Status": {"State": "unknown"}},
        {"ID": "old", "Description": {"Hostname": "ws1"}, "Status": {"State": "down"}},
        {"ID": "other", "Description": {"Hostname": "pc1"}, "Status": {"State": "down"}},
        {"ID": "ws1-up", "Description": {"Hostname": "ws1"}, "Status": {"State": "ready"}},
    ]
    assert joind.stale_entries(nodes, "ws1", "new") == ["old"]
    assert joind.hostname(nodes[1]) is None and joind.hostname(nodes[2]) is None


def test_joind_removes_entries_no_node_ever_described_once_they_are_old(monkeypatch: pytest.MonkeyPatch) -> None:
    """A join the manager accepted and the node gave up on leaves an entry with no hostname, Unknown
    for good (ci14). joind removes it once it is older than any join in progress, never a named
    entry or a ready one."""
    joind = load_script(REPO / "overlays/control/usr/lib/sohocloud/sohocloud-joind", "sohocloud_joind",
                        monkeypatch)
    now = float(calendar.timegm((2026, 12, 7, 15, 33, 20, 0, 0, 0)))
    stamp = lambda age: time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z", time.gmtime(now - age))  # noqa: E731
    nodes = [
        {"ID": "gaveup", "CreatedAt": stamp(3600), "Status": {"State": "unknown"}},
        {"ID": "gaveup2", "CreatedAt": stamp(joind.ORPHAN_AGE + 1), "Description": {}, "Status": {"State": "down"}},
        {"ID": "joining", "CreatedAt": stamp(30), "Status": {"State": "unknown"}},
        {"ID": "undated", "Status": {"State": "unknown"}},
        {"ID": "garbled", "CreatedAt": "yesterday", "Status": {"State": "unknown"}},
        {"ID": "readynameless", "CreatedAt": stamp(3600), "Status": {"State": "ready"}},
        {"ID": "named", "CreatedAt": stamp(3600), "Description": {"Hostname": "pc1"}, "Status": {"State": "down"}},
    ]
    assert joind.orphan_entries(nodes, now) == ["gaveup", "gaveup2"]
    assert joind.created_at({"CreatedAt": "2026-12-07T15:33:20.5Z"}) == now


def test_docker_not_running_is_started_again_and_named(hook, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Engine socket (systemd gave up on docker on a starved guest, seen as a node that never
    settled): the try says so, with the unit's state, and starts docker again for the next try."""
    calls: list[list[str]] = []

    def systemctl(argv, **kw):
        calls.append(argv)
        return types.SimpleNamespace(returncode=3, stdout="failed\n" if argv[1] == "is-active" else "")

    def no_socket(method, url, body=None, sock=""):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(hook.h, "LIVE", True)
    monkeypatch.setattr(hook.h.subprocess, "run", systemctl)
    monkeypatch.setattr(hook.h, "docker", no_socket)
    with pytest.raises(SystemExit, match=r"docker not answering yet \(docker.service failed"):
        hook.swarm_worker(CLUSTER, "10.44.0.10")
    assert [c[1:] for c in calls] == [["is-active", "docker.service"], ["reset-failed", "docker.service"],
                                      ["start", "--no-block", "docker.service"]]
    # A unit still starting is left to finish.
    calls.clear()
    monkeypatch.setattr(hook.h.subprocess, "run", lambda argv, **kw: calls.append(argv) or
                        types.SimpleNamespace(returncode=3, stdout="activating\n"))
    with pytest.raises(SystemExit, match=r"docker.service activating"):
        hook.swarm_worker(CLUSTER, "10.44.0.10")
    assert [c[1:] for c in calls] == [["is-active", "docker.service"]]


def test_sssd_that_keeps_finding_nobody_is_restarted(hook, monkeypatch: pytest.MonkeyPatch) -> None:
    """sssd whose responders failed to register with its backend on a starved boot answers nothing
    until restarted (seen on the emulated NAS in CI: 60-nas-users retried for ever). Each miss asks
    it to go online; every fourth restarts it."""
    calls: list[list[str]] = []
    monkeypatch.setattr(hook.h, "LIVE", True)
    monkeypatch.setattr(hook.h.subprocess, "run", lambda argv, **kw: calls.append(argv) or
                        types.SimpleNamespace(returncode=0, stdout="active\n"))
    for _ in range(hook.h.SSSD_RESTART_EVERY):
        hook.h.nudge_sssd()
    acts = [c[1:] for c in calls if c[1] != "is-active"]
    assert acts == [["kill", "-s", "USR2", "sssd.service"]] * (hook.h.SSSD_RESTART_EVERY - 1) + \
        [["restart", "--no-block", "sssd.service"]]


class FakeNetworks:
    """The Engine's networks and services, for the manager's ingress replacement."""

    def __init__(self, encrypted: bool, services: int = 0, delete_lags: bool = False) -> None:
        self.nets = [{"Id": "i0", "Name": "ingress", "Driver": "overlay", "Ingress": True,
                      "Options": {"encrypted": ""} if encrypted else {"com.docker.network.driver.overlay.vxlanid_list": "4096"}},
                     {"Id": "b0", "Name": "bridge", "Driver": "bridge", "Ingress": False, "Options": {}}]
        self.services, self.delete_lags, self.calls = services, delete_lags, []

    def docker(self, method: str, url: str, body=None, sock: str = "") -> tuple[int, object]:
        self.calls.append(f"{method} {url}")
        if (method, url) == ("GET", "/networks"):
            return 200, self.nets
        if (method, url) == ("GET", "/services"):
            return 200, [{"ID": f"s{i}"} for i in range(self.services)]
        if method == "DELETE" and url.startswith("/networks/"):
            if not self.delete_lags:
                self.nets = [n for n in self.nets if n["Id"] != url.rsplit("/", 1)[1]]
            return 204, None
        if (method, url) == ("POST", "/networks/create"):
            if any(n["Ingress"] for n in self.nets):
                return 409, {"message": "ingress network already present"}
            self.nets.append({"Id": "i1", "Name": body["Name"], "Driver": body["Driver"], "Ingress": body["Ingress"],
                              "Options": body["Options"]})
            return 201, {"Id": "i1"}
        raise AssertionError(f"{method} {url}")


def test_the_swarms_ingress_becomes_encrypted_once(hook, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeNetworks(encrypted=False)
    monkeypatch.setattr(hook.h, "docker", engine.docker)
    hook.encrypt_ingress()
    ingress = [n for n in engine.nets if n["Ingress"]]
    assert len(ingress) == 1 and "encrypted" in ingress[0]["Options"] and ingress[0]["Driver"] == "overlay"
    engine.calls.clear()
    hook.encrypt_ingress()  # the next run of the hook: nothing to do
    assert engine.calls == ["GET /networks"]


def test_an_ingress_services_use_is_left_alone_and_a_slow_removal_is_retried(hook, monkeypatch) -> None:
    busy = FakeNetworks(encrypted=False, services=1)
    monkeypatch.setattr(hook.h, "docker", busy.docker)
    hook.encrypt_ingress()
    assert not [c for c in busy.calls if c.startswith(("DELETE", "POST"))]
    slow = FakeNetworks(encrypted=False, delete_lags=True)
    monkeypatch.setattr(hook.h, "docker", slow.docker)
    with pytest.raises(SystemExit, match="not created yet"):  # the online hook's next round tries again
        hook.encrypt_ingress()
