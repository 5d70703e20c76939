"""The contract between `fleet build` and the desktop broker: the broker's seed section (written by
builder/fleet/seeds.py) is what sohocloud_desk.settings reads, and it reaches the broker's node only;
the workstation hosts' section is what their panel runs from (the firstboot hook in between)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from test_fleet_services import EXAMPLE, REPO, TEMPLATE, load_example, seed_block  # tests/unit is on sys.path
from test_role_hooks import make_root, mode, ok, run_hook

from builder.fleet.secrets import SiteSecrets
from builder.fleet.seeds import SeedContext, find_providers, node_settings

sys.path.insert(0, str(REPO / "overlays/desk/usr/lib/sohocloud"))
from sohocloud_desk import broker, checkers, https, inputs, placement, service, settings, totp

G = 1 << 30


@pytest.fixture
def office(tmp_path):
    site, profiles = load_example()
    return site, profiles, SiteSecrets(tmp_path / "secrets" / site.name)


def test_the_broker_section_builds_a_working_broker(office, tmp_path):
    site, profiles, secrets = office
    section = seed_block(site, "control", profiles, secrets)["desk_broker"]
    assert [h["name"] for h in section["hosts"]] == ["ws1", "pc1", "pc2"]
    assert section["checkers"] == {"ldap": {"uri": "ldaps://control.example.lan", "base_dn": "dc=example,dc=lan"}}
    rules, people = settings.rules(section), settings.people(section)
    assert rules.otp and rules.policy[0]["machine"] == "standard"
    assert rules.machine_types["standard"].memory == 2 * G and rules.host_reserve == G
    assert set(people) == {"alice", "bob"} and people["alice"].uid == 2001
    # The secret in the seed is the one the admin handed to alice (her phone makes these codes).
    handed = (secrets.root / "users" / "alice.totp").read_text().strip()
    assert people["alice"].totp_secret == handed
    now = 1_700_000_000.0
    b = broker.Broker(rules=rules, people=people, passwords=[lambda n, p: (n, p) == ("alice", "pw")],
                      token_ok=lambda *a: False,
                      hosts=lambda: [placement.HostState(h["name"], True, 4 * G, 0, 0) for h in section["hosts"]],
                      clock=lambda: now, audit=lambda *a, **k: None)
    placed = b.sign_in(inputs.SignIn("alice", "pw", totp.totp(totp.decode_secret(handed), now)), "10.44.0.21",
                       seat="pc1")
    assert placed.host == "pc1" and placed.grant.network == "lan"
    assert json.loads(json.dumps(section)) == section  # plain data: it goes through YAML in the seed


def test_only_the_broker_gets_the_second_factors(office):
    site, profiles, secrets = office
    blocks = {n.name: json.dumps(seed_block(site, n.name, profiles, secrets)) for n in site.nodes}
    handed = [(secrets.root / "users" / f"{u}.totp").read_text().strip() for u in ("alice", "bob")]
    for name, text in blocks.items():
        assert any(h in text for h in handed) == (name == "control"), name
    ws = json.loads(blocks["pc1"])
    assert ws["desk"] == {"broker": {"name": "control", "fqdn": "control.example.lan", "address": "10.44.0.2"},
                          "template": TEMPLATE, "idle_timeout": 1800, "disconnect_timeout": 120,
                          "lan": "10.44.0.0/24", "people_uids": [2000, 59999]}


def test_an_htpasswd_site_carries_its_file_to_the_broker(office, tmp_path):
    site, profiles, secrets = office
    text = EXAMPLE.read_text().replace("sign_in: [ldap, otp]", "sign_in: [{name: htpasswd, file: desk.htpasswd}]")
    (tmp_path / "desk.htpasswd").write_text(f"bob:{checkers.crypt.crypt('hunter22', checkers.crypt.mksalt())}\n")
    (tmp_path / "office.yaml").write_text(text)
    site, _profiles = load_example(tmp_path / "office.yaml")
    node = site.node("control")
    ctx = SeedContext(site, node, profiles, find_providers(site, profiles), secrets, text, tmp_path, (TEMPLATE,))
    section = node_settings(site, node, secrets, ctx)["desk_broker"]
    assert not settings.rules(section).otp and "totp" not in json.dumps(section["people"])
    path = tmp_path / "node-htpasswd"
    path.write_text(section["checkers"]["htpasswd"]["text"])
    (check,) = settings.password_checkers(section, tmp_path / "ca.crt", path)
    assert check("bob", "hunter22") and not check("bob", "hunter2")


# --------------------------------------------------------------------------- the firstboot hook


def nft_check(rules: str) -> None:
    """The rules parse as nft reads them (nft -c: checked, not loaded), where nft may check."""
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if not nft:
        return
    proc = subprocess.run([nft, "-c", "-f", "-"], input=rules, capture_output=True, text=True, timeout=20)
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        return
    assert proc.returncode == 0, proc.stderr

DESK_HOOK = REPO / "overlays/desk/usr/lib/sohocloud/firstboot.d/45-desk"


def test_the_hook_writes_each_nodes_desk_settings_and_the_services_start_from_them(office, tmp_path):
    site, profiles, secrets = office
    control, ws1, nas = (seed_block(site, n, profiles, secrets) for n in ("control", "ws1", "nas"))
    root = make_root(tmp_path / "control", "control")
    ok(run_hook(DESK_HOOK, root, control))
    written = root / "etc/sohocloud/desk/broker.json"
    conf = json.loads(written.read_text())
    assert mode(written) == 0o600 and not (root / "etc/sohocloud/desk/panel.json").exists()
    assert (conf["name"], conf["fqdn"], conf["address"]) == ("control", "control.example.lan", "10.44.0.2")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    svc = service.broker_service(conf, https.TlsFiles.under(tmp_path), conf["name"], state, lambda: 0.0,
                                 lambda *a, **k: None, host_call=lambda *a: (200, {}))
    assert sorted(svc.hosts) == ["pc1", "pc2", "ws1"] and set(svc.broker.people) == {"alice", "bob"}

    root = make_root(tmp_path / "ws1", "ws1")
    ok(run_hook(DESK_HOOK, root, ws1))
    written = root / "etc/sohocloud/desk/panel.json"
    assert mode(written) == 0o600 and not (root / "etc/sohocloud/desk/broker.json").exists()
    nft = (root / "etc/nftables.d/45-desk.nft").read_text()
    assert "meta skuid 2000-59999 meta nfproto ipv4 ip daddr 10.44.0.0/24 oifname != \"lo\" accept" in nft
    assert nft.rstrip().endswith("}") and "meta skuid 2000-59999 counter reject with icmpx type admin-prohibited" in nft
    nft_check(nft)
    # The kiosk (a PC with a screen) shows the host's own panel, by its certificate's name.
    kiosk = root / "etc/sohocloud/desk/kiosk.env"
    assert mode(kiosk) == 0o644 and "KIOSK_URL=https://ws1.example.lan/\n" in kiosk.read_text()
    assert json.loads(written.read_text()) == {
        "own": {"name": "ws1", "fqdn": "ws1.example.lan", "address": "10.44.0.10"},
        "broker": {"name": "control", "fqdn": "control.example.lan", "address": "10.44.0.2"},
        "timeouts": {"idle_timeout": 1800, "disconnect_timeout": 120},
        "homes": "/nas/home", "sessions_dir": "/run/sohocloud-desk/sessions",
        "template": {"url": TEMPLATE["url"], "sha256": TEMPLATE["sha256"]}}

    root = make_root(tmp_path / "nas", "nas")
    ok(run_hook(DESK_HOOK, root, nas))
    assert not (root / "etc/sohocloud/desk").exists()  # no desktops here: nothing to run


@pytest.mark.parametrize("node, edit, key", [
    ("ws1", lambda b: b["desk"]["broker"].update(fqdn="control.example.lan;reboot"), "desk.broker.fqdn"),
    ("ws1", lambda b: b["desk"].update(idle_timeout="30m"), "desk.idle_timeout"),
    ("ws1", lambda b: b["desk"]["template"].update(url="http://10.44.0.1/images/x.squashfs;reboot"), "desk.template"),
    ("ws1", lambda b: b["desk"].update(lan="0.0.0.0/0 accept; #"), "desk.lan"),
    ("ws1", lambda b: b["desk"].update(people_uids=[0, 59999]), "desk.people_uids"),
    ("control", lambda b: b["desk_broker"]["people"][0].update(uid=0), "desk_broker.people[0].uid"),
    ("control", lambda b: b["desk_broker"].update(token_key="short"), "desk_broker.token_key"),
])
def test_the_hook_refuses_bad_seed_values_naming_the_key(office, tmp_path, node, edit, key):
    site, profiles, secrets = office
    block = seed_block(site, node, profiles, secrets)
    edit(block)
    root = make_root(tmp_path, node)
    p = run_hook(DESK_HOOK, root, block)
    assert p.returncode != 0 and key in p.stderr, p.stderr
    assert not list((root / "etc/sohocloud").rglob("*.json"))
