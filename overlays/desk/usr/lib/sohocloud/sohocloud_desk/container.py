"""The session container: a fresh copy of the desktop template for one person, as argv.

The session is one transient systemd unit in the person's user slice (`systemd-run --uid`): systemd
holds the machine type's limits (memory, tasks, CPU) on the whole unit, and stopping the unit ends
every process of the session. Inside it, rootless podman runs the template's unpacked tree
(--rootfs, read-only: no image store per person, nothing to copy at sign-in) with --userns=keep-id,
so the person's uid inside is their uid outside, which is their uid on the NAS. What a session writes
outside the NAS home lands in tmpfs and dies with it. No capabilities, no new privileges; the VNC
server listens on a unix socket in the session's folder: no VNC port exists anywhere.

Settled by hand on a workstation host (bookworm, podman 4.3.1): crun, since runc refuses
--cgroups=disabled (the unit's cgroup is the limit); podman's own state in the session's folder,
never in the NAS home; --rootfs is a flag, the tree's path comes after every option.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import Grant

TEMPLATE = "/var/lib/sohocloud-desk/template"  # the desktop template's tree, unpacked once per host
VNC_DIR = "/run/sohocloud-desktop"  # inside: the session's VNC folder (the template's sohocloud-desktop puts vnc.sock there)
DESKTOP = "/usr/local/bin/sohocloud-desktop"
# Writable scratch inside the container, all tmpfs (in RAM, counted in the memory limit). /home is one
# so that the person's home can be mounted at /home/<name> in a read-only tree.
TMPFS = {"/tmp": "1777", "/var/tmp": "1777", "/home": "0755"}
NETWORKS = {
    "none": "none",
    # slirp4netns: the container's traffic leaves as the person's own, which the host firewall
    # lets reach the site LAN only; no access to the host's own loopback services.
    "lan": "slirp4netns:allow_host_loopback=false",
}


@dataclass(frozen=True)
class Session:
    id: str  # random, URL-safe
    person: str
    uid: int
    home: str  # the person's NAS home as the host mounts it
    session_dir: str  # host folder of the session (0700, the person's): podman's state, vnc/
    grant: Grant


def unit_name(s: Session) -> str:
    return f"desk-{s.id[:16]}.service"


def run_argv(s: Session, gid: int, template: str = TEMPLATE) -> list[str]:
    """*gid*: the person's primary group (their directory entry's)."""
    m = s.grant.machine
    cpu_quota = f"{round(float(m.cpus) * 100)}%"
    return [
        "systemd-run", "--quiet", f"--unit={unit_name(s)}", f"--slice=user-{s.uid}.slice",
        f"--uid={s.uid}", f"--gid={gid}", f"--working-directory={s.session_dir}",
        f"--property=MemoryMax={m.memory}", "--property=MemorySwapMax=0", f"--property=TasksMax={m.pids}",
        f"--property=CPUQuota={cpu_quota}", "--property=KillMode=control-group", "--collect",
        f"--setenv=XDG_RUNTIME_DIR={s.session_dir}", f"--setenv=HOME={s.session_dir}",
        "--",
        "podman", "--runtime=crun", "--cgroup-manager=cgroupfs",
        "run", "--rm", f"--name=desk-{s.id[:16]}", "--cgroups=disabled",
        "--userns=keep-id", "--read-only",
        *[arg for path, mode in TMPFS.items() for arg in ("--tmpfs", f"{path}:rw,nosuid,nodev,mode={mode}")],
        "--cap-drop=all", "--security-opt=no-new-privileges",
        f"--network={NETWORKS[s.grant.network]}",
        "--volume", f"{s.home}:/home/{s.person}:rw",
        "--volume", f"{s.session_dir}/vnc:{VNC_DIR}:rw",
        "--volume", f"{s.session_dir}/machine-id:/etc/machine-id:ro",
        "--env", f"HOME=/home/{s.person}", "--env", f"USER={s.person}",
        "--workdir", f"/home/{s.person}",
        "--rootfs", template, DESKTOP,
    ]


def stop_argv(s: Session) -> list[str]:
    # The unit is the session: stopping it ends podman, the container and every process in it.
    return ["systemctl", "stop", unit_name(s)]
