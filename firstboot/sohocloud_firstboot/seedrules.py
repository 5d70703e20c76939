"""The seed's rules, one copy for both sides: what `sohocloud` writes into a seed (builder/seed.py,
the site file's checks) and what a node accepts from one (firstboot, the role hooks' helpers).

Stdlib only, and cheap to import: it is on a node's path to SSH.
"""

from __future__ import annotations

import base64
import binascii
import re

# A NoCloud seed: these files, on a volume labelled cidata (any case; FAT labels are upper case).
SEED_FILES = ("meta-data", "user-data", "network-config")
CIDATA_LABELS = ("cidata", "CIDATA")
USER_DATA_HEADER = "#cloud-config"
NETWORK_CONFIG_VERSION = 2  # netplan version 2 only
NETWORK_CONFIG_KEYS = frozenset({"version", "ethernets"})  # a network-config's top level: nothing else

# The one account a seed configures: key-only SSH, passwordless sudo.
ADMIN = "admin"

# A host name is one RFC 1123 label (no dots): it names the node and its /etc/hosts line.
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Names the site gives (nodes, people, groups, the site itself): lowercase DNS labels.
LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A DNS name of such labels, dotted (an IPv4 address matches too: the site's time servers may be either).
DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
# A network-config ethernets key ends up in a file name: keep it boring.
# A WireGuard key in its base64 form (32 bytes: the last character carries 4 bits, then "=").
WG_KEY_RE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")
IFACE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

SSH_KEY_TYPES = frozenset({
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
})


def is_public_key(line: object) -> bool:
    """An OpenSSH public key line: a known type, a base64 blob whose embedded type name matches
    it, an optional comment. No options prefix and no line break (a line break would inject a
    second authorized_keys line)."""
    if not isinstance(line, str) or any(c in line for c in "\n\r\0"):
        return False
    parts = line.split(None, 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        return False
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(blob) < 4:
        return False
    n = int.from_bytes(blob[:4], "big")
    return blob[4:4 + n] == parts[0].encode()


def valid_hostname(name: object) -> bool:
    return isinstance(name, str) and bool(HOSTNAME_RE.fullmatch(name))


def valid_label(name: object) -> bool:
    return isinstance(name, str) and bool(LABEL_RE.fullmatch(name))


def valid_instance_id(value: object) -> bool:
    """meta-data's instance-id: a non-empty one-line string (YAML may have made a number of it)."""
    return isinstance(value, (str, int)) and bool(str(value).strip()) and "\n" not in str(value)
