"""sohocloud-desk: the desk services and the admin's commands.

    python3 -m sohocloud_desk broker          the broker (the node that provides `desktops`)
    python3 -m sohocloud_desk panel           the sign-in panel and session agent (a workstation host)
    python3 -m sohocloud_desk sessions        (admin, on the broker's node) the sessions now
    python3 -m sohocloud_desk end NAME        (admin) end NAME's session
    python3 -m sohocloud_desk token NAME --scope start[,stop] --days N
                                              (admin) a script token for NAME, printed once
    python3 -m sohocloud_desk revoke ID       (admin) that token is refused from now on

Settings come from files firstboot writes from the node's seed (0600); the TLS files are the node's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import audit, container, https, policy, service, settings, system, template, tokens
from .brokerd import HEARTBEAT
from .podman import PodmanRunner

SETTINGS = Path("/etc/sohocloud/desk")
TLS = Path("/etc/sohocloud/tls")
STATE = Path("/var/lib/sohocloud-desk")


def log(message: str) -> None:
    print(f"sohocloud-desk: {message}", file=sys.stderr, flush=True)


def auditor(journal: str):
    def send(event: str, message: str, **fields: str) -> None:
        try:
            audit.send(audit.event_fields(event, message, **fields), journal)
        except OSError as e:  # no journal: the event still reaches stderr (which journald also reads)
            log(f"{message} (journal: {e})")
    return send


def listen_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def run_broker(args: argparse.Namespace) -> None:
    section = json.loads((args.settings / "broker.json").read_text())
    tls = https.TlsFiles.under(args.tls)
    args.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    svc = service.broker_service(section, tls, section["name"], args.state, time.time, auditor(args.journal))
    host, port = listen_address(args.listen or f"{section['address']}:{service.BROKER_PORT}")
    server = https.serve(svc, host, port, https.server_context(tls, client_certs=True), log)
    log(f"broker listening on {host}:{port} for {', '.join(sorted(svc.hosts))}")
    server.serve_forever()


TICK = 5.0  # seconds between the panel's timeout checks


def every(seconds: float, what: str, fn) -> None:
    """*fn* every *seconds* in a thread of its own. A failure is logged when it starts or changes
    (not every round: the broker may be down for hours), and the recovery once; the loop goes on."""
    def loop() -> None:
        failing = ""
        while True:
            time.sleep(seconds)
            try:
                fn()
                if failing:
                    log(f"{what}: working again")
                failing = ""
            except Exception as e:  # noqa: BLE001 (one bad round must not end the loop)
                if str(e) != failing:
                    log(f"{what}: {e} (retrying every {seconds:.0f} s)")
                failing = str(e)
    threading.Thread(target=loop, name=what, daemon=True).start()


def end_leftovers(sessions_dir: Path) -> None:
    """Sessions a previous panel process started are nobody's now: stop them, remove their folders."""
    system.run(["systemctl", "stop", "desk-*.service"], check=False, timeout=120)
    if sessions_dir.is_dir():
        for d in sessions_dir.iterdir():
            shutil.rmtree(d, ignore_errors=True)


def run_panel(args: argparse.Namespace) -> None:
    cfg = json.loads((args.settings / "panel.json").read_text())
    tls = https.TlsFiles.under(args.tls)
    sessions_dir = Path(cfg["sessions_dir"])
    end_leftovers(sessions_dir)
    ready = threading.Event()
    panel = service.panel_service(cfg["own"], cfg["broker"], tls, PodmanRunner(), cfg["timeouts"], time.time, log,
                                  homes=Path(cfg["homes"]), sessions_dir=sessions_dir, ready=ready.is_set,
                                  audit=auditor(args.journal))
    spec = template.check_spec(cfg.get("template"))
    threading.Thread(target=template.keep_trying, args=(spec, log, ready.set), name="template", daemon=True).start()
    host, port = listen_address(args.listen or f"{cfg['own']['address']}:{service.PANEL_PORT}")
    server = https.serve(panel, host, port, https.server_context(tls, client_certs=True), log)
    every(HEARTBEAT, "heartbeat", lambda: service.heartbeat(panel))
    every(TICK, "timeouts", panel.tick)
    log(f"panel listening on {host}:{port}; broker {cfg['broker']['fqdn']}; sessions on {container.TEMPLATE}")
    server.serve_forever()


def admin_call(args: argparse.Namespace, method: str, path: str, data: Any = None) -> Any:
    section = json.loads((args.settings / "broker.json").read_text())
    ctx = https.client_context(https.TlsFiles.under(args.tls))
    host, port = listen_address(args.listen or f"{section['fqdn']}:{service.BROKER_PORT}")
    status, answer = https.call(ctx, host, port, method, path, data)
    if status not in (200, 404):
        raise SystemExit(f"sohocloud-desk: the broker said {status}: {answer}")
    return answer


def cmd_sessions(args: argparse.Namespace) -> None:
    rows = admin_call(args, "GET", "/v1/sessions")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'PERSON':<16} {'HOST':<16} {'MACHINE':<10} {'SINCE':<20} SESSION")
    for r in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"]))
        print(f"{r['person']:<16} {r['host']:<16} {r['machine']:<10} {since:<20} {r['session'][:12]}")


def cmd_end(args: argparse.Namespace) -> None:
    answer = admin_call(args, "POST", "/v1/end", {"person": args.name})
    print(f"ended {len(answer['ended'])} session(s) of {args.name}")


def cmd_token(args: argparse.Namespace) -> None:
    section = json.loads((args.settings / "broker.json").read_text())
    most = int(section["rules"]["token_max_days"])
    if not section["rules"].get("tokens"):
        raise SystemExit("sohocloud-desk: the site's desktops.sign_in does not list `token`")
    if not 1 <= args.days <= most:
        raise SystemExit(f"sohocloud-desk: --days: expected 1..{most} (the site's desktops.tokens.max_days)")
    person = next((p for p in section["people"] if p["name"] == args.name), None)
    rules = settings.rules(section)
    if person is None or policy.grant_for(set(person["groups"]), list(rules.policy), rules.machine_types) is None:
        raise SystemExit(f"sohocloud-desk: {args.name} does not get a desktop (group policy)")
    scope = {f"session:{s}" for s in args.scope.split(",")}
    text, tok = tokens.issue(section["token_key"].encode(), args.name, scope, int(time.time()) + args.days * 86400)
    auditor(args.journal)("token-issued", f"token {tok.jti} issued for {args.name} ({args.scope}, {args.days} d)",
                          person=args.name, token=tok.jti)
    print(f"token id {tok.jti} (for `revoke`), valid {args.days} days:", file=sys.stderr)
    print(text)


def cmd_revoke(args: argparse.Namespace) -> None:
    """Revoke by the token's id (printed when it was issued): the token itself never goes on a
    command line."""
    section = json.loads((args.settings / "broker.json").read_text())
    if not tokens.ID_RE.fullmatch(args.id):
        raise SystemExit("sohocloud-desk: expected a token id (as `token` printed it)")
    args.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    revoked_file, now = args.state / "revoked.json", time.time()
    revoked = service.read_json(revoked_file, {})
    revoked = revoked if isinstance(revoked, dict) else {}
    # Kept until no token with this id could still be valid; then the list forgets it.
    revoked[args.id] = now + int(section["rules"]["token_max_days"]) * 86400
    service.write_private(revoked_file, json.dumps({j: e for j, e in revoked.items() if e > now}))
    auditor(args.journal)("token-revoked", f"token {args.id} revoked", token=args.id)
    print(f"revoked token {args.id}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sohocloud-desk", description="desktops on demand: services and admin commands")
    p.add_argument("--settings", type=Path, default=SETTINGS, help=f"settings folder (default {SETTINGS})")
    p.add_argument("--tls", type=Path, default=TLS, help=f"the node's TLS files (default {TLS})")
    p.add_argument("--state", type=Path, default=STATE, help=f"the broker's state (default {STATE})")
    p.add_argument("--listen", help="ADDRESS:PORT to serve on (or, for admin commands, of the broker)")
    p.add_argument("--journal", default=audit.JOURNAL_SOCKET, help="journald's native socket")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("broker").set_defaults(run=run_broker)
    sub.add_parser("panel").set_defaults(run=run_panel)
    s = sub.add_parser("sessions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_sessions)
    e = sub.add_parser("end")
    e.add_argument("name")
    e.set_defaults(run=cmd_end)
    t = sub.add_parser("token")
    t.add_argument("name")
    t.add_argument("--scope", default="start,stop", choices=["start", "stop", "start,stop", "stop,start"])
    t.add_argument("--days", type=int, default=30)
    t.set_defaults(run=cmd_token)
    r = sub.add_parser("revoke")
    r.add_argument("id", help="the token's id, as `token` printed it")
    r.set_defaults(run=cmd_revoke)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
