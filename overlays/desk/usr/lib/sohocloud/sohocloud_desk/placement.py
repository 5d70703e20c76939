"""Where a new session runs: on a workstation host that is up and has room; the one with the fewest
sessions, then the most memory left, so sessions spread across the office's machines.

A host's room is measured, not declared: it reports its RAM; the sessions it may hold are those
whose memory limits fit in that RAM less the site's reserve (desktops.host_reserve) for the host
itself. A memory limit is a promise the kernel keeps, so this never overcommits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HostState:
    name: str
    up: bool
    memory_total: int  # bytes, as the host reported
    sessions_memory: int  # bytes: the memory limits of the sessions it runs now
    sessions: int

    def free_after(self, memory: int, reserve: int) -> int:
        return self.memory_total - reserve - self.sessions_memory - memory


def choose_host(hosts: list[HostState], memory: int, reserve: int, prefer: str | None = None) -> HostState | None:
    """The host for a session of *memory* bytes, or None when every host is down or full. Ties go to
    *prefer* (the PC the person sits at), then to the first name, so the choice is predictable."""
    fits = [h for h in hosts if h.up and h.free_after(memory, reserve) >= 0]
    if not fits:
        return None
    best = min(fits, key=lambda h: (h.sessions, -h.free_after(memory, reserve), h.name != prefer, h.name))
    return best
