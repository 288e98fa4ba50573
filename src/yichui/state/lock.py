"""A Redis lease lock with an owner token, renewed in the background.

Used for single-flight work across processes and hosts (one pull of a model at a time). Only
the holder of the token can renew or release it, so a holder that stalled past its lease and
lost the lock cannot delete somebody else's.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from types import TracebackType

from yichui.state.connection import REDIS_ERRORS, SyncRedis

# KEYS[1] lock; ARGV[1] token, ARGV[2] lease in ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lock; ARGV[1] token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaseLock:
    """``SET key token NX PX lease``, renewed every third of the lease while held::

    lock = LeaseLock(client, keys.model_lock(name), lease=30)
    if lock.acquire():
        with lock:             # renews in the background, releases on exit
            ...
    """

    def __init__(self, client: SyncRedis, key: str, *, lease: float) -> None:
        self.client = client
        self.key = key
        self.lease_ms = max(1, int(lease * 1000))
        self.token = secrets.token_hex(16)
        self.lost = threading.Event()
        """Set when a renewal found the lock gone or owned by someone else."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Try once; True if we now hold the lock."""
        return bool(self.client.set(self.key, self.token, nx=True, px=self.lease_ms))

    def renew(self) -> bool:
        ok = bool(self._renew(keys=[self.key], args=[self.token, self.lease_ms]))
        if not ok:
            self.lost.set()
        return ok

    def release(self) -> bool:
        """Delete the lock if we still hold it."""
        self._stop_renewal()
        return bool(self._release(keys=[self.key], args=[self.token]))

    def start_renewal(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = self.lease_ms / 3000.0
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except REDIS_ERRORS:
                continue  # transient: try again next tick, the lease still covers us

    def _stop_renewal(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> LeaseLock:
        self.start_renewal()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # the lease will lapse on its own
            self.release()
