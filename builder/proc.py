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
    with subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else None, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=full_env, cwd=cwd, text=True) as child:
        try:
            stdout, stderr = child.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise
        except BaseException as interrupted:  # Ctrl-C, our SIGTERM handler's Terminated
            _let_it_clean_up(child, interrupted)
            raise
    proc = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    if not capture and proc.stdout:
        for line in proc.stdout.splitlines()[-50:]:
            log.debug("  %s", line)
    if log.isEnabledFor(logging.DEBUG) and proc.returncode == 0 and proc.stderr:
        for line in proc.stderr.splitlines()[-50:]:  # notes such as the native helpers' "stays emulated"
            log.debug("  stderr: %s", line)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr or proc.stdout or "")
    return proc


# How long an interrupted command may take to undo its own work (mmdebstrap unmounts its chroot's
# /proc, /sys, /dev and removes its tree) before it is killed.
CLEANUP_GRACE_S = 60


def _let_it_clean_up(child: subprocess.Popen, interrupted: BaseException) -> None:
    """subprocess.run would SIGKILL an interrupted child after 0.25 s: mid-cleanup, it leaves its
    mounts behind. Instead the child gets the same signal (a terminal's Ctrl-C has sent it already;
    a SIGTERM to us alone has not) and CLEANUP_GRACE_S to exit; only then is it killed."""
    if child.poll() is None and not isinstance(interrupted, KeyboardInterrupt):
        child.terminate()
    try:
        child.communicate(timeout=CLEANUP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %d s of the interruption: killed", child.args[0], CLEANUP_GRACE_S)
        child.kill()
        try:  # a grandchild may still hold our pipes open: do not wait for it
            child.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    except BaseException:  # a second Ctrl-C: stop waiting, kill
        child.kill()
        raise


def require_tools(tools: Sequence[str]) -> None:
    """Every one of *tools* is on PATH (or in /usr/sbin, /sbin: a user's PATH may lack them)."""
    missing = [t for t in tools if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None]
    if missing:
        raise SohoError(f"missing host tools: {', '.join(missing)} (run `make deps`)")
