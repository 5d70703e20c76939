"""`sohocloud fleet audit`: a Lynis audit of each running node, held to its role's profile.

The admin's Lynis (this host's package) goes to the node over SSH for the audit only: it is not part of
any image. It runs as root inside the admin's SSH session (Lynis scores sshd only when an sshd process
is running, and with socket-activated sshd that is the session's own). The report comes back on stdout;
the node keeps nothing.

A node passes when its hardening index reaches its profile's `audit_min_index`, Lynis warns of
nothing, and each Lynis suggestion is either acted on (it no longer appears) or answered in the
profile's `audit_answers` with a reason.
"""

from __future__ import annotations

import io
import logging
import shlex
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SohoError
from ..image.s1_resolve import resolve
from ..image.config import Repo
from .checks import FleetProbe
from .running import node_up, read_state

log = logging.getLogger("sohocloud.fleet")

LYNIS = Path("/usr/sbin/lynis")
LYNIS_SHARE = Path("/usr/share/lynis")
LYNIS_ETC = Path("/etc/lynis")
AUDIT_TIMEOUT_S = 3 * 3600  # a real node: minutes; an emulated one beside a busy fleet: 30-60 min


@dataclass(frozen=True)
class NodeAudit:
    node: str
    role: str
    index: int
    minimum: int
    warnings: tuple[tuple[str, str], ...]
    suggestions: tuple[tuple[str, str], ...]  # (test id, text), as Lynis gave them
    answers: dict[str, str]  # the profile's audit_answers: test id -> reason

    @property
    def unanswered(self) -> tuple[tuple[str, str], ...]:
        return tuple(s for s in self.suggestions if s[0] not in self.answers)

    @property
    def answered(self) -> dict[str, str]:
        """The answers that apply here (a suggestion Lynis made), with their reasons."""
        seen = {tid for tid, _ in self.suggestions}
        return {tid: why for tid, why in self.answers.items() if tid in seen}

    @property
    def passed(self) -> bool:
        return self.index >= self.minimum and not self.warnings and not self.unanswered

    def lines(self) -> list[str]:
        out = [f"{self.node} ({self.role}): hardening index {self.index} (at least {self.minimum}), "
               f"{len(self.warnings)} warnings, {len(self.suggestions)} suggestions, "
               f"{len(self.unanswered)} unanswered"]
        out += [f"  WARNING {tid}: {text}" for tid, text in self.warnings]
        out += [f"  UNANSWERED {tid}: {text}" for tid, text in self.unanswered]
        out += [f"  answered {tid}: {why}" for tid, why in sorted(self.answered.items())]
        return out


def lynis_bundle() -> bytes:
    """This host's Lynis as a tar (owned by root, as Lynis insists), laid out to run from its folder."""
    if not LYNIS.is_file() or not (LYNIS_SHARE / "include").is_dir():
        raise SohoError("fleet audit: Lynis is not installed on this host (run `make deps`, or apt-get install lynis)")
    buf = io.BytesIO()

    def root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode &= 0o750 if info.isdir() or info.name == "lynis" else 0o640
        return info
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(LYNIS, "lynis", filter=root_owned)
        tar.add(LYNIS_SHARE / "include", "include", filter=root_owned)
        tar.add(LYNIS_SHARE / "db", "db", filter=root_owned)
        tar.add(LYNIS_ETC / "default.prf", "default.prf", filter=root_owned)
        if (LYNIS_ETC / "plugins").is_dir():
            tar.add(LYNIS_ETC / "plugins", "plugins", filter=root_owned)
        # An audit changes nothing on the node: no `apt-get update` of its package lists.
        custom = tarfile.TarInfo("custom.prf")
        text = CUSTOM_PROFILE.encode()
        custom.size, custom.mode = len(text), 0o640
        tar.addfile(root_owned(custom), io.BytesIO(text))
    return buf.getvalue()


CUSTOM_PROFILE = "# sohocloud fleet audit\nrefresh-repositories=no\n"


# Runs as root on the node: unpack into a private folder, audit, print the report, leave nothing.
REMOTE = ("set -e; d=$(mktemp -d /run/sohocloud-audit.XXXXXX); trap 'rm -rf \"$d\"' EXIT; "
          "trap 'exit 129' HUP; trap 'exit 143' TERM; "
          "tar -xz -C \"$d\"; cd \"$d\"; "
          "./lynis audit system --quick --no-colors --report-file \"$d/report.dat\" "
          "--logfile \"$d/lynis.log\" >/dev/null 2>\"$d/stderr\" || { tail -20 \"$d/stderr\" >&2; exit 1; }; "
          "cat \"$d/report.dat\"")


def parse_report(text: str) -> dict[str, list[str]]:
    """Lynis's report.dat: `key=value` and `key[]=value` lines -> key -> values."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" not in line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.removesuffix("[]"), []).append(value)
    return out


def _findings(values: list[str]) -> tuple[tuple[str, str], ...]:
    """`ID|text|details|solution|` entries -> (ID, "text (details)")."""
    found = []
    for v in values:
        parts = v.split("|")
        text = parts[1] if len(parts) > 1 else ""
        if len(parts) > 2 and parts[2] not in ("", "-"):
            text += f" ({parts[2]})"
        found.append((parts[0], text))
    return tuple(found)


def audit_node(probe: FleetProbe, name: str, bundle: bytes, repo: Repo) -> NodeAudit:
    node = probe.site.node(name)
    rec = probe.node_record(node)
    manifest = probe.manifest(node)
    profile = resolve(repo, rec.role, target=manifest["target"], arch=manifest["arch"],
                      distro=manifest.get("distro", "debian")).profile
    r = probe.ssh(node, f"sudo sh -c {shlex.quote(REMOTE)}", stdin=bundle, timeout=AUDIT_TIMEOUT_S, check=False)
    if r.returncode != 0:
        raise SohoError(f"fleet audit: Lynis failed on {name}: {r.stderr.decode(errors='replace').strip()[-800:]}")
    report = parse_report(r.stdout.decode(errors="replace"))
    if "hardening_index" not in report:
        raise SohoError(f"fleet audit: {name}: the Lynis report has no hardening index")
    return NodeAudit(name, rec.role, int(report["hardening_index"][0]), profile.audit_min_index,
                     _findings(report.get("warning", [])), _findings(report.get("suggestion", [])),
                     {k: a.reason for k, a in profile.audit_answers.items()})


def fleet_audit(probe: FleetProbe, only: tuple[str, ...] = (), repo: Repo | None = None) -> list[NodeAudit]:
    """Each running node (or *only* these), audited in turn."""
    for name in only:
        probe.site.node(name)  # a typo fails here, before any audit
    state = read_state(probe.paths)
    names = [n.name for n in probe.site.nodes if (not only or n.name in only) and node_up(state, n.name)]
    if not names:
        raise SohoError(f"fleet audit: no running node of site {probe.site.name} to audit")
    bundle, repo = lynis_bundle(), repo or Repo.default()
    results = []
    for name in names:
        log.info("fleet audit: %s: Lynis running (a few minutes on an emulated node)", name)
        results.append(audit_node(probe, name, bundle, repo))
    return results
