"""The one subprocess wrapper: logs the command, raises with stderr on failure; and the check that
the host tools a command needs are installed, before it starts any work."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import SohoError

log = logging.getLogger("sohocloud.run")


class CommandError(RuntimeError):
    """A command exited non-zero; carries the command line and its stderr tail."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-25:])
        super().__init__(f"command failed (exit {returncode}): {shlex.join(self.cmd)}\n{tail}")


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    capture: bool = False,
    check: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run *cmd* (a list, never a shell string).

    stdout is captured only when *capture* is set (otherwise it goes to our
    log at debug level); stderr is always captured so a failure can say why.
    *env* entries are added to the current environment.
    """
    argv = [os.fspath(c) for c in cmd]
    log.debug("run: %s", shlex.join(argv))
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    if isinstance(input, bytes):
        input = input.decode()
    proc = subprocess.run(
        argv,
        input=input,
        env=full_env,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=timeout,
    )
    if not capture and proc.stdout:
        for line in proc.stdout.splitlines()[-50:]:
            log.debug("  %s", line)
    if log.isEnabledFor(logging.DEBUG) and proc.returncode == 0 and proc.stderr:
        for line in proc.stderr.splitlines()[-50:]:  # notes such as the native helpers' "stays emulated"
            log.debug("  stderr: %s", line)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr or proc.stdout or "")
    return proc


def require_tools(tools: Sequence[str]) -> None:
    """Every one of *tools* is on PATH (or in /usr/sbin, /sbin: a user's PATH may lack them)."""
    missing = [t for t in tools if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None]
    if missing:
        raise SohoError(f"missing host tools: {', '.join(missing)} (run `make deps`)")
