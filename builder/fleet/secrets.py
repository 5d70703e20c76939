"""Site secrets: generated once per site with `cryptography` into secrets/<site>/ (0600 files in a
0700 tree, git-ignored), reused on the next run, never logged. They reach a node only inside its
seed (fleet/seeds.py).
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import io
import ipaddress as _ip
import os
import secrets as _secrets
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import segno
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import SohoError
from .sitefile import Site, SiteNode

log = logging.getLogger("sohocloud.fleet")


def wireguard_keypair() -> tuple[str, str]:
    """(private, public) in WireGuard's base64 form."""
    key = X25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


def wireguard_public(private_b64: str) -> str:
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64))
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(pub).decode()


def make_private_dirs(folder: Path) -> None:
    """mkdir -p with every folder it creates 0700 (Path.mkdir(parents=True) gives the parents the
    umask's mode, so secrets/<site>/ would be 0755 when users/ is its first child)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        each.mkdir(mode=0o700, exist_ok=True)


def write_secret(path: Path, data: str | bytes) -> None:
    """Create *path* 0600 from the start (never briefly world-readable), atomically."""
    make_private_dirs(path.parent)
    tmp = path.with_name("." + path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- site PKI

CA_DAYS = 3650
CERT_DAYS = 825


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a new site CA (EC P-256, path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def issue_cert(ca_key_pem: bytes, ca_cert_pem: bytes, common_name: str, *, dns: list[str],
               ips: list[str], days: int = CERT_DAYS) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for a node: server and client auth, SANs for its names and addresses."""
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(_ip.ip_address(a)) for a in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(min(now + _dt.timedelta(days=days), not_after(ca_cert)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def random_secret(nbytes: int = 32) -> str:
    return _secrets.token_urlsafe(nbytes)


def ensure_secret(path: Path, make) -> bytes:
    """The secret at *path*, created once with make() (str/bytes) and reused afterwards."""
    if path.is_file():
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # tighten a secret someone loosened
        return path.read_bytes()
    data = make()
    write_secret(path, data)
    return data.encode() if isinstance(data, str) else data


# --------------------------------------------------------------------------- a site's secrets


@dataclass(frozen=True)
class SiteSecrets:
    root: Path  # secrets/<site>

    def ca(self) -> tuple[bytes, bytes]:
        key_path, cert_path = self.root / "ca.key", self.root / "ca.crt"
        if key_path.is_file() != cert_path.is_file():
            raise SohoError(f"{self.root}: ca.key and ca.crt must both exist or both be absent: restore the "
                            "missing one (every node certificate depends on this CA), or remove both for a new CA")
        if not key_path.is_file():
            key, cert = make_ca(f"sohocloud {self.root.name} site CA")
            ensure_secret(key_path, lambda: key)
            ensure_secret(cert_path, lambda: cert)
        return key_path.read_bytes(), cert_path.read_bytes()

    def node_tls(self, site: Site, node: SiteNode) -> tuple[bytes, bytes]:
        """The node's key and certificate (server + client auth) from the site CA: issued once, and
        again when it names other names, comes from another CA or ends within the site's
        `certificates.renew_before_days` (the node keeps its instance-id: `fleet renew` installs it)."""
        d = self.root / "nodes"
        key_path, cert_path = d / f"{node.name}.key", d / f"{node.name}.crt"
        dns, ips = [node.name, f"{node.name}.{site.domain}"], [node.address]
        policy = site.certificates
        if not (key_path.is_file() and cert_path.is_file()) or not cert_fits(
                cert_path.read_bytes(), self.ca()[1], dns, ips, margin_days=policy.renew_before_days):
            # A lone key or certificate is useless, and one from another CA, for other
            # names or about to expire is wrong: issue a fresh pair.
            renewing = cert_path.is_file()
            ca_key, ca_cert = self.ca()
            key, cert = issue_cert(ca_key, ca_cert, node.name, dns=dns, ips=ips, days=policy.valid_days)
            write_secret(key_path, key)  # each whole, by rename: a crash leaves the old pair or the new key
            write_secret(cert_path, cert)  # with the old certificate, which the next run replaces
            if renewing:
                log.info("site %s: %s's certificate renewed, valid until %s (`sohocloud fleet renew` installs it "
                         "on the running node)", site.name, node.name, cert_expiry(cert).date())
        return key_path.read_bytes(), cert_path.read_bytes()

    def wireguard(self, node: SiteNode) -> tuple[str, str]:
        """A node's WireGuard key pair (private, public), made once."""
        return self._wireguard(self.root / "wireguard" / f"{node.name}.key")

    def wireguard_peer(self, name: str) -> tuple[str, str]:
        """A VPN peer's key pair, for a peer the site file gives no public key of."""
        return self._wireguard(self.root / "wireguard" / "peers" / f"{name}.key")

    def _wireguard(self, path: Path) -> tuple[str, str]:
        priv_s = ensure_secret(path, lambda: wireguard_keypair()[0]).decode().strip()
        return priv_s, wireguard_public(priv_s)

    def secret(self, name: str) -> str:
        return ensure_secret(self.root / f"{name}.secret", random_secret).decode().strip()

    def user_password(self, user: str) -> str:
        """A person's initial password (SMB, and LDAP unless the site gives a hash): hand it to them."""
        return ensure_secret(self.root / "users" / f"{user}.password", random_secret).decode().strip()

    def totp(self, site: str, user: str) -> tuple[str, TotpFiles]:
        """A person's TOTP secret, made once; its URI and QR code are (re)written beside it when missing or
        stale, for the admin to hand over (README: handing out the second factor)."""
        d = self.root / "users"
        files = TotpFiles(d / f"{user}.totp", d / f"{user}.totp.uri", d / f"{user}.totp.png")
        secret = ensure_secret(files.secret, totp_secret).decode().strip()
        uri = otpauth_uri(site, user, secret)
        if not files.uri.is_file() or files.uri.read_text().strip() != uri or not files.qr.is_file():
            write_secret(files.qr, qr_png(uri))
            write_secret(files.uri, uri + "\n")
        return secret, files


# --------------------------------------------------------------------------- TOTP (RFC 6238)
# The second factor at the desktop panels: SHA-1, 6 digits, 30 s, what every phone app reads.

TOTP_BYTES = 20  # 160 bits, RFC 4226's recommended shared-secret length


def totp_secret() -> str:
    return base64.b32encode(_secrets.token_bytes(TOTP_BYTES)).decode()


def otpauth_uri(site: str, user: str, secret_b32: str) -> str:
    """The Key Uri Format phone apps scan (github.com/google/google-authenticator/wiki/Key-Uri-Format)."""
    issuer = f"sohocloud {site}"
    label = urllib.parse.quote(f"{issuer}:{user}")
    query = urllib.parse.urlencode({"secret": secret_b32, "issuer": issuer, "algorithm": "SHA1", "digits": 6,
                                    "period": 30}, quote_via=urllib.parse.quote)
    return f"otpauth://totp/{label}?{query}"


def qr_png(text: str) -> bytes:
    buf = io.BytesIO()
    segno.make(text, error="m", micro=False).save(buf, kind="png", scale=8, border=4)
    return buf.getvalue()


@dataclass(frozen=True)
class TotpFiles:
    secret: Path  # secrets/<site>/users/<name>.totp: the base32 secret (what the panels check codes with)
    uri: Path  # <name>.totp.uri: the otpauth:// URI (to type into an app)
    qr: Path  # <name>.totp.png: the same URI as a QR code (to scan)


def cert_expiry(cert_pem: bytes) -> _dt.datetime:
    return not_after(x509.load_pem_x509_certificate(cert_pem))


def not_after(cert: x509.Certificate) -> _dt.datetime:
    return getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=_dt.UTC)


def cert_fits(cert_pem: bytes, ca_pem: bytes, dns: list[str], ips: list[str], margin_days: int = 30) -> bool:
    """The node certificate is signed by this CA, names exactly these DNS names and IPs, and is not about to expire."""
    cert, ca = x509.load_pem_x509_certificate(cert_pem), x509.load_pem_x509_certificate(ca_pem)
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:  # noqa: BLE001 - any failure means: not this CA's
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names_ok = (sorted(san.get_values_for_type(x509.DNSName)) == sorted(dns)
                and sorted(map(str, san.get_values_for_type(x509.IPAddress))) == sorted(str(_ip.ip_address(i))
                                                                                        for i in ips))
    expires = not_after(cert)
    return names_ok and expires - _dt.datetime.now(_dt.UTC) > _dt.timedelta(days=margin_days)
