"""A consecutive-failure circuit breaker, for calls that must fail fast while a dependency
(Redis) is down and probe it now and then until it is back::

    breaker = Breaker(threshold=3, cooldown=5.0)
    if breaker.allow():
        try:
            call()
        except ConnectionError:
            breaker.failure()
        else:
            breaker.success()
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("yichui.cache")


class Breaker:
    """Consecutive-failure circuit breaker (closed -> open -> half-open probe -> closed)."""

    def __init__(self, *, threshold: int = 3, cooldown: float = 5.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        """Whether to try Redis now (one probe at a time once the cooldown is over)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def release(self) -> None:
        """A probe that ended neither way (cancelled): let the next request probe."""
        self._probing = False

    def success(self) -> None:
        self.failures, self.opened_at, self._probing = 0, None, False

    def reset(self, why: str) -> None:
        """Close now, cooldown or not: the dependency says it is back (a Sentinel announced a
        new master), so the next call tries it. The cooldown stays the fallback."""
        if self.opened_at is not None:
            log.info("response cache: %s, using Redis again", why)
        self.success()

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.threshold:
            if self.opened_at is None:
                log.warning("response cache: Redis failing, bypassing it for %.0fs", self.cooldown)
            self.opened_at = time.monotonic()
