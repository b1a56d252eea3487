"""Rate limits on guessing: failed logins counted per player ID and per client address in a sliding window.

A login is a player ID plus a name, so a name is a (weak) password: without a limit anyone could try names against a
classmate's ID until one fits, or spray IDs from one address. Only *failed* attempts count, so a class logging in
together from one NAT'd address is never slowed down; once a key is over its limit every attempt for it is refused
(the right name included - otherwise a success would still confirm a guess) until its oldest failure leaves the window.

The counts live in this process's memory: a restart forgets them, and that is fine for a game server of one process.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable


class SlidingWindow:
    """At most ``limit`` events per key in any ``window`` seconds; thread-safe (FastAPI runs routes in threads)."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        if limit < 1 or window <= 0:
            raise ValueError(f"a sliding window needs limit >= 1 and window > 0, not {limit} and {window}")
        self.limit, self.window, self.clock = limit, window, clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._sweep_at = 1024                 # sweep expired keys when the table grows past this many

    def _live(self, key: str, now: float) -> deque[float] | None:
        """The key's events still inside the window (the expired ones dropped); call with the lock held."""
        events = self._events.get(key)
        if events is None:
            return None
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may have another event; 0 while it is under its limit."""
        with self._lock:
            now = self.clock()
            events = self._live(key, now)
            if events is None or len(events) < self.limit:
                return 0.0
            # The (len - limit + 1)-th oldest event must leave before the count drops below the limit.
            return events[len(events) - self.limit] + self.window - now

    def record(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            self._live(key, now)
            self._events.setdefault(key, deque()).append(now)
            if len(self._events) > self._sweep_at:
                # Keys seen once and never again (a sprayed ID) would otherwise stay forever: forget the expired
                # ones, at most once per doubling of the table so that recording stays O(1) on average.
                for stale in list(self._events):
                    self._live(stale, now)
                self._sweep_at = max(1024, 2 * len(self._events))


class LoginGuard:
    """The two limits a login passes: failures per player ID and failures per client address."""

    def __init__(self, per_player: int, per_address: int, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.per_player = SlidingWindow(per_player, window, clock)
        self.per_address = SlidingWindow(per_address, window, clock)

    def retry_after(self, player_id: str, address: str) -> int:
        """Whole seconds to wait before this attempt may be made (0: go ahead); what ``Retry-After`` says."""
        wait = max(self.per_player.retry_after(player_id), self.per_address.retry_after(address))
        return max(1, math.ceil(wait)) if wait > 0 else 0

    def failed(self, player_id: str, address: str) -> None:
        self.per_player.record(player_id)
        self.per_address.record(address)
