"""Tier 1: key material made with `cryptography`: formats, chains, file modes, reuse."""

from __future__ import annotations

import base64
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from builder.fleet.secrets import (ensure_secret, issue_cert, make_ca, random_secret, wireguard_keypair,
                                   wireguard_public, write_secret)


def test_wireguard_keypair_matches_and_is_32_bytes():
    priv, pub = wireguard_keypair()
    assert len(base64.b64decode(priv)) == 32 and len(base64.b64decode(pub)) == 32
    assert wireguard_public(priv) == pub
    assert wireguard_keypair()[0] != priv


def test_ca_and_node_cert_chain():
    ca_key, ca_pem = make_ca("sohocloud example CA")
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key, pem = issue_cert(ca_key, ca_pem, "ctl", dns=["ctl", "ctl.office.lan"], ips=["10.44.0.10"])
    cert = x509.load_pem_x509_certificate(pem)
    # signed by the CA (raises if not)
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == ca.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ctl", "ctl.office.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.44.0.10")]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"PRIVATE KEY" in key


def test_other_ca_does_not_verify():
    _, ca_pem = make_ca("a")
    other_key, other_pem = make_ca("b")
    _, pem = issue_cert(other_key, other_pem, "n", dns=["n"], ips=[])
    cert = x509.load_pem_x509_certificate(pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:
        return
    raise AssertionError("a certificate from another CA verified")


def test_secrets_are_0600_from_the_start_and_reused(tmp_path):
    p = tmp_path / "s" / "ldap-admin.secret"
    first = ensure_secret(p, random_secret)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert ensure_secret(p, random_secret) == first  # generated once, reused
    p.chmod(0o644)
    ensure_secret(p, random_secret)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600  # loosened by hand: tightened again
    write_secret(tmp_path / "x", b"abc")
    assert not list(tmp_path.glob(".*.tmp"))


def test_random_secret_entropy():
    values = {random_secret() for _ in range(50)}
    assert len(values) == 50 and all(len(v) >= 43 for v in values)


def test_node_certificate_reissued_when_it_no_longer_fits(tmp_path):
    """Same CA, same names: reused. New domain or address, or a new CA: a fresh certificate."""
    import dataclasses

    from builder.fleet.secrets import SiteSecrets, cert_fits
    from builder.fleet.sitefile import Site, SiteNode

    node = SiteNode(name="control", role="control", address="10.44.0.2", mac="52:54:00:44:00:02")
    site = Site(name="t", domain="t.lan", lan="10.44.0.0/24", admin_ssh_keys=("k",), nodes=(node,))
    sec = SiteSecrets(tmp_path / "t")
    _key, cert = sec.node_tls(site, node)
    assert sec.node_tls(site, node)[1] == cert
    moved = dataclasses.replace(site, domain="office.lan")
    cert2 = sec.node_tls(moved, node)[1]
    assert cert2 != cert and cert_fits(cert2, sec.ca()[1], ["control", "control.office.lan"], ["10.44.0.2"])
    for p in (tmp_path / "t").glob("ca.*"):
        p.unlink()
    cert3 = sec.node_tls(moved, node)[1]
    assert cert3 != cert2 and cert_fits(cert3, sec.ca()[1], ["control", "control.office.lan"], ["10.44.0.2"])


def test_a_secret_written_deep_first_makes_every_new_folder_0700(tmp_path):
    # secrets/<site>/ came out 0755 once when users/<name>.totp was the site's first secret:
    # Path.mkdir(parents=True) gives the parents the umask's mode.
    old = os.umask(0o022)
    try:
        write_secret(tmp_path / "secrets" / "office" / "users" / "alice.totp", "X")
    finally:
        os.umask(old)
    for folder in ("secrets", "secrets/office", "secrets/office/users"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o700, folder
