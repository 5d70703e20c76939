"""`sohocloud fleet renew`: the node certificates `fleet build` renewed, installed on the running
nodes over SSH, with no node re-provisioned.

`fleet build` re-issues a node's key and certificate when the certificate ends within the site's
`certificates.renew_before_days`; the node's seed carries the new pair under the same instance-id
(a re-imaged or netbooted node starts with it). A running node gets it here: the admin's SSH, the
pair on stdin (never argv), and the node's own `sohocloud-tls-install` checks it (the site CA's,
this node's, the key's) before it replaces the files and lets the role's services take it up.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..errors import SohoError
from .checks import FleetProbe
from .running import node_up, read_state

log = logging.getLogger("sohocloud.fleet")

INSTALLED = "/etc/sohocloud/tls/node.crt"


def fleet_renew(probe: FleetProbe, only: tuple[str, ...] = ()) -> dict[str, str]:
    """{node: what happened} for each running node (or *only* these): renewed, or already current."""
    state = read_state(probe.paths)
    nodes = [n for n in probe.site.nodes if (not only or n.name in only)]
    for name in only:
        probe.site.node(name)  # a typo fails here
    done: dict[str, str] = {}
    for node in nodes:
        if not node_up(state, node.name):
            done[node.name] = "not running (it starts with the new certificate from its seed)"
            continue
        key, cert = _pair(probe.secrets, node.name)
        installed = probe.ssh(node, f"sudo sha256sum {INSTALLED}", check=False).stdout.split()[:1]
        if installed == [hashlib.sha256(cert).hexdigest()]:
            done[node.name] = "current"
            continue
        r = probe.ssh(node, "sudo /usr/lib/sohocloud/sohocloud-tls-install", check=False, timeout=600,
                      stdin=json.dumps({"cert": cert.decode(), "key": key.decode()}))
        if r.returncode != 0:
            raise SohoError(f"{node.name}: the renewed certificate was not installed: {r.stderr.strip()[-600:]}")
        said = [line.split("installed: ", 1)[1] for line in r.stderr.splitlines() if "installed: " in line]
        done[node.name] = "renewed: " + (said[-1] if said else "installed")
        log.info("fleet %s: %s: %s", probe.site.name, node.name, done[node.name])
    return done


def _pair(secrets: Path, node: str) -> tuple[bytes, bytes]:
    key, cert = secrets / "nodes" / f"{node}.key", secrets / "nodes" / f"{node}.crt"
    if not (key.is_file() and cert.is_file()):
        raise SohoError(f"{secrets}: no key and certificate for {node} (run `sohocloud fleet build` first)")
    return key.read_bytes(), cert.read_bytes()
