"""Run inside a node as root (`sudo python3 -`): every listening socket with its bound device.

`ss` shows an address but, on the nodes' iproute2, not the SO_BINDTODEVICE
device of a wildcard socket (e.g. a systemd socket with BindToDevice= or
dnsmasq's DHCP socket).  We duplicate each socket's fd from its owner with
pidfd_getfd(2) and ask the socket itself.  Prints JSON.
"""

import ctypes
import json
import os
import re
import socket
import subprocess

SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438  # same numbers on x86_64 and arm64
libc = ctypes.CDLL(None, use_errno=True)


def bound_device(pid: int, fd: int):
    pidfd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        return None
    try:
        dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            return None
        s = socket.socket(fileno=dup)
        try:
            raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
            return raw.rstrip(b"\0").decode() or None
        finally:
            s.close()
    finally:
        os.close(pidfd)


def main() -> None:
    out = []
    ss = subprocess.run(["ss", "-H", "-tulpn"], capture_output=True, text=True, check=True).stdout
    for line in ss.splitlines():
        parts = line.split()
        proto, state, local = parts[0], parts[1], parts[4]
        if proto == "tcp" and state != "LISTEN":
            continue
        addr, _, port = local.rpartition(":")
        addr = addr.strip("[]")
        dev = None
        if "%" in addr:
            addr, dev = addr.split("%", 1)
        owners = re.findall(r'\("([^"]+)",pid=(\d+),fd=(\d+)\)', " ".join(parts[6:]))
        devices = {bound_device(int(pid), int(fd)) for _, pid, fd in owners} or {dev}
        devices.discard(None)
        out.append({"proto": proto, "addr": addr, "port": int(port),
                    "process": sorted({name for name, _, _ in owners}),
                    "device": dev or (sorted(devices)[0] if len(devices) == 1 else None)})
    print(json.dumps(out))


main()
