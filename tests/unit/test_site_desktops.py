"""Tier 1: the site file's desktops section (checkers, machine types, group policy) and each
person's second factor (TOTP secret, otpauth URI, a QR code a real decoder reads back)."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from test_site import GATEWAYS, GOOD, ROLES  # tests/unit is on sys.path (pytest prepend import mode)

from builder.errors import ConfigError
from builder.fleet.build import issue_second_factors
from builder.fleet.desktops import DEFAULT_MACHINE_TYPES, parse_duration
from builder.fleet.secrets import SiteSecrets
from builder.fleet.sitefile import load_site

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "overlays/desk/usr/lib/sohocloud"))
from sohocloud_desk import totp

DESKTOPS = """\
desktops:
  sign_in: [ldap, otp]
  machine_types:
    small: {cpus: 1, memory: 1G, pids: 256}
    standard: {cpus: "1.5", memory: 2G}
  policy:
    - {group: office, machine: standard, network: lan}
  idle_timeout: 20m
"""


def load(tmp_path: Path, text: str):
    p = tmp_path / "site.yaml"
    p.write_text(text)
    return load_site(p, known_roles=ROLES, gateway_roles=GATEWAYS)


def test_a_site_without_desktops_gives_nobody_a_desktop_and_asks_for_a_second_factor(tmp_path):
    d = load(tmp_path, GOOD).desktops
    assert d.policy == () and [c.name for c in d.checkers] == ["ldap", "otp"]
    assert d.types() == DEFAULT_MACHINE_TYPES and d.second_sign_in == "take-over"


def test_desktops_section_parses(tmp_path):
    d = load(tmp_path, GOOD + DESKTOPS).desktops
    assert d.policy[0].machine == "standard" and d.policy[0].network == "lan"
    assert d.types()["standard"].cpus == "1.5" and d.types()["standard"].pids == 512
    assert parse_duration(d.idle_timeout) == 1200 and parse_duration(d.disconnect_timeout) == 120


@pytest.mark.parametrize("old, new, line, expect", [
    ("group: office, machine", "group: visitors, machine", 22, "policy[0].group: unknown group 'visitors'"),
    ("machine: standard, network", "machine: huge, network", 22, "unknown machine type 'huge' (known: small, standard)"),
    ("network: lan}", "network: internet}", 22, "expected one of 'none', 'lan'"),
    ("idle_timeout: 20m", "idle_timeout: 20 minutes", 23, "expected a duration like 90s"),
    ("idle_timeout: 20m", "idle_timeout: 5s", 23, "at least 30s"),
    ("memory: 2G}", "memory: 2GB}", 20, "expected a size like 64M or 2G"),
    ("memory: 1G,", "memory: 100M,", 19, "at least 256M"),
    ("cpus: \"1.5\"", "cpus: lots", 20, "expected a number of CPUs"),
    ("sign_in: [ldap, otp]", "sign_in: [otp]", 17, "expected a password checker (ldap or htpasswd)"),
    ("sign_in: [ldap, otp]", "sign_in: [ldap, kerberos]", 17, "sign_in[1]"),
    ("sign_in: [ldap, otp]", "sign_in: [ldap, ldap]", 17, "sign_in[1]: checker 'ldap' is listed twice"),
    ("sign_in: [ldap, otp]", "sign_in: [{name: htpasswd}]", 17, "htpasswd needs {name: htpasswd, file: FILE}"),
    ("sign_in: [ldap, otp]", "sign_in: [{name: htpasswd, file: nope.htpasswd}]", 17, "no such file"),
])
def test_desktops_errors_name_file_line_and_key(tmp_path, old, new, line, expect):
    text = GOOD + DESKTOPS
    assert old in text
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text.replace(old, new))
    msg = str(exc.value)
    assert f"site.yaml:{line}:" in msg and expect in msg, msg


@pytest.mark.parametrize("text, expect", [
    ("alice:$apr1$abc$defghijklmnopqrstuvwx/\n", "line 1: alice's hash is not bcrypt"),
    ("# people\nalice:secret\n", "line 2: alice's hash"),
    ("Alice:$2y$05$abcdefghijklmnopqrstuu\n", "line 1: expected name:hash"),
    ("alice $2y$05$abcdefghijklmnopqrstuu\n", "line 1: expected name:hash"),
])
def test_an_unusable_htpasswd_file_is_refused_naming_its_line(tmp_path, text, expect):
    (tmp_path / "desk.htpasswd").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, GOOD + DESKTOPS.replace("[ldap, otp]", "[{name: htpasswd, file: desk.htpasswd}]"))
    assert "site.yaml:17:" in str(exc.value) and "desk.htpasswd: " + expect in str(exc.value), str(exc.value)


def test_htpasswd_file_is_found_relative_to_the_site(tmp_path):
    (tmp_path / "desk.htpasswd").write_text("alice:$2y$05$abcdefghijklmnopqrstuu5p4X5a9mLkqQ3dJm0gk2nZzQ0bXy7mS\n")
    d = load(tmp_path, GOOD + DESKTOPS.replace("[ldap, otp]", "[{name: htpasswd, file: desk.htpasswd}, otp]")).desktops
    assert d.checker("htpasswd").file == "desk.htpasswd" and d.checker("ldap") is None


def test_fleet_build_hands_each_person_a_totp_secret_uri_and_qr_code(tmp_path, caplog):
    site = load(tmp_path, GOOD + DESKTOPS)
    secrets = SiteSecrets(tmp_path / "secrets" / site.name)
    with caplog.at_level("INFO"):
        issue_second_factors(site, secrets)
    users = secrets.root / "users"
    secret = (users / "alice.totp").read_text().strip()
    uri = (users / "alice.totp.uri").read_text().strip()
    for name in ("alice.totp", "alice.totp.uri", "alice.totp.png"):
        assert stat.S_IMODE((users / name).stat().st_mode) == 0o600
    assert len(totp.decode_secret(secret)) == 20
    parsed = urllib.parse.urlparse(uri)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    assert parsed.scheme == "otpauth" and parsed.netloc == "totp"
    assert urllib.parse.unquote(parsed.path) == "/sohocloud example:alice"
    assert query == {"secret": secret, "issuer": "sohocloud example", "algorithm": "SHA1", "digits": "6",
                     "period": "30"}
    assert secret not in caplog.text  # the log names files, never the secret
    # Made once: a second build keeps the secret (the person's phone app already has it).
    issue_second_factors(site, secrets)
    assert (users / "alice.totp").read_text().strip() == secret
    # A code from the secret as a phone would compute it is one the panel's checker accepts.
    now = time.time()
    assert totp.accept(totp.decode_secret(secret), totp.totp(totp.decode_secret(secret), now), now, None)


@pytest.mark.skipif(shutil.which("zbarimg") is None, reason="zbarimg (zbar-tools, `make deps`) not installed")
def test_the_qr_code_png_decodes_to_the_otpauth_uri(tmp_path):
    site = load(tmp_path, GOOD + DESKTOPS)
    secrets = SiteSecrets(tmp_path / "secrets" / site.name)
    issue_second_factors(site, secrets)
    users = secrets.root / "users"
    out = subprocess.run(["zbarimg", "--quiet", "--raw", str(users / "alice.totp.png")], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == (users / "alice.totp.uri").read_text().strip()


@pytest.mark.parametrize("edit", [lambda t: t.replace("[ldap, otp]", "[ldap]"),  # no second factor asked for
                                  lambda t: t.replace("group: office, machine", "group: interns, machine")
                                  .replace("groups:\n", "groups:\n  - {name: interns, gid: 3001}\n")])
def test_no_second_factor_for_people_without_a_desktop_or_without_otp(tmp_path, edit):
    site = load(tmp_path, edit(GOOD + DESKTOPS))
    secrets = SiteSecrets(tmp_path / "secrets" / site.name)
    issue_second_factors(site, secrets)
    assert not (secrets.root / "users").exists()
