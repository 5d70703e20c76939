"""Failed sign-ins slow down guessing: per person and per source address, each failure within the
window counts, and past the allowance every further try is refused until the window has passed.

A success does not wipe a source's count (an attacker who knows one password must not reset the
counter for guessing others); it clears the person's own count.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

WINDOW = 300.0  # seconds
PER_PERSON = 5  # failures in the window before that name is locked
PER_SOURCE = 20  # failures in the window before that address is locked (an office shares few addresses)
MAX_KEYS = 100_000  # memory bound: beyond this many tracked keys, the oldest are forgotten


@dataclass
class Limiter:
    window: float = WINDOW
    per_person: int = PER_PERSON
    per_source: int = PER_SOURCE
    _fails: dict[tuple[str, str], deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._fails.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._fails[key]
        return q

    def blocked(self, person: str, source: str, now: float) -> float:
        """Seconds until this person and source may try again (0: now)."""
        with self._lock:
            waits = []
            for key, limit in ((("person", person), self.per_person), (("source", source), self.per_source)):
                q = self._recent(key, now)
                if len(q) >= limit:
                    waits.append(q[-limit] + self.window - now)
            return max(waits, default=0.0)

    def failed(self, person: str, source: str, now: float) -> None:
        with self._lock:
            if len(self._fails) >= MAX_KEYS:
                for key in list(self._fails)[: MAX_KEYS // 10]:
                    del self._fails[key]
            for key in (("person", person), ("source", source)):
                self._fails.setdefault(key, deque()).append(now)

    def succeeded(self, person: str) -> None:
        with self._lock:
            self._fails.pop(("person", person), None)
