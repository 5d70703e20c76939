"""`sohocloud fleet test`: the cross-node checks on a site that is up.

Every check talks to the real services over the site LAN (inside the site's
network namespace) or runs on the nodes over SSH as admin; nothing is faked.
What the site is (its nodes, their roles' services, their images) comes from the
record of the build it was booted from. The boot tests
(tests/boot/test_fleet_site.py) run these same checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets as pysecrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SohoError
from ..machine.qemu import image_info
from .record import NodeRecord, SiteRecord
from .running import WAN_GATEWAY, WAN_PROBE_PORTS, WAN_SEAT, FleetPaths, booted_record, read_state
from .secrets import wireguard_public
from .sitefile import Site, SiteNode
from .netlab import Netns
from .vpnpeer import VpnPeer

log = logging.getLogger("sohocloud.fleet")


class CheckFailed(AssertionError):
    pass


def expect(ok: bool, msg: str) -> None:
    if not ok:
        raise CheckFailed(msg)


@dataclass
class FleetProbe:
    record: SiteRecord  # of the build the site was booted from
    out: Path
    secrets: Path  # secrets/<site>
    identity: str
    netns: str

    @classmethod
    def open(cls, site_name: str, out: Path, secrets: Path, identity: str) -> FleetProbe:
        paths = FleetPaths(out, site_name)
        record = booted_record(paths, site_name)
        return cls(record, out, secrets, identity, read_state(paths)["netns"])

    # ------------------------------------------------------------------ access

    @property
    def site(self) -> Site:
        return self.record.site

    @property
    def paths(self) -> FleetPaths:
        return FleetPaths(self.out, self.site.name)

    def manifest(self, node: SiteNode) -> dict:
        return image_info(self.node_record(node).image.resolve(self.out))

    def nodes_with(self, predicate: Callable[[dict], bool]) -> list[SiteNode]:
        return [n for n in self.site.nodes if predicate(self.manifest(n))]

    def node_record(self, node: SiteNode) -> NodeRecord:
        """What `fleet build` recorded of the node: its role's services, cluster, images, vars."""
        return self.record.node(node.name)

    def in_netns(self, argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True, **kw)

    def ssh(self, node: SiteNode, command: str, *, stdin: str | bytes | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        known = self.paths.known_hosts
        argv = ["ip", "netns", "exec", self.netns, "ssh", "-i", self.identity, "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known}",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", f"admin@{node.address}", command]
        binary = isinstance(stdin, bytes)
        p = subprocess.run(argv, input=stdin, capture_output=True, text=not binary, timeout=timeout)
        if check and p.returncode != 0:
            err = p.stderr if not binary else p.stderr.decode(errors="replace")
            raise CheckFailed(f"{node.name}: `{command}` failed ({p.returncode}): {err.strip()[-500:]}")
        return p

    def provider(self, service: str) -> SiteNode:
        node = self.record.provider(service)
        if node is None:
            raise CheckFailed(f"no node provides {service}")
        return node

    def users_of(self, service: str) -> list[SiteNode]:
        return [n for n in self.site.nodes if service in self.node_record(n).consumes]


def retry(fn: Callable[[], None], timeout: float, every: float = 5) -> None:
    """Run *fn* until it passes or *timeout* runs out (services converge after boot)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
            return
        except CheckFailed:
            if time.monotonic() > deadline:
                raise
            time.sleep(every)


# --------------------------------------------------------------------------- checks


def dns_query(probe: FleetProbe, server: str, name: str, netns: str | None = None) -> list[str]:
    """A-record lookup straight at the router's DNS, from the host's seat on the LAN (or *netns*)."""
    script = ("import socket,struct,sys\n"
              "name=sys.argv[2]\n"
              "q=struct.pack('>HHHHHH',0x5c5c,0x0100,1,0,0,0)+b''.join(bytes([len(p)])+p.encode() for p in name.split('.'))"
              "+b'\\0'+struct.pack('>HH',1,1)\n"
              "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3);s.sendto(q,(sys.argv[1],53))\n"
              "r=s.recv(512);an=struct.unpack('>H',r[6:8])[0];i=len(q);out=[]\n"
              "for _ in range(an):\n"
              "  i+=2 if r[i]&0xc0==0xc0 else r.index(b'\\0',i)+1-i\n"
              "  t,c,ttl,l=struct.unpack('>HHIH',r[i:i+10]);i+=10\n"
              "  out.append('.'.join(map(str,r[i:i+l])) if t==1 else '');i+=l\n"
              "print(' '.join(a for a in out if a))\n")
    p = subprocess.run(["ip", "netns", "exec", netns or probe.netns, "python3", "-c", script, server, name],
                       capture_output=True, text=True, timeout=20)
    return p.stdout.split() if p.returncode == 0 else []


def check_dns_and_reservations(probe: FleetProbe) -> None:
    """Every node has its DHCP reservation on the router and its DNS name answers there."""
    gw = probe.site.node(probe.site.gateway)
    conf = probe.ssh(gw, "sudo cat /etc/dnsmasq.d/60-site-hosts.conf").stdout
    for n in probe.site.nodes:
        expect(n == gw or f"{n.mac},{n.address}" in conf, f"router has no DHCP reservation for {n.name}")
        fqdn = f"{n.name}.{probe.site.domain}"
        got = dns_query(probe, gw.address, fqdn)
        expect(got == [n.address], f"router DNS: {fqdn} -> {got}, expected {n.address}")


def swarm_status(node_ls: str) -> dict[str, str]:
    """`docker node ls` lines (hostname, status) -> hostname -> status; Ready wins for a name listed
    twice (a re-imaged node may leave a Down entry under its name for a while). An entry without a
    hostname is no member's: a node still joining, or one a retried join left behind (it stays
    `Unknown` for good); members are judged by their names only."""
    status: dict[str, str] = {}
    for line in node_ls.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        host, state = fields
        status[host] = "Ready" if "Ready" in (state, status.get(host)) else state
    return status


def check_cluster(probe: FleetProbe, nodes: list[SiteNode] | None = None) -> None:
    """The cluster lists every member (of *nodes*, default all) Ready, labelled with its role."""
    manager = probe.provider("cluster")
    members = {n.name: n.role for n in (probe.site.nodes if nodes is None else nodes)
               if probe.node_record(n).cluster != "none"}

    def ready() -> None:
        out = probe.ssh(manager, "sudo docker node ls --format '{{.Hostname}} {{.Status}}'").stdout
        status = swarm_status(out)
        expect(all(status.get(m) == "Ready" for m in members), f"swarm nodes: {status}, expected {sorted(members)}")
        fmt = "{{.Description.Hostname}} {{index .Spec.Labels \"sohocloud.role\"}}"
        labels = probe.ssh(manager, f"sudo docker node inspect --format '{fmt}' $(sudo docker node ls -q)").stdout
        got = dict(line.split() for line in labels.splitlines() if len(line.split()) == 2)
        if nodes is not None:  # the others (one switched off, say) are not asked about
            got = {name: role for name, role in got.items() if name in members}
        expect(got == members, f"role labels {got}, expected {members}")

    retry(ready, 240)


def check_overlay_encrypted(probe: FleetProbe) -> None:
    """The swarm's routing-mesh overlay (ingress) is an encrypted network, and every member holds
    ESP security associations with the manager: overlay traffic between nodes is IPsec, not plain
    VXLAN."""
    manager = probe.provider("cluster")
    members = [n for n in probe.site.nodes if probe.node_record(n).cluster != "none"]
    opts = probe.ssh(manager, "sudo docker network inspect ingress --format '{{json .Options}}'").stdout
    expect("encrypted" in json.loads(opts or "{}"), f"the ingress network's options: {opts.strip()}")
    for n in members:
        if n == manager:
            continue
        def keyed(n=n) -> None:
            states = probe.ssh(n, "sudo ip xfrm state").stdout
            pairs = set(re.findall(r"^src (\S+) dst (\S+)\n\s+proto esp", states, re.M))
            expect({(n.address, manager.address), (manager.address, n.address)} <= pairs,
                   f"{n.name}: no ESP both ways with {manager.name} (has {sorted(pairs)})")
        retry(keyed, 120)


def check_ldap_users(probe: FleetProbe) -> None:
    """`getent passwd` finds every site user on each node that takes its people from LDAP."""
    for n in probe.users_of("ldap"):
        for u in probe.site.users:
            def found(n=n, u=u) -> None:
                line = probe.ssh(n, f"getent passwd {u.name}", check=False).stdout.strip()
                expect(line.split(":")[2:3] == [str(u.uid)], f"{n.name}: getent passwd {u.name} -> {line!r}")
            retry(found, 180)


def _nas_file(probe: FleetProbe) -> tuple[SiteNode, SiteNode, str, str, str]:
    ws = probe.users_of("nas")[0]
    nas = probe.provider("nas")
    user = probe.site.users[0].name
    return ws, nas, user, "fleet-check.txt", f"written on {ws.name} by {user}\n"


def check_nas_home(probe: FleetProbe) -> None:
    """A user's file written on a workstation host (NFS home) is read back on storage."""
    ws, nas, user, name, text = _nas_file(probe)
    token = pysecrets.token_hex(8)
    body = text + token + "\n"

    def write() -> None:
        probe.ssh(ws, f"sudo -u {user} sh -c 'cat > /nas/home/{user}/{name}'", stdin=body)
    retry(write, 180)
    stat = probe.ssh(nas, f"sudo stat -c '%U %a' /nas/home/{user}/{name}").stdout.split()
    expect(stat[0] == user, f"the file on the NAS belongs to {stat[0]}, not {user}")
    got = probe.ssh(nas, f"sudo cat /nas/home/{user}/{name}").stdout
    expect(got == body, f"storage reads {got!r}, expected {body!r}")


def check_samba(probe: FleetProbe) -> None:
    """The same file through Samba (SMB3, encrypted), with the user's password."""
    ws, nas, user, name, text = _nas_file(probe)
    password = (probe.secrets / "users" / f"{user}.password").read_text().strip()
    with tempfile.NamedTemporaryFile("w", prefix="sohocloud-smb.", suffix=".auth") as auth:
        auth.write(f"username = {user}\npassword = {password}\n")
        auth.flush()
        p = probe.in_netns(["smbclient", f"//{nas.address}/{user}", "-A", auth.name, "-m", "SMB3",
                            "--option=client smb encrypt=required", "-c", f"get {name} -"], timeout=60)
    expect(p.returncode == 0 and p.stdout.startswith(text),
           f"smbclient: rc {p.returncode}: {p.stdout[-300:]} {p.stderr[-300:]}")


def check_prometheus(probe: FleetProbe) -> None:
    """Prometheus on the metrics node has every node's exporter up."""
    prom = probe.provider("metrics")
    want = {f"{n.name}.{probe.site.domain}:9100" for n in probe.users_of("metrics")}
    script = ("import json,urllib.request,sys;"
              f"d=json.load(urllib.request.urlopen('http://{prom.address}:9090/api/v1/targets',timeout=10));"
              "print(json.dumps({t['labels']['instance']:t['health'] for t in d['data']['activeTargets']"
              " if t['labels']['job']=='node'}))")

    def up() -> None:
        health = json.loads(probe.ssh(prom, f'python3 -c "{script}"').stdout)
        expect(set(health) == want and all(v == "up" for v in health.values()), f"exporters: {health}")
    retry(up, 180)


def check_journals(probe: FleetProbe) -> None:
    """Every node's journal reaches the log sink, each into its own file: the sink disposed of none
    (journal-remote starts a new file, 8 MB, whenever a node's entries are from the sink's future)."""
    sink = probe.provider("logs")
    want = {n.name for n in probe.users_of("logs")}

    def arrived() -> None:
        out = probe.ssh(sink, "sudo journalctl -D /var/log/journal/remote -F _HOSTNAME").stdout.split()
        expect(want <= set(out), f"journals from {sorted(set(out))}, missing {sorted(want - set(out))}")
    retry(arrived, 180)
    disposed = probe.ssh(sink, "sudo find /var/log/journal/remote -name '*.journal~' -printf '%f\\n'").stdout.split()
    expect(not disposed, f"the sink disposed of {len(disposed)} journal files (a node's clock ahead of "
           f"the sink's?): {', '.join(sorted(disposed)[:5])}")


TIME_TOLERANCE = 0.5  # seconds a node's clock may be off the time server's


def tracking_problem(tracking_csv: str, server_address: str) -> str | None:
    """What is wrong with a node's `chronyc -n -c tracking` line (reference id, reference address,
    stratum, reference time, system time offset in s, ...), given the site's time server; None: nothing."""
    fields = tracking_csv.strip().split(",")
    if len(fields) < 5 or fields[1] != server_address:
        return f"follows {fields[1] if len(fields) > 1 and fields[1] else 'nothing'}"
    try:
        offset = float(fields[4])
    except ValueError:
        return f"reports {tracking_csv.strip()!r}"
    return f"is {offset:+.3f} s off" if abs(offset) > TIME_TOLERANCE else None


def check_time(probe: FleetProbe) -> None:
    """Every node keeps the site's time: its chrony follows the time server (the router), within half a
    second (one-time codes, certificates and the log sink depend on one time)."""
    server = probe.provider("time")

    def synced() -> None:
        problems = []
        for n in probe.users_of("time"):
            if n != server:
                out = probe.ssh(n, "sudo chronyc -n -c tracking", check=False).stdout
                if problem := tracking_problem(out, server.address):
                    problems.append(f"{n.name} {problem}")
        expect(not problems, "; ".join(problems) + f" (time server: {server.name}, {server.address})")
    retry(synced, 300, every=10)


# Seconds a workstation host may take after its boot to fetch its desktop template (~110 MB from
# the PXE server) and mount it: an emulated host beside five other VMs on two cores is slow.
TEMPLATE_TIMEOUT = 900
TEMPLATE = "/var/lib/sohocloud-desk/template"  # (sohocloud_desk.container.TEMPLATE on the node)
# Never in the desktop template (profiles/desktop.yaml): a package manager, sudo, a compiler.
LOCKED_OUT = ("apt", "apt-get", "dpkg", "dpkg-deb", "sudo", "cc", "gcc", "c++", "tcc", "make")
PANEL_TLS_SCRIPT = r"""
import socket, ssl, sys
ca, address, name = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)  # the site CA only, the host's own name checked
with socket.create_connection((address, 443), timeout=20) as s, ctx.wrap_socket(s, server_hostname=name) as t:
    t.sendall(b"GET / HTTP/1.0\r\nHost: " + name.encode() + b"\r\n\r\n")
    answer = b""
    while chunk := t.recv(65536):
        answer += chunk
    print(answer.decode(errors="replace"))
"""


REACH_SCRIPT = r"""
import socket, sys
def reach(address, port):
    try:
        socket.create_connection((address, port), timeout=10).close()
        return "ok"
    except OSError as e:
        return str(e.errno)
print("lan:" + reach(sys.argv[1], 53), "beyond:" + reach("127.0.0.1", 9))
"""


def check_desktops(probe: FleetProbe) -> None:
    """Every workstation host has the site's desktop template mounted read-only (the squashfs its
    seed names, fetched from the PXE server and checked by sha256), locked down (no setuid or
    setgid file, no package manager, sudo or compiler); a person's processes (a session's traffic)
    reach the LAN and nothing beyond; its sign-in panel answers HTTPS from the LAN with a
    certificate of the site CA for the host's name."""
    hosts = probe.users_of("desktops")
    expect(bool(hosts), "no node of this site uses desktops")
    for n in hosts:
        template = probe.node_record(n).images[0]

        def mounted(n=n, sha=template.sha256) -> None:
            out = probe.ssh(n, f"findmnt -no FSTYPE,OPTIONS {TEMPLATE}; sudo cat {TEMPLATE}.squashfs.sha256",
                            check=False).stdout.split()
            expect(len(out) == 3, f"{n.name}: no desktop template mounted at {TEMPLATE} yet")
            fstype, options, got = out[0], set(out[1].split(",")), out[2]
            expect(fstype == "squashfs" and {"ro", "nosuid", "nodev"} <= options, f"{n.name}: {TEMPLATE}: {out}")
            expect(got == sha, f"{n.name}: the template's sha256 is {got}, the build's {sha}")
        retry(mounted, TEMPLATE_TIMEOUT, every=10)
        # A symlink in the template points into the template's own tree, not the host's: -L as well as -e.
        found = probe.ssh(n, f"sudo find {TEMPLATE} -xdev -type f -perm /6000; for t in {' '.join(LOCKED_OUT)}; do "
                             f"for d in usr/bin usr/sbin usr/local/bin; do p={TEMPLATE}/$d/$t; "
                             "{ test -e $p || test -L $p; } && echo $d/$t; done; done; "
                             f"test -x {TEMPLATE}/usr/bin/Xtigervnc && echo Xtigervnc; true").stdout.split()
        expect(found == ["Xtigervnc"], f"{n.name}: the template has Xvnc and none of the locked-out files: {found}")
        # A session's traffic leaves the host as its person: the LAN answers them (the router's DNS),
        # anything else is refused on the host itself (its firewall's admin-prohibited: EHOSTUNREACH at
        # once, nothing sent). The
        # probe beyond is this host's own loopback: the same drop rule, and harmless were it broken
        # (a real address beyond the router would be someone's, and no test traffic leaves the site).
        gw = probe.site.node(probe.site.gateway)
        reach = probe.ssh(n, f"sudo -u {probe.site.users[0].name} python3 -c '{REACH_SCRIPT}' {gw.address}",
                          check=False).stdout.split()
        expect(reach == ["lan:ok", "beyond:113"], f"{n.name}: a person's process reaches {reach} (expected the "
                                                   "LAN only: lan:ok, beyond:113 = refused by the host's firewall)")
        fqdn = f"{n.name}.{probe.site.domain}"
        p = probe.in_netns(["python3", "-c", PANEL_TLS_SCRIPT, str(probe.secrets / "ca.crt"), n.address, fqdn],
                           timeout=60)
        expect(p.returncode == 0 and p.stdout.startswith("HTTP/1.") and "Sign in" in p.stdout,
               f"{n.name}: the panel over HTTPS (site CA, {fqdn}): rc {p.returncode} {p.stdout[:200]!r} "
               f"{p.stderr[-300:]}")


# A full TCP connect scan from the host's seat on the site LAN (inside the site's namespace:
# the nodes' firewalls open ports per interface, so the seat sees what any LAN client sees).
# It runs in this host's native Python, one process per node: a scanner on a TCG guest took
# 3-15 min of emulated Python and slowed every VM beside it. A dropped port never answers;
# each batch gets 2.5 s (the kernel resends an unanswered SYN at 1 s).
SCANNER = r"""
import errno, multiprocessing, resource, select, socket, sys, time

BATCH, WAIT = 4000, 2.5

def scan(host):
    open_ports = []
    for start in range(1, 65536, BATCH):
        socks = {}
        for port in range(start, min(start + BATCH, 65536)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):  # a port we could not try is not a closed port
                # (OSError, not SystemExit: a pool worker hands an Exception back; SystemExit kills it)
                raise OSError(err, f"connect {host}:{port}: {errno.errorcode.get(err, err)}")
            socks[s.fileno()] = (s, port)
        poller = select.poll()
        for fd in socks:
            poller.register(fd, select.POLLOUT)
        pending, t0 = set(socks), time.monotonic()
        while pending and time.monotonic() - t0 < WAIT:
            for fd, _ev in poller.poll(250):
                pending.discard(fd)
                poller.unregister(fd)
                s, port = socks[fd]
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    open_ports.append(port)
        for s, _ in socks.values():
            s.close()
    return host, sorted(open_ports)

if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, BATCH + 256)), hard))
    with multiprocessing.Pool(len(sys.argv) - 1) as pool:
        for host, ports in pool.imap(scan, sys.argv[1:]):
            print(host, *ports, flush=True)
"""

SECOND_LOOK = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()"


def scan_ports(probe: "FleetProbe", addresses: list[str], timeout: float = 600) -> dict[str, list[int]]:
    """Open TCP ports per address, as the host's seat on the site LAN sees them."""
    with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
        f.write(SCANNER)
        f.flush()
        try:
            r = probe.in_netns([sys.executable, f.name, *addresses], timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"port scan of {', '.join(addresses)}: no answer within {timeout:.0f} s") from None
    if r.returncode != 0:
        raise CheckFailed(f"port scan failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return {h: [int(x) for x in rest] for h, *rest in (line.split() for line in r.stdout.splitlines())}


def check_port_scan(probe: FleetProbe) -> None:
    """A full TCP scan from the LAN sees exactly each node's declared LAN ports."""
    # The seat is no site node: ports open to the site's nodes only (a cluster's) are closed to it.
    declared = {n.address: sorted({p["port"] for p in probe.manifest(n)["ports"]
                                   if p["zone"] == "lan" and p["proto"] == "tcp" and p.get("peers", "any") == "any"})
                for n in probe.site.nodes}
    seen = scan_ports(probe, list(declared))
    problems = []
    for n in probe.site.nodes:
        opened = seen.get(n.address, [])
        # A declared port the scan missed gets one unhurried second look (one connect, 10 s)
        # before it counts as closed: a busy guest is not a closed port.
        for port in sorted(set(declared[n.address]) - set(opened)):
            if probe.in_netns([sys.executable, "-c", SECOND_LOOK, n.address, str(port)], timeout=60).returncode == 0:
                opened = sorted([*opened, port])
        if opened != declared[n.address]:
            problems.append(f"{n.name}: open {opened}, declared {declared[n.address]}")
    expect(not problems, "; ".join(problems))


# A LAN client that takes a lease from the router's DHCP pool (busybox udhcpc: the script only
# puts the offered address on the interface; the lease is released on exit).
UDHCPC_SCRIPT = """#!/bin/sh
[ "$1" = bound ] && ip addr add "$ip/$mask" dev "$interface"
exit 0
"""
REACH_EACH = r"""
import concurrent.futures, socket, sys
def reach(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close(); return target, 1
    except OSError:
        return target, 0
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    for target, ok in pool.map(reach, sys.argv[1:]):
        print(target, ok)
"""


def lan_stranger(probe: FleetProbe, name: str) -> tuple[str, str]:
    """A namespace *name* on the site LAN holding a lease from the router's DHCP pool: (name, address)."""
    known = {n.mac for n in probe.site.nodes}
    mac = next(m for m in (f"52:54:00:ee:ee:{i:02x}" for i in range(256)) if m not in known)
    try:
        inner = Netns(probe.netns).add_client(name, mac)
        with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
            f.write(UDHCPC_SCRIPT)
        Path(f.name).chmod(0o700)
        p = subprocess.run(["ip", "netns", "exec", name, "busybox", "udhcpc", "-i", inner, "-n", "-q", "-f",
                            "-t", "10", "-T", "3", "-s", f.name], capture_output=True, text=True, timeout=90)
        Path(f.name).unlink()
        got = re.search(r"lease of ([0-9.]+) obtained", p.stdout + p.stderr)
        expect(got is not None, f"no DHCP lease from the router's pool: {(p.stdout + p.stderr)[-400:]}")
        return name, got.group(1)
    except BaseException:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        raise


def check_members_only(probe: FleetProbe) -> None:
    """A cluster's own ports (declared `peers: site`) answer the site's nodes only: a LAN client with
    a lease from the router's DHCP pool reaches each node's other services but none of these. (The
    site's members reach them: the `cluster` check.)"""
    gw = probe.site.node(probe.site.gateway)
    ns, address = lan_stranger(probe, f"{probe.netns}-dhcp")
    try:
        expect(address not in {n.address for n in probe.site.nodes}, f"the pool gave a node's address {address}")
        closed, control = [], []
        for n in probe.site.nodes:
            ports = probe.manifest(n)["ports"]
            site_only = sorted({p["port"] for p in ports if p["proto"] == "tcp" and p.get("peers") == "site"})
            if site_only:
                closed += [f"{n.address}:{port}" for port in site_only]
                control.append(f"{n.address}:22")  # the same node answers the stranger's ssh
        expect(bool(closed), "no node declares a port for the site's nodes only")
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", REACH_EACH, *control, *closed],
                           capture_output=True, text=True, timeout=120)
        seen = dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)
        expect(all(seen.get(t) == "1" for t in control), f"the DHCP client {address} reaches no ssh: {seen} "
                                                         f"{p.stderr[-300:]} (gateway {gw.address})")
        answered = [t for t in closed if seen.get(t) != "0"]
        expect(not answered, f"cluster ports answer the DHCP client {address}: {answered}")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


LISTEN_ONCE = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
try:
    while True:
        s.accept()[0].close()
except OSError:
    pass
"""


def check_vpn(probe: FleetProbe) -> None:
    """A WireGuard peer (the site's first peer sohocloud made a key for) connects to the router from
    the WAN side and reaches exactly what the site's `vpn.reach` names: those ports answer, the
    same nodes' other ports and every other node do not, nor does the internet beyond the router
    (a listener on the WAN side that the router itself reaches)."""
    vpn = probe.site.vpn
    if vpn is None:
        return  # the site has no VPN
    gw = probe.site.node(probe.site.gateway)
    keys = probe.secrets / "wireguard"
    peer = next((p for p in vpn.peers if (keys / "peers" / f"{p.name}.key").is_file()), None)
    expect(peer is not None, "no VPN peer with a key sohocloud made (secrets/<site>/wireguard/peers/)")
    router_public = wireguard_public((keys / f"{gw.name}.key").read_text().strip())
    client = VpnPeer.start(probe.netns, (keys / "peers" / f"{peer.name}.key").read_text().strip(), peer.address,
                           router_public, f"{WAN_GATEWAY}:{vpn.port}")
    wan_port = 29998
    listener = subprocess.Popen(["ip", "netns", "exec", probe.netns, sys.executable, "-c", LISTEN_ONCE,
                                 WAN_SEAT, str(wan_port), "300"], stdout=subprocess.PIPE, text=True)
    try:
        listener.stdout.readline()
        allowed = [f"{probe.site.node(r.node).address}:{r.port}" for r in vpn.reach if r.proto == "tcp" and r.port]
        nodes = {r.node for r in vpn.reach if r.port is None}
        refused = [f"{n.address}:{port}" for n in probe.site.nodes if n.name not in nodes
                   for port in (22, 443, 636, 9100)
                   if f"{n.address}:{port}" not in allowed] + [f"{WAN_SEAT}:{wan_port}"]

        def reached() -> None:
            p = client.exec([sys.executable, "-c", REACH_EACH, *allowed])
            seen = dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)
            expect(all(seen.get(t) == "1" for t in allowed),
                   f"the VPN peer {peer.name} ({peer.address}) does not reach {allowed}: {seen} "
                   f"(last handshake: {client.handshake_age()} s ago) {p.stderr[-300:]}")
        retry(reached, 90)
        for r in vpn.reach:
            if r.proto == "udp" and r.port == 53 and r.node == gw.name:
                got = dns_query(probe, gw.address, f"{gw.name}.{probe.site.domain}", netns=client.netns)
                expect(got == [gw.address], f"the VPN peer asked the router's DNS for {gw.name}: {got}")
        p = client.exec([sys.executable, "-c", REACH_EACH, *refused])
        seen = dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)
        answered = [t for t in refused if seen.get(t) != "0"]
        expect(not answered, f"the VPN peer reaches what the site does not give it: {answered}")
        # The WAN-side listener is there (the router reaches it), so the refusal was the router's.
        probe.ssh(gw, f"python3 -c 'import socket; socket.create_connection((\"{WAN_SEAT}\", {wan_port}), 10).close()'")
    finally:
        listener.kill()
        client.close()


# Each probe speaks the port's protocol, so a service that is reached answers (a refused or
# dropped connection and a silent socket all count as closed).
WAN_PROBE_SCRIPT = r"""
import concurrent.futures as cf, socket, ssl, struct, sys
HTTP = b"GET / HTTP/1.0\r\n\r\n"
DNS = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x02gw\x00\x00\x01\x00\x01"
def probe(arg):
    port = int(arg)
    try:
        s = socket.create_connection((sys.argv[1], port), timeout=3)
        s.settimeout(4)
        if port in (443, 636, 7443):
            ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
            try:
                ctx.wrap_socket(s).close(); return port, 1          # handshake done: reached
            except ssl.SSLEOFError: return port, 0
            except ssl.SSLError: return port, 1                       # an alert came back: reached
        if port == 53: s.sendall(struct.pack(">H", len(DNS)) + DNS)
        elif port != 22: s.sendall(HTTP)
        return port, len(s.recv(64))
    except OSError:
        return port, 0
with cf.ThreadPoolExecutor(16) as ex:
    for port, n in ex.map(probe, sys.argv[2:]): print(port, n)
"""


def check_wan_closed(probe: FleetProbe) -> None:
    """From the WAN side (the host's seat on the gateway's WAN bridge) nothing of the router answers
    but its declared WAN openings (the VPN's UDP port)."""
    p = probe.in_netns(["python3", "-c", WAN_PROBE_SCRIPT, WAN_GATEWAY, *map(str, WAN_PROBE_PORTS)], timeout=120)
    expect(p.returncode == 0, f"WAN probe failed: {p.stderr[-300:]}")
    answered = [line for line in p.stdout.splitlines() if line.split()[1] != "0"]
    expect(not answered, f"answered from the WAN side: {answered}")


def check_backup_restore(probe: FleetProbe) -> None:
    """A backup then a restore on storage returns the same bytes."""
    nas = probe.provider("nas")
    data = pysecrets.token_bytes(256 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    path = f"{probe.node_record(nas).vars['nas_root']}/shared/backup-check.bin"
    probe.ssh(nas, f"sudo tee {path} >/dev/null", stdin=data)
    probe.ssh(nas, "sudo systemctl start sohocloud-backup.service", timeout=300)
    probe.ssh(nas, f"sudo rm {path}; sudo rm -rf /tmp/restore")
    probe.ssh(nas, "sudo sohocloud-restore latest /tmp/restore", timeout=300)
    got = probe.ssh(nas, f"sudo sha256sum /tmp/restore{path}").stdout.split()[0]
    probe.ssh(nas, "sudo rm -rf /tmp/restore")
    expect(got == digest, f"restored sha256 {got}, backed up {digest}")


# What systemd (PID 1) logs when a unit was never started because something it needs did not
# come: such a unit is left inactive, not failed, so `systemctl --failed` does not show it.
HELD_BACK_RE = re.compile(r"(?m)^(?:Dependency failed for .*|Timed out waiting for device .*)$")


def check_units(probe: FleetProbe, nodes: list[SiteNode] | None = None) -> None:
    """No failed unit on any node (or these *nodes*), none held back by a missing dependency or a
    device that came too late, and every node finished its first boot (both phases)."""
    problems = []
    for n in probe.site.nodes if nodes is None else nodes:
        def settled(n=n) -> None:
            # One SSH session (each costs seconds on an emulated guest): units, then PID 1's journal.
            out, _, pid1 = probe.ssh(n, "sudo systemctl --failed --no-legend --plain; sudo cat /var/lib/sohocloud/"
                                        "online.done 2>/dev/null || echo online-phase-pending; echo @@pid1@@; "
                                        "sudo journalctl -b -q --no-pager -o cat _PID=1").stdout.partition("@@pid1@@")
            expect("online-phase-pending" not in out, f"{n.name}: online phase not finished")
            failed = [line.split()[0] for line in out.splitlines() if line.endswith("failed") or " failed " in line]
            expect(not failed, f"{n.name}: failed units {failed}")
            held = HELD_BACK_RE.findall(pid1)
            expect(not held, f"{n.name}: held back at boot: {held[:5]}")
        try:
            retry(settled, 120)
        except CheckFailed as e:
            problems.append(str(e))
    expect(not problems, "; ".join(problems))


def check_git(probe: FleetProbe) -> None:
    """The site repository on the git server (over SSH, git-shell) holds the site file as built."""
    node = probe.provider("git")
    known = probe.paths.known_hosts
    with tempfile.TemporaryDirectory(prefix="sohocloud-git.") as d:
        env = {"GIT_SSH_COMMAND": f"ssh -i {probe.identity} -o IdentitiesOnly=yes -o BatchMode=yes "
                                  f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={known} -o LogLevel=ERROR",
               "PATH": "/usr/bin:/bin", "HOME": d}
        p = subprocess.run(["ip", "netns", "exec", probe.netns, "git", "clone", "-q",
                            f"git@{node.address}:site.git", f"{d}/site"], capture_output=True, text=True, env=env,
                           timeout=120)
        expect(p.returncode == 0, f"git clone git@{node.address}:site.git: {p.stderr.strip()[-300:]}")
        text = Path(d, "site", "site.yaml").read_text()
    expect(f"site: {probe.site.name}" in text and all(n.mac in text for n in probe.site.nodes),
           "site.yaml in the repository is not this site's file")
    # git-shell only: no interactive shell for the git account.
    p = probe.in_netns(["ssh", "-i", probe.identity, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                        "-o", f"UserKnownHostsFile={known}", "-o", "LogLevel=ERROR", f"git@{node.address}", "id"],
                       timeout=60)
    expect(p.returncode != 0, f"the git account ran a shell command: {p.stdout!r}")


def http_status(probe: FleetProbe, url: str) -> int:
    """The HTTP status a GET of *url* gets from the host's seat on the LAN (-1: no answer).
    No proxy: the site LAN has none, whatever the host's environment says."""
    script = ("import sys,urllib.request,urllib.error\n"
              "o=urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
              "try:\n  print(o.open(sys.argv[1],timeout=15).status)\n"
              "except urllib.error.HTTPError as e:\n  print(e.code)\n")
    p = probe.in_netns(["python3", "-c", script, url], timeout=40)
    out = p.stdout.strip()
    return int(out) if p.returncode == 0 and out.isdigit() else -1


def check_seeds_served_to_their_node_only(probe: FleetProbe, nodes: list[SiteNode]) -> None:
    """The PXE server hands a netboot node's seed (its keys and secrets) only to the address the site
    reserved for that node's MAC: the host's seat on the LAN is refused each one, and a MAC the site
    does not know has no seed at all (its initrd reports "not enrolled")."""
    server = probe.provider("pxe")
    for n in nodes:
        code = http_status(probe, f"http://{server.address}/seeds/{n.mac}/user-data")
        expect(code == 403, f"{server.name} answered HTTP {code} to another LAN address asking for {n.name}'s "
                            "seed, expected 403 (served only to its reserved address)")
    known = {n.mac for n in probe.site.nodes}
    stranger = next(m for m in (f"52:54:00:ff:ff:{i:02x}" for i in range(256)) if m not in known)
    code = http_status(probe, f"http://{server.address}/seeds/{stranger}/user-data")
    expect(code == 404, f"{server.name} answered HTTP {code} for the seed of a MAC the site does not know "
                        f"({stranger}), expected 404 (not enrolled)")


def check_netboot(probe: FleetProbe, nodes: list[SiteNode] | None = None) -> None:
    """Each diskless node (or these *nodes*) runs the verified squashfs under a RAM overlay and
    reaches its LDAP person's NAS home: a file written there as that person is read back on storage.
    Their seeds are served to them only."""
    nodes = probe.nodes_with(lambda m: m.get("bootloader") == "ipxe") if nodes is None else nodes
    expect(bool(nodes), "the site has no netboot node")
    check_seeds_served_to_their_node_only(probe, nodes)
    nas, user = probe.provider("nas"), probe.site.users[-1].name
    console_dir = probe.paths.run
    for n in nodes:
        mounts = probe.ssh(n, "findmnt -n -o FSTYPE,SOURCE / ; findmnt -n -o FSTYPE /run/sohocloud/lower; "
                              "findmnt -n -o FSTYPE /run/sohocloud/rw").stdout.split()
        expect(mounts == ["overlay", "overlay", "squashfs", "tmpfs"], f"{n.name}: root mounts {mounts}")
        console = (console_dir / f"{n.name}.console.log").read_text(errors="replace")
        expect("rootfs.squashfs verified" in console, f"{n.name}: its initrd did not say it verified the squashfs")
        body = f"written on diskless {n.name} by {user}: {pysecrets.token_hex(8)}\n"
        name = f"netboot-{n.name}.txt"

        def write(n=n, body=body, name=name) -> None:
            probe.ssh(n, f"sudo -u {user} sh -c 'cat > /nas/home/{user}/{name}'", stdin=body)
        retry(write, 180)
        got = probe.ssh(nas, f"sudo cat /nas/home/{user}/{name}").stdout
        expect(got == body, f"storage reads {got!r} from {n.name}'s write, expected {body!r}")


CHECKS: dict[str, Callable[[FleetProbe], None]] = {
    "units": check_units,
    "dns": check_dns_and_reservations,
    "time": check_time,
    "cluster": check_cluster,
    "ldap": check_ldap_users,
    "nas-home": check_nas_home,
    "samba": check_samba,
    "prometheus": check_prometheus,
    "journals": check_journals,
    "git": check_git,
    "desktops": check_desktops,
    "port-scan": check_port_scan,
    "members-only": check_members_only,
    "overlay-encrypted": check_overlay_encrypted,
    "vpn": check_vpn,
    "wan-closed": check_wan_closed,
    "backup-restore": check_backup_restore,
    "netboot": check_netboot,
}


def run_checks(probe: FleetProbe, names: list[str]) -> list[str]:
    failed = []
    for name in names:
        if name not in CHECKS:
            raise SohoError(f"no check '{name}' (checks: {', '.join(CHECKS)})")
        t0 = time.monotonic()
        try:
            CHECKS[name](probe)
            print(f"ok    {name} ({time.monotonic() - t0:.1f} s)", flush=True)
        except (CheckFailed, subprocess.TimeoutExpired) as e:
            failed.append(name)
            print(f"FAIL  {name}: {e}", flush=True)
    return failed
