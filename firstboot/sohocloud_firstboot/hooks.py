"""Role hooks: the seed's role settings for them, then each hook, by phase.

firstboot.d hooks run before networkd/sshd/role services start (configuration
files); online.d hooks run once the node is on the LAN (cluster join, directory
lookups): in rounds, each pending hook once per round, with backoff between rounds,
until each has succeeded. A try that runs longer than ONLINE_HOOK_TIMEOUT_S is stuck:
its whole process group is killed and it is tried again next round, so one stuck or
failing hook never holds up the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .context import RUN_DIR, SEED_JSON, StepError, info, warn
from .files import write_atomic

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see main.py)
if TYPE_CHECKING:
    from .context import Ctx
    from .seed import Seed

HOOK_DIR = "usr/lib/sohocloud/firstboot.d"
ONLINE_HOOK_DIR = "usr/lib/sohocloud/online.d"
ONLINE_BACKOFF_S = (2, 4, 8, 15, 30)
ONLINE_HOOK_TIMEOUT_S = 600  # one try of an online hook (70-cluster's own waits are shorter)
TIMED_OUT = 124  # the exit code timeout(1) gives a command it stopped
# A firstboot.d hook whose first line is this runs in a fork of firstboot (see run_hook).
PYTHON_SHEBANG = b"#!/usr/bin/python3\n"


def write_seed_json(ctx: Ctx, seed: Seed) -> Path | None:
    block = (seed.user or {}).get("sohocloud") or {}
    if not isinstance(block, dict):
        raise StepError("user-data: 'sohocloud' must be a mapping")
    run_dir = ctx.path(RUN_DIR)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(run_dir, 0o700)
    p = ctx.path(SEED_JSON)
    write_atomic(p, json.dumps(block, sort_keys=True, default=str).encode(), 0o600)
    info(f"role settings: {len(block)} key(s) in /{SEED_JSON}")
    return p


def list_hooks(ctx: Ctx, hook_dir: str = HOOK_DIR) -> list[Path]:
    d = ctx.path(hook_dir)
    if not d.is_dir():
        return []
    return sorted(
        (p for p in d.iterdir()
         if not p.name.startswith(".") and p.is_file() and os.access(p, os.X_OK)),
        key=lambda p: p.name,
    )


def hooks_allowed(ctx: Ctx, hooks: list[Path]) -> bool:
    if not hooks:
        info("role hooks: none installed")
        return False
    if not ctx.system and os.environ.get("SOHOCLOUD_RUN_HOOKS") != "1":
        info(f"role hooks: {len(hooks)} skipped (--no-system)")
        return False
    return True


def hook_env(ctx: Ctx, instance_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SOHOCLOUD_ROOT=str(ctx.root),
        SOHOCLOUD_SEED_JSON=str(ctx.path(SEED_JSON)),
        SOHOCLOUD_INSTANCE_ID=instance_id,
        SOHOCLOUD_LIB=str(ctx.path("usr/lib/sohocloud")),
    )
    return env


def run_hook(ctx: Ctx, hook: Path, env: dict[str, str], *, fork: bool = True, timeout: float | None = None) -> int:
    """Run one hook as its own process: argv [hook], *env*, cwd the root, stdin /dev/null.

    A hook is any executable. With *fork*, a Python one (first line exactly
    PYTHON_SHEBANG) is run in a fork of this process instead of a fresh interpreter:
    that skips the interpreter's start-up (exec, site, the stdlib's first imports),
    about half a second a hook under emulation, on the path to SSH. The child gets
    what an exec would give it; its exit code is the script's.
    """
    python = False
    if fork:
        try:
            with open(hook, "rb") as f:
                python = f.readline() == PYTHON_SHEBANG
        except OSError:
            pass
    if not python:
        return _run_hook_process(ctx, hook, env, timeout)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_python_hook_here(hook, env, str(ctx.root))  # never returns
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _run_hook_process(ctx: Ctx, hook: Path, env: dict[str, str], timeout: float | None) -> int:
    """The hook in a session of its own: past *timeout*, it and everything it started are killed."""
    proc = subprocess.Popen([str(hook)], env=env, cwd=str(ctx.root), stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        warn(f"hook {hook.name}: still running after {timeout:.0f} s: stopped (with what it started)")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return TIMED_OUT


def _run_python_hook_here(hook: Path, env: dict[str, str], cwd: str) -> None:
    """In the forked child: become `python3 HOOK` and exit with its code."""
    code = 1
    try:
        # lazy: only the forked child of a Python hook runs a file as __main__
        import runpy

        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the child's stdin until it exits)
        sys.argv = [str(hook)]
        # As for a script: its own folder first, then the interpreter's path (not the
        # folder python3 put in front for the launcher: the one holding this package).
        here = str(Path(__file__).resolve().parents[1])
        sys.path[:] = [str(hook.parent)] + [p for p in sys.path if p != here]
        runpy.run_path(str(hook), run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): the interpreter prints it and exits 1
            print(e.code, file=sys.stderr)
    except BaseException:
        # lazy: a traceback is printed only when a forked hook raises
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_hooks(ctx: Ctx, instance_id: str) -> None:
    hooks = list_hooks(ctx)
    if not hooks_allowed(ctx, hooks):
        return
    env = hook_env(ctx, instance_id)
    for h in hooks:
        info(f"role hook {h.name}: running")
        rc = run_hook(ctx, h, env)
        if rc != 0:
            raise StepError(f"role hook {h.name} failed (exit {rc}); firstboot will run again next boot")
        info(f"role hook {h.name}: ok")


def backoff(seconds: float) -> None:
    time.sleep(seconds)


def run_online_hooks(ctx: Ctx, instance_id: str) -> None:
    """Rounds over the pending online hooks, backing off between rounds, until each has succeeded
    (what a hook needs, e.g. the cluster manager, may not be up yet). Within a round the hooks run
    in order, and one that fails or is stopped (ONLINE_HOOK_TIMEOUT_S) does not keep the next from
    its try; a hook that needs an earlier one fails until that one is done, like any unmet need."""
    hooks = list_hooks(ctx, ONLINE_HOOK_DIR)
    if not hooks_allowed(ctx, hooks):
        return
    env = hook_env(ctx, instance_id)
    pending, rounds = hooks, 0
    while True:
        failed = []
        for h in pending:
            info(f"online hook {h.name}: running" + (f" (try {rounds + 1})" if rounds else ""))
            # A fresh process each try, never a fork: the online phase is off the path to
            # SSH (nothing to save), and a try minutes later must start from the system as
            # it is then, not from a copy of this long-lived process.
            rc = run_hook(ctx, h, env, fork=False, timeout=ONLINE_HOOK_TIMEOUT_S)
            if rc == 0:
                info(f"online hook {h.name}: ok")
            else:
                warn(f"online hook {h.name}: not yet (exit {rc})")
                failed.append(h)
        if not failed:
            return
        wait = ONLINE_BACKOFF_S[min(rounds, len(ONLINE_BACKOFF_S) - 1)]
        warn(f"online hooks not done yet: {', '.join(h.name for h in failed)}; trying again in {wait} s")
        rounds += 1
        backoff(wait)
        pending = failed
