"""Exponential backoff with jitter: the one rule every retry loop of yichui waits by.

::

    backoff = Backoff(first=0.1, cap=5.0)
    while True:
        try:
            do_it()
        except ConnectionError:
            time.sleep(backoff.next())      # 0.1, 0.2, 0.4, … up to 5 s, jittered
            continue
        backoff.reset()

:func:`delay` is the same rule for a known attempt number (task retries).
"""

from __future__ import annotations

import asyncio
import random


def delay(attempt: int, *, first: float, cap: float, jitter: float = 0.5) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` ≥ 1): ``first`` doubled per
    attempt, ``±jitter`` of itself at random, never over ``cap``."""
    base = first * 2 ** max(0, attempt - 1)
    spread = random.uniform(1.0 - jitter, 1.0 + jitter) if jitter else 1.0
    return float(min(cap, base * spread))


class Backoff:
    """The delays of one retry loop: ``first``, doubled each time up to ``cap``, each one
    jittered by ``±jitter`` of itself (so many clients do not retry in step)."""

    def __init__(self, *, first: float = 0.1, cap: float = 5.0, jitter: float = 0.2) -> None:
        if first <= 0 or cap < first:
            raise ValueError("need 0 < first <= cap")
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.attempt = 0

    def next(self) -> float:
        """The next delay, in seconds."""
        self.attempt += 1
        return delay(self.attempt, first=self.first, cap=self.cap, jitter=self.jitter)

    def reset(self) -> None:
        """After a success: the next failure waits ``first`` again."""
        self.attempt = 0

    async def sleep(self) -> None:
        """``await asyncio.sleep(self.next())``."""
        await asyncio.sleep(self.next())
