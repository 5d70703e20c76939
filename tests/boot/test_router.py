"""Tier 2: the router image, booted with seeds, checked over SSH (testinfra).

Expected values come from the resolved profile (the same data the image was
built from), so a check fails when the image drifts from its declaration.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from builder.proc import run
from builder.fleet.secrets import wireguard_public
from bootkit import partition_raw  # tests/boot is on sys.path (prepend import mode)

pytestmark = pytest.mark.boot
GUEST_SOCKETS = Path(__file__).with_name("guest_sockets.py")

MODERN_KEX = {"sntrup761x25519-sha512@openssh.com", "curve25519-sha256", "curve25519-sha256@libssh.org"}
MODERN_CIPHERS = {"chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes128-gcm@openssh.com"}
MODERN_MACS = {"hmac-sha2-512-etm@openssh.com", "hmac-sha2-256-etm@openssh.com"}


# --------------------------------------------------------------------------- the artefact itself


def test_generic_image_holds_no_host_key_or_authorized_key(router_images, tmp_path):
    raw = partition_raw(router_images["a"], "root", tmp_path)
    ssh_dir = run(["debugfs", "-R", "ls -l /etc/ssh", str(raw)], capture=True).stdout
    assert "sshd_config" in ssh_dir  # we are looking at the right tree
    assert "ssh_host_" not in ssh_dir
    admin = run(["debugfs", "-R", "ls -l /home/admin", str(raw)], capture=True).stdout
    assert "authorized_keys" not in admin and ".ssh" not in admin
    shadow = run(["debugfs", "-R", "cat /etc/shadow", str(raw)], capture=True).stdout
    for line in filter(None, shadow.splitlines()):
        assert line.split(":")[1][:1] in ("*", "!"), f"usable password field: {line.split(':')[0]}"


def test_manifest_and_checksums(router_images):
    router_image = router_images["a"]
    manifest = json.loads(Path(str(router_image) + ".manifest.json").read_text())
    assert manifest["packages"]["dnsmasq"] and manifest["packages"]["openssh-server"]
    assert manifest["inputs_hash"] and manifest["build_seconds"] > 0
    sums = (router_image.parent / "SHA256SUMS").read_text()
    assert re.search(rf"^[0-9a-f]{{64}}  {re.escape(router_image.name)}$", sums, re.M)
    run(["sha256sum", "--ignore-missing", "-c", "SHA256SUMS"], cwd=router_image.parent)


# --------------------------------------------------------------------------- identity and SSH


def test_hostname_from_seed(router_nodes):
    for node in router_nodes:
        assert node.host().check_output("hostname") == node.hostname


def test_admin_key_login_and_sudo(router_a):
    assert router_a.run("id -un").stdout.strip() == "admin"
    assert router_a.run("sudo -n id -un").stdout.strip() == "root"


def test_password_and_keyboard_interactive_refused(router_a):
    r = subprocess.run(router_a.ssh_argv("-o", "PubkeyAuthentication=no", "-o",
                                         "PreferredAuthentications=password,keyboard-interactive",
                                         "-o", "ControlPath=none") + ["true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Permission denied (publickey)" in r.stderr


def test_root_login_refused(router_a):
    r = subprocess.run(router_a.ssh_argv("-o", "ControlPath=none", "-l", "root") + ["true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_sshd_effective_config(router_a):
    cfg = dict(line.split(" ", 1) for line in router_a.run("sudo -n sshd -T").stdout.splitlines() if " " in line)
    assert cfg["permitrootlogin"] == "no"
    assert cfg["passwordauthentication"] == "no"
    assert cfg["kbdinteractiveauthentication"] == "no"
    assert cfg["permitemptypasswords"] == "no"
    assert cfg["x11forwarding"] == "no"
    assert cfg["allowtcpforwarding"] == "no"
    assert cfg["allowagentforwarding"] == "no"
    assert cfg["permittunnel"] == "no"
    assert int(cfg["maxauthtries"]) <= 3
    assert set(cfg["kexalgorithms"].split(",")) <= MODERN_KEX
    assert set(cfg["ciphers"].split(",")) <= MODERN_CIPHERS
    assert set(cfg["macs"].split(",")) <= MODERN_MACS


def _seen_host_key(node) -> str:
    line = next(x for x in node.known_hosts.read_text().splitlines() if "ssh-ed25519" in x)
    return line.split()[2]


def test_host_keys_generated_per_node(router_nodes):
    keys = {}
    for node in router_nodes:
        on_node = node.run("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1]
        assert on_node == _seen_host_key(node)  # the key the client saw is the node's own
        keys[node.name] = on_node
    assert len(set(keys.values())) == len(keys)  # two nodes from one image: two keys


def test_ssh_on_wan_side_refused(router_a):
    for node in (router_a,):
        netns, port = node.wan_ssh
        prefix = ["ip", "netns", "exec", netns] if netns else []
        r = subprocess.run(prefix + ["ssh", "-i", str(node.ssh_config.parent / "none"), "-p", str(port),
                                     "-o", "BatchMode=yes", "-o", "ConnectTimeout=8",
                                     "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                     "admin@127.0.0.1", "true"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 255, r.stderr
        # No SSH server answered at all: no banner, no authentication step.
        assert "Permission denied" not in r.stderr and "Host key" not in r.stderr, r.stderr


# --------------------------------------------------------------------------- firewall and sockets


def test_nftables_default_drop(router_a):
    ruleset = json.loads(router_a.run("sudo -n nft -j list ruleset").stdout)["nftables"]
    chains = {(c["chain"]["table"], c["chain"]["name"]): c["chain"] for c in ruleset if "chain" in c}
    assert chains[("filter", "input")]["policy"] == "drop"
    assert chains[("filter", "forward")]["policy"] == "drop"
    text = router_a.run("sudo -n nft list ruleset").stdout
    assert 'oifname "wan" masquerade' in text
    assert 'iifname "lan" oifname "wan" accept' in text
    assert 'iifname "wan" tcp' not in text and 'iifname "wan" udp' not in text


def _zone_of(sock: dict, addr_to_iface: dict[str, str]) -> str:
    if sock["device"]:
        return sock["device"]
    if sock["addr"] in addr_to_iface:
        return addr_to_iface[sock["addr"]]
    return "*"  # wildcard, not bound to a device: would listen on every zone


def test_listening_sockets_are_exactly_the_declared_ones(router_a, router_cfg):
    socks = json.loads(router_a.run("sudo -n python3 -", input=GUEST_SOCKETS.read_text()).stdout)
    addrs = json.loads(router_a.run("ip -j addr").stdout)
    addr_to_iface = {a["local"]: link["ifname"] for link in addrs for a in link.get("addr_info", [])}
    seen = {(s["proto"], s["port"], _zone_of(s, addr_to_iface)) for s in socks}
    fw = router_cfg.profile.firewall
    declared = {(p.proto, p.port, p.zone) for p in fw.ports} | {(p.proto, p.port, p.zone) for p in fw.clients}
    assert seen == declared, f"listening: {sorted(seen)}\ndeclared: {sorted(declared)}\nraw: {socks}"
    assert not any(z == "wan" for _, _, z in seen - {(p.proto, p.port, p.zone) for p in fw.clients})


# --------------------------------------------------------------------------- LAN services


def test_dhcp_lease_and_dns_on_lan(router_a, lan):
    client = lan.add_client(lan.name + "-cl", mac="52:54:00:c1:00:01")
    r = run(["ip", "netns", "exec", lan.name + "-cl", "busybox", "udhcpc", "-i", client, "-n", "-q", "-f",
             "-t", "8", "-T", "3", "-x", "hostname:officepc", "-s", "/bin/true"], capture=True, timeout=90)
    out = r.stdout + r.stderr
    m = re.search(r"lease of (10\.44\.0\.\d+) obtained", out)
    assert m, out
    leased = m.group(1)
    assert 100 <= int(leased.rsplit(".", 1)[1]) <= 199  # the router's declared pool
    leases = router_a.run("cat /var/lib/misc/dnsmasq.leases").stdout
    assert "52:54:00:c1:00:01" in leases and leased in leases
    # DNS on the LAN: the client's DHCP name and the router's own name.
    ns = run(["ip", "netns", "exec", lan.name, "busybox", "nslookup", "officepc.lan", "10.44.0.1"],
             capture=True).stdout
    assert leased in ns, ns
    ns = run(["ip", "netns", "exec", lan.name, "busybox", "nslookup", "rt-alpha.lan", "10.44.0.1"],
             capture=True).stdout
    assert "10.44.0.1" in ns.split("Name:")[-1], ns


def test_dhcp_reservation_and_name_for_site_node(router_a, lan):
    client = lan.add_client(lan.name + "-nas", mac="52:54:00:c1:00:02")
    r = run(["ip", "netns", "exec", lan.name + "-nas", "busybox", "udhcpc", "-i", client, "-n", "-q", "-f",
             "-t", "8", "-T", "3", "-s", "/bin/true"], capture=True, timeout=90)
    assert "lease of 10.44.0.20 obtained" in r.stdout + r.stderr, r.stdout + r.stderr
    ns = run(["ip", "netns", "exec", lan.name, "busybox", "nslookup", "nas.lan", "10.44.0.1"], capture=True).stdout
    assert "10.44.0.20" in ns.split("Name:")[-1], ns


def test_lan_address_and_wan_dhcp(router_a):
    host = router_a.host()
    assert "10.44.0.1/24" in host.check_output("ip -br addr show lan")
    assert "10.0.2.15/" in host.check_output("ip -br addr show wan")  # DHCP from the WAN side


def test_lan_address_from_seed(router_b):
    assert "10.77.0.1/24" in router_b.run("ip -br addr show lan").stdout
    rng = router_b.run("cat /etc/dnsmasq.d/50-lan-range.conf").stdout
    assert "dhcp-range=lan,10.77.0.100,10.77.0.199" in rng, rng
    assert "host-record=rt-beta.lan,rt-beta,10.77.0.1" in rng, rng


def test_dnsmasq_running(router_a):
    assert router_a.host().service("dnsmasq").is_running


def test_wireguard_absent_without_seed_keys(router_a):
    assert router_a.run("ip link show wg0", check=False).returncode != 0


def test_wireguard_from_seed(router_b):
    assert router_b.run("sudo -n wg show wg0 public-key").stdout.strip() == router_b.extra["wg_public"]
    assert router_b.extra["peer_public"] in router_b.run("sudo -n wg show wg0 peers").stdout
    assert "10.45.0.1/24" in router_b.run("ip -br addr show wg0").stdout
    # Its port is opened on the WAN by the seed, nothing else.
    assert '"wan" . udp . 51820' in router_b.run("sudo -n nft list set inet filter seed_ports").stdout
    assert wireguard_public(router_b.run("sudo -n wg showconf wg0").stdout.split("PrivateKey = ")[1].split()[0]) \
        == router_b.extra["wg_public"]
    # Key material stays root/systemd-network only.
    mode = router_b.run("stat -c %a:%U:%G /etc/systemd/network/30-wg0.netdev").stdout.strip()
    assert mode == "640:root:systemd-network"


# --------------------------------------------------------------------------- hardening controls


def test_hardening_sysctls(router_a, router_cfg):
    host = router_a.host()
    expected = router_cfg.profile.effective_sysctl()
    assert expected["net.ipv4.ip_forward"] == "1"  # the router's declared exception
    wrong = {}
    for key, value in expected.items():
        actual = host.run(f"sysctl -n {key}").stdout.strip()
        if actual != value:
            wrong[key] = (actual, value)
    assert not wrong, f"sysctl (actual, expected): {wrong}"


def test_unused_modules_blacklisted(router_a, router_cfg):
    host = router_a.host()
    for mod in router_cfg.profile.module_blacklist:
        out = host.run(f"/usr/sbin/modprobe -n -v {mod}").stdout + host.run(f"/usr/sbin/modprobe -n -v {mod}").stderr
        assert "install /bin/true" in out, f"{mod}: {out}"


def test_login_defs_and_account_files(router_a):
    host = router_a.host()
    defs = host.file("/etc/login.defs").content_string
    assert re.search(r"^UMASK\s+027$", defs, re.M)
    assert re.search(r"^ENCRYPT_METHOD\s+SHA512$", defs, re.M)
    shadow = host.file("/etc/shadow")
    assert shadow.mode == 0o640 and shadow.user == "root" and shadow.group == "shadow"
    passwd = host.file("/etc/passwd")
    assert passwd.mode == 0o644 and passwd.user == "root"


def test_no_account_has_a_usable_password(router_a):
    for line in router_a.run("sudo -n cat /etc/shadow").stdout.splitlines():
        name, pw = line.split(":")[:2]
        assert pw[:1] in ("*", "!"), f"{name} has a usable password"


def test_apparmor_enabled(router_a):
    host = router_a.host()
    assert host.file("/sys/module/apparmor/parameters/enabled").content_string.strip() == "Y"
    assert host.run("aa-status --enabled").rc == 0
    assert host.service("apparmor").is_running or host.service("apparmor").is_enabled


def test_journald_persistent_and_capped(router_a):
    host = router_a.host()
    assert host.file("/var/log/journal").is_directory
    assert host.run("find /var/log/journal -name '*.journal' | grep -q .").rc == 0
    conf = host.file("/etc/systemd/journald.conf.d/50-sohocloud.conf").content_string
    assert "Storage=persistent" in conf and re.search(r"^SystemMaxUse=\d+M", conf, re.M)


def test_core_dumps_disabled(router_a):
    assert router_a.run("ulimit -Hc").stdout.strip() == "0"  # the admin's login session
    assert router_a.run("sudo -n sysctl -n fs.suid_dumpable").stdout.strip() == "0"
    assert "DefaultLimitCORE=0" in router_a.run("sudo -n systemctl show -p DefaultLimitCORE").stdout


def test_root_fills_a_larger_card(router_a, router_images):
    """Router A's disk is 2 GiB, larger than its image: a card image's root grows into it on first
    boot (MBR entry, partx, resize2fs); a qemu image's root stays as built."""
    manifest = json.loads(Path(str(router_images["a"]) + ".manifest.json").read_text())
    size = int(router_a.run("df -B1 --output=size / | tail -n1").stdout)
    log = router_a.run("sudo journalctl -b -u sohocloud-firstboot --no-pager").stdout
    root = next(p for p in manifest["partitions"] if p["type"] == "root")
    if manifest.get("grow_root"):
        assert "grow root: " in log and "now fills" in log, log[-2000:]
        assert size > (2 << 30) - root["start"] - (128 << 20), f"root is {size >> 20} MiB on a 2 GiB card"
        parts = router_a.run("cat /proc/partitions").stdout
        assert re.search(r"\b(\d+)\s+vda2$", parts, re.M)
    else:
        assert "grow root" not in log
        assert size <= root["size"]


def test_no_build_time_helper_left_in_the_image(router_a):
    """A foreign-arch build runs host tools in the tree during the install (builder/image/distro/debian-native/): none
    of them, their diversion or backup may reach the image; the packaged binaries are back."""
    assert router_a.run("test -e /.sohocloud-native", check=False).returncode == 1
    diversions = router_a.run("dpkg-divert --list").stdout
    assert "sohocloud" not in diversions, diversions
    assert router_a.run("test -e /var/lib/dpkg/diversions-old", check=False).returncode == 1
    for binary in ("/usr/bin/python3.11", "/usr/bin/perl"):
        head = router_a.run(f"head -c4 {binary} | od -An -c").stdout.split()
        assert head == ["177", "E", "L", "F"], (binary, head)
    # The standard library came with its bytecode (compiled natively for a foreign arch).
    assert router_a.run("test -f /usr/lib/python3.11/__pycache__/os.cpython-311.pyc", check=False).returncode == 0
    # Every file the packages install is theirs again (docs and man pages are never unpacked).
    verify = router_a.run("dpkg --verify python3.11-minimal libpython3.11-minimal perl-base", check=False).stdout
    assert [line for line in verify.splitlines() if not line.startswith("missing ")] == [], verify


def test_no_failed_units(router_a):
    failed = router_a.run("sudo -n systemctl --failed --no-legend --plain").stdout.strip()
    assert failed == "", failed
