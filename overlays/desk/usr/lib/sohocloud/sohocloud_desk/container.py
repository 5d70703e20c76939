"""The session container: a fresh copy of the desktop template for one person, as podman argv.

Rootless podman run as the person (in their user slice), so the container's processes are theirs:
--userns=keep-id maps their uid inside to their uid outside, which is their uid on the NAS. The
template's root is read-only; what a session writes outside the NAS home lands in tmpfs and dies
with the container (--rm). No capabilities, no new privileges, limits from the machine type. The
VNC server listens on a unix socket in a per-session directory: no VNC port exists anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from .policy import Grant

IMAGE = "localhost/sohocloud-desktop:latest"
VNC_DIR = "/run/sohocloud-desktop"  # inside: the session directory (the template's sohocloud-desktop puts vnc.sock there)
# Writable scratch inside the container, all tmpfs (in RAM, counted in the memory limit).
TMPFS = ("/tmp", "/var/tmp", "/run/user")
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
    session_dir: str  # host directory for the VNC socket (0700, the person's)
    grant: Grant


def container_name(s: Session) -> str:
    return f"desk-{s.person}-{s.id[:12]}"


def run_argv(s: Session, image: str = IMAGE) -> list[str]:
    m = s.grant.machine
    return [
        "podman", "run", "--rm", "--detach", "--pull=never",
        "--name", container_name(s),
        "--label", f"sohocloud.session={s.id}", "--label", f"sohocloud.person={s.person}",
        "--userns=keep-id",
        "--read-only", "--read-only-tmpfs=false",
        *[arg for path in TMPFS for arg in ("--tmpfs", f"{path}:rw,nosuid,nodev,mode=1777")],
        "--cap-drop=all", "--security-opt=no-new-privileges",
        f"--cpus={m.cpus}", f"--memory={m.memory}", f"--memory-swap={m.memory}", f"--pids-limit={m.pids}",
        f"--network={NETWORKS[s.grant.network]}",
        "--volume", f"{s.home}:/home/{s.person}:rw",
        "--volume", f"{s.session_dir}:{VNC_DIR}:rw",
        "--env", f"HOME=/home/{s.person}", "--env", f"USER={s.person}",
        "--workdir", f"/home/{s.person}",
        "--log-driver=journald",
        image,
    ]


def stop_argv(s: Session) -> list[str]:
    # --time 2: a desktop has nothing to flush (the NAS home is written through); then SIGKILL.
    return ["podman", "rm", "--force", "--time", "2", "--ignore", container_name(s)]
