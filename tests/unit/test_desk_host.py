"""A workstation host's side of the desktops, with the outside faked: the PodmanRunner (the
commands it runs, the folders and files it makes), the person's subordinate ids, and the desktop
template (fetched over real HTTP on loopback, checked by sha256; mount faked)."""

from __future__ import annotations

import hashlib
import http.server
import os
import pwd
import sys
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "overlays/desk/usr/lib/sohocloud"))

from sohocloud_desk import agent, container, podman, policy, template  # noqa: E402

STANDARD = policy.MachineType("standard", "1.5", 2 << 30, 512)


# --------------------------------------------------------------------------- subordinate ids


def test_each_person_gets_one_range_above_the_local_accounts(tmp_path):
    subuid = tmp_path / "subuid"
    subuid.write_text("admin:100000:65536\n")
    assert podman.add_subids("alice", subuid) == podman.SUBID_BASE
    assert podman.add_subids("bob", subuid) == podman.SUBID_BASE + 65536
    assert podman.add_subids("alice", subuid) == podman.SUBID_BASE  # once
    assert subuid.read_text() == ("admin:100000:65536\n"
                                  f"alice:{podman.SUBID_BASE}:65536\nbob:{podman.SUBID_BASE + 65536}:65536\n")
    assert oct(subuid.stat().st_mode & 0o777) == "0o644"


def test_concurrent_first_sessions_do_not_tear_the_file(tmp_path):
    subuid = tmp_path / "subuid"
    names = [f"p{i}" for i in range(20)]
    threads = [threading.Thread(target=podman.add_subids, args=(n, subuid)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts = [int(line.split(":")[1]) for line in subuid.read_text().splitlines()]
    assert sorted(line.split(":")[0] for line in subuid.read_text().splitlines()) == sorted(names)
    assert len(set(starts)) == 20 and all(b - a == 65536 for a, b in zip(sorted(starts), sorted(starts)[1:]))


# --------------------------------------------------------------------------- the runner


class FakeSystem:
    """systemd-run "starts" the desktop: the VNC socket appears, as the template's script makes it."""

    def __init__(self, desktop_starts: bool = True) -> None:
        self.calls: list[list[str]] = []
        self.desktop_starts = desktop_starts

    def __call__(self, argv, check=True, timeout=120.0):
        import subprocess
        self.calls.append(argv)
        if argv[0] == "systemd-run" and self.desktop_starts:
            folder = Path(next(a for a in argv if a.startswith("--working-directory=")).split("=", 1)[1])
            (folder / "vnc" / "vnc.sock").touch()
        state = "failed" if argv[:2] == ["systemctl", "is-active"] else ""
        return subprocess.CompletedProcess(argv, 0, state + "\n", "")


def me() -> pwd.struct_passwd:
    return pwd.getpwuid(os.getuid())


def session(tmp_path, uid=None, person=None) -> container.Session:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return container.Session("s" * 24, person or me().pw_name, me().pw_uid if uid is None else uid, str(home),
                             str(tmp_path / "sessions" / ("s" * 24)), policy.Grant(STANDARD, "none"))


def test_a_session_starts_as_the_person_in_its_own_folder_and_stop_leaves_nothing(tmp_path):
    fake, etc = FakeSystem(), tmp_path / "etc"
    etc.mkdir()
    runner = podman.PodmanRunner(template="/t", etc=etc, run=fake, start_timeout=5)
    s = session(tmp_path)
    runner.start(s)
    folder = Path(s.session_dir)
    assert oct(folder.stat().st_mode & 0o777) == "0o700" and oct((folder / "vnc").stat().st_mode & 0o777) == "0o700"
    assert oct(folder.parent.stat().st_mode & 0o777) == "0o711"  # the person passes through, lists nothing
    assert len((folder / "machine-id").read_text().strip()) == 32
    run = fake.calls[0]
    assert run == container.run_argv(s, me().pw_gid, "/t")  # the gid is the directory's
    assert f"{me().pw_name}:{podman.SUBID_BASE}:65536" in (etc / "subuid").read_text()
    assert f"{me().pw_name}:{podman.SUBID_BASE}:65536" in (etc / "subgid").read_text()
    runner.stop(s)
    assert fake.calls[-2] == container.stop_argv(s)
    assert not folder.exists()


def test_a_desktop_that_never_comes_up_is_an_error_naming_why(tmp_path):
    (tmp_path / "etc").mkdir()
    runner = podman.PodmanRunner(template="/t", etc=tmp_path / "etc", run=FakeSystem(desktop_starts=False),
                                 start_timeout=5)
    with pytest.raises(RuntimeError, match="the desktop container stopped"):
        runner.start(session(tmp_path))


def test_a_uid_the_directory_does_not_know_or_names_otherwise_starts_nothing(tmp_path):
    fake = FakeSystem()
    runner = podman.PodmanRunner(template="/t", etc=tmp_path, run=fake)
    unknown = next(u for u in range(59999, 2000, -1) if not _known(u))
    with pytest.raises(RuntimeError, match="not known on this host"):
        runner.start(session(tmp_path, uid=unknown))
    with pytest.raises(RuntimeError, match="not mallory"):
        runner.start(session(tmp_path, person="mallory"))
    assert fake.calls == [] and not (tmp_path / "sessions").exists()


def test_a_missing_nas_home_starts_nothing(tmp_path):
    fake = FakeSystem()
    s = session(tmp_path)
    os.rmdir(s.home)
    with pytest.raises(RuntimeError, match="is not there"):
        podman.PodmanRunner(template="/t", etc=tmp_path, run=fake).start(s)
    assert fake.calls == []


def _known(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def test_a_host_without_its_template_reports_no_room(tmp_path):
    ready = threading.Event()
    a = agent.Agent("control", podman.PodmanRunner(), tmp_path, tmp_path, ready.is_set)
    assert a.report()["memory_total"] == 0
    ready.set()
    assert a.report()["memory_total"] > 0


# --------------------------------------------------------------------------- the template


@pytest.fixture
def served(tmp_path):
    """An HTTP server on loopback with images/desktop.squashfs, as the PXE server serves it."""
    root = tmp_path / "www"
    (root / "images").mkdir(parents=True)
    data = os.urandom(3 << 20)
    (root / "images" / "desktop.squashfs").write_bytes(data)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}/images/desktop.squashfs",
           "sha256": hashlib.sha256(data).hexdigest(), "data": data, "root": root}
    server.shutdown()


class Mounts:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv, check=True, timeout=120.0):
        self.calls.append(argv)


def test_the_template_is_fetched_checked_and_mounted_read_only_once(tmp_path, served):
    file, mounts = tmp_path / "state" / "template.squashfs", Mounts()
    spec = {"url": served["url"], "sha256": served["sha256"]}
    assert template.ensure(spec, file=file, mountpoint=tmp_path / "mnt", run=mounts) is True
    assert file.read_bytes() == served["data"]
    assert mounts.calls == [["mount", "-t", "squashfs", "-o", "ro,nodev,nosuid,loop", str(file), str(tmp_path / "mnt")]]
    # Next boot: the file is there with its sha256: mounted, not fetched again.
    (served["root"] / "images" / "desktop.squashfs").unlink()
    assert template.ensure(spec, file=file, mountpoint=tmp_path / "mnt", run=mounts) is False
    assert len(mounts.calls) == 2


def test_a_template_of_another_sha256_is_refused_and_leaves_nothing(tmp_path, served):
    file = tmp_path / "template.squashfs"
    with pytest.raises(RuntimeError, match="is not the seed's"):
        template.ensure({"url": served["url"], "sha256": "0" * 64}, file=file, mountpoint=tmp_path / "m", run=Mounts())
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]  # no file, no temp file, no marker


def test_the_panel_keeps_trying_until_the_server_answers(tmp_path, served):
    spec = {"url": served["url"], "sha256": served["sha256"]}
    (served["root"] / "images" / "desktop.squashfs").rename(served["root"] / "later")
    waits, said, done = [], [], threading.Event()

    def sleep(s):  # the PXE server comes up during the second wait
        waits.append(s)
        if len(waits) == 2:
            (served["root"] / "later").rename(served["root"] / "images" / "desktop.squashfs")

    template.keep_trying(spec, said.append, done.set, sleep=sleep, file=tmp_path / "t.squashfs",
                         mountpoint=tmp_path / "m", run=Mounts())
    assert waits == [5.0, 10.0] and done.is_set() and "fetched and mounted" in said[-1]


@pytest.mark.parametrize("spec", [None, {"url": "http://10.0.0.1/images/x.squashfs"},
                                  {"url": "http://10.0.0.1/images/x.squashfs;rm", "sha256": "a" * 64},
                                  {"url": "https://evil/images/x.squashfs", "sha256": "a" * 64},
                                  {"url": "http://10.0.0.1/images/x.squashfs", "sha256": "A" * 64}])
def test_a_bad_template_spec_is_refused(spec):
    with pytest.raises(ValueError, match="template: expected"):
        template.check_spec(spec)
