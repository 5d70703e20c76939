"""builder.cli.main: how a run ends when it is told to stop."""

from __future__ import annotations

import argparse
import os
import signal
import time

import pytest

from builder import cli


def _parser_running(func) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=func)
    return p


def test_sigterm_unwinds_like_ctrl_c_and_a_second_one_does_not_cut_the_cleanup(monkeypatch) -> None:
    steps: list[str] = []

    def verb(args) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
            steps.append("not reached")
            return 0
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. a harness that signals twice
            time.sleep(0.1)
            steps.append("cleaned up")

    monkeypatch.setattr(cli, "parser", lambda: _parser_running(verb))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main([]) == 143
    assert steps == ["cleaned up"]
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


def test_a_handler_not_set_from_python_is_restored_as_the_default(monkeypatch) -> None:
    monkeypatch.setattr(cli, "parser", lambda: _parser_running(lambda args: 0))
    monkeypatch.setattr(cli.signal, "signal", _recording_signal(calls := []))
    assert cli.main([]) == 0
    assert calls[-1] == (signal.SIGTERM, signal.SIG_DFL)


def _recording_signal(calls: list):
    real = signal.signal

    def record(signum, handler):
        calls.append((signum, handler))
        previous = real(signum, handler)
        return None if len(calls) == 1 else previous  # the first call: "not set from Python"
    return record


def test_fleet_sessions_takes_only_a_persons_name_for_the_remote_command(capsys) -> None:
    """`fleet sessions SITE --end NAME`: NAME goes into a command run over SSH, so anything but a
    site person's name is refused by the parser, before any connection."""
    from builder.cli import parser
    args = parser().parse_args(["fleet", "sessions", "office", "--end", "alice"])
    assert (args.site, args.end) == ("office", "alice")
    for bad in ("alice;reboot", "$(id)", "Alice Smith", "-rf"):
        with pytest.raises(SystemExit):
            parser().parse_args(["fleet", "sessions", "office", f"--end={bad}"])
        assert "expected a person's name" in capsys.readouterr().err
