"""The subprocess wrapper: failures carry stderr; an interrupted command gets to clean up."""

import os
import signal
import time

import pytest

from builder import proc
from builder.proc import CommandError, run


def test_a_failure_carries_the_commands_stderr():
    with pytest.raises(CommandError) as e:
        run(["sh", "-c", "echo why >&2; exit 3"])
    assert e.value.returncode == 3 and "why" in str(e.value)


class _Stop(BaseException):
    """Stands for our SIGTERM handler's Terminated."""


@pytest.mark.parametrize("how", ["terminated", "ctrl-c"])
def test_an_interrupted_command_finishes_its_cleanup_before_we_go_on(tmp_path, how):
    """mmdebstrap unmounts its chroot when signalled; subprocess.run would SIGKILL it 0.25 s later,
    mid-cleanup. run() passes the signal on (a terminal's Ctrl-C reaches the child itself) and waits.
    The interruption comes once the shell has set its trap (it says so in *ready*): on a loaded host a
    fixed 0.5 s was sometimes before the trap (CI's run of 1eda6f5), and the shell died untidily."""
    done, ready = tmp_path / "cleaned-up", tmp_path / "ready"
    script = f"sleep 30 & trap 'kill $!; sleep 1; touch {done}; exit 1' TERM INT; echo $$ > {ready}; wait"

    def wait_ready() -> int:
        deadline = time.monotonic() + 20
        while not ready.exists() or not ready.read_text().strip():
            assert time.monotonic() < deadline, "the shell never set its trap"
            time.sleep(0.02)
        return int(ready.read_text())

    if how == "terminated":
        def stop(*_):
            wait_ready()
            raise _Stop()
        expected = _Stop
    else:  # the terminal sends SIGINT to the whole group: here the child gets its own
        def stop(*_):
            os.kill(wait_ready(), signal.SIGINT)
            raise KeyboardInterrupt()
        expected = KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        with pytest.raises(expected):
            run(["sh", "-c", script])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert done.exists(), "the command was killed before its cleanup ran"
    assert time.monotonic() - t0 < proc.CLEANUP_GRACE_S + 20


def test_a_command_that_ignores_the_interruption_is_killed_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(proc, "CLEANUP_GRACE_S", 1)
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Stop()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        t0 = time.monotonic()
        with pytest.raises(_Stop):
            run(["sh", "-c", "trap '' TERM INT; exec sleep 30"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - t0 < 10
