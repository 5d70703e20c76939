"""The desk services put together from their settings: the broker on the node that provides
`desktops`, a panel (with its host's agent) on each workstation host. Side effects at this edge:
the broker's state files, the TLS contexts, the network calls between them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import checkers, https, podman, settings
from .agent import Agent, Runner
from .broker import Broker
from .brokerd import BrokerService, HostCall
from .paneld import BrokerCall, PanelService

BROKER_PORT = 7444
PANEL_PORT = 443

# A sign-in is a chain of calls: the browser waits on its panel, the panel on the broker, the broker
# on the chosen host, the host on podman. Each link waits longer than the one below it may take, so a
# slow start (a busy or emulated host) ends with the host's own answer ("could not be started"),
# never as a caller's timeout ("cannot be reached") while the desktop is in fact coming up.
CALL_TIMEOUT = 20.0
HOST_CALL_TIMEOUTS = {"/v1/start": podman.START_BUDGET + 30, "/v1/stop": podman.STOP_BUDGET + 30}
_STOP = HOST_CALL_TIMEOUTS["/v1/stop"]
BROKER_CALL_TIMEOUTS = {"/v1/sign-in": _STOP + HOST_CALL_TIMEOUTS["/v1/start"] + 30,  # may take a session over
                        "/v1/sign-out": _STOP + 30, "/v1/stop-mine": _STOP + 30}


def write_private(path: Path, data: str) -> None:
    """0600 from the start, whole or not at all (a power cut leaves the old file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except ValueError:
        return default  # a torn file cannot happen (write_private); a hand-edited one resets to the default


def origins(names: list[str], port: int) -> frozenset[str]:
    suffix = "" if port == 443 else f":{port}"
    return frozenset(f"https://{n}{suffix}" for n in names)


def broker_service(section: dict[str, Any], tls: https.TlsFiles, own: str, state: Path,
                   clock: Callable[[], float], audit: Callable[..., None],
                   host_call: HostCall | None = None) -> BrokerService:
    """The broker from its seed section; *state* (0700) keeps what must survive a restart: the TOTP
    steps already used (a code is never accepted twice) and the revoked tokens."""
    htpasswd = state / "htpasswd"
    if "htpasswd" in section["checkers"]:
        write_private(htpasswd, section["checkers"]["htpasswd"]["text"])
    used_file, revoked_file = state / "totp-used.json", state / "revoked.json"

    def revoked() -> set[str]:
        return set(read_json(revoked_file, {}))  # {token id: when it may be forgotten}

    broker = Broker(rules=settings.rules(section), people=settings.people(section),
                    passwords=settings.password_checkers(section, tls.ca, htpasswd),
                    token_ok=checkers.token_checker(section["token_key"].encode(), revoked, clock),
                    hosts=list, clock=clock, audit=audit,
                    totp_used={k: int(v) for k, v in read_json(used_file, {}).items()},
                    save_totp=lambda used: write_private(used_file, json.dumps(used)))
    hosts = {h["name"]: h for h in section["hosts"]}
    if host_call is None:
        ctx = https.client_context(tls)

        def host_call(name: str, method: str, path: str, data: Any) -> tuple[int, Any]:
            return https.call(ctx, hosts[name]["fqdn"], int(hosts[name].get("port", PANEL_PORT)), method, path, data,
                              timeout=HOST_CALL_TIMEOUTS.get(path, CALL_TIMEOUT))

    return BrokerService(broker, hosts, own, host_call)


def panel_service(own: dict[str, str], broker: dict[str, str], tls: https.TlsFiles, runner: Runner,
                  timeouts: dict[str, int], clock: Callable[[], float], log: Callable[[str], None], *,
                  homes: Path, sessions_dir: Path, port: int = PANEL_PORT, broker_call: BrokerCall | None = None,
                  host_address: Callable[[str], tuple[str, int]] = lambda fqdn: (fqdn, PANEL_PORT),
                  novnc: Path | None = None, ready: Callable[[], bool] = lambda: True,
                  audit: Callable[..., None] = lambda *a, **k: None) -> PanelService:
    """This host's panel and agent. *own* and *broker* are {name, fqdn, address} from the seed."""
    ctx = https.client_context(tls)
    if broker_call is None:
        def broker_call(method: str, path: str, data: Any) -> tuple[int, Any]:
            return https.call(ctx, broker["fqdn"], BROKER_PORT, method, path, data,
                              timeout=BROKER_CALL_TIMEOUTS.get(path, CALL_TIMEOUT))

    agent = Agent(broker["name"], runner, homes, sessions_dir, ready, audit)
    return PanelService(own["name"], origins([own["fqdn"], own["name"], own["address"]], port), broker_call, agent,
                        float(timeouts["idle_timeout"]), float(timeouts["disconnect_timeout"]), clock, log, ctx,
                        host_address, **({"novnc": novnc} if novnc else {}))


def heartbeat(panel: PanelService) -> None:
    """Tell the broker what this host runs and which sessions its signed-in browsers hold. Stop what
    the broker no longer knows of (it restarted, or the session was ended while this host was
    unreachable); sign out the browsers whose session ended elsewhere (taken over, the admin)."""
    report = {**panel.agent.report(), "browsers": sorted(b.session for b in list(panel.browsers.values()))}
    status, answer = panel.broker_call("POST", "/v1/host", report)
    if status == 200:
        for sid in answer.get("stop", []):
            panel.agent.stop_session(sid, "the broker no longer knows it")
        panel.forget_sessions(set(answer.get("gone", [])))
