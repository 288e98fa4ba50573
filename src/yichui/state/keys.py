"""Every Redis key and channel name yichui uses, in one place.

Names follow ``resource_type:identifier`` and carry an optional namespace prefix
(``<namespace>:resource_type:identifier``). Keys that are used together in one atomic
operation share a Redis Cluster hash slot through a hash tag: ``model_status:{<name>}`` and
``model_lock:{<name>}`` are written together when a pull commits. ``docs/keys.md`` lists every
key with its type, TTL, writer and readers; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

KEY_SCHEMA_VERSION = 1
"""Bumped whenever the layout of a value changes incompatibly."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one namespace::

    keys = Keys(namespace="team-a")
    keys.model_status("Qwen/Qwen2.5-7B")  # 'team-a:model_status:{Qwen/Qwen2.5-7B}'
    """

    namespace: str = ""

    def _k(self, *parts: str) -> str:
        body = ":".join(parts)
        return f"{self.namespace}:{body}" if self.namespace else body

    # -- model registry ---------------------------------------------------------------------
    def model_status(self, name: str) -> str:
        """STRING, JSON status of one model (or ``{"exists": false}``); TTL 24 h / 5 min."""
        return self._k("model_status", "{" + name + "}")

    def model_lock(self, name: str) -> str:
        """STRING, owner token of the single pull/import/remove in flight for a model."""
        return self._k("model_lock", "{" + name + "}")

    def model_index(self) -> str:
        """HASH, name -> JSON listing row of every model in the root. Shares a slot with
        :meth:`model_listing`, which is rebuilt from it in the same Lua script."""
        return self._k("model_index", "{models}")

    def model_listing(self) -> str:
        """STRING, the whole index as one JSON array sorted by name: one GET answers a listing.
        Absent until a full walk of the root built the index."""
        return self._k("model_listing", "{models}")

    def model_events(self) -> str:
        """Pub/sub channel: JSON events ``{"event", "name", ...}`` on pull, import, rm."""
        return self._k("model_events")

    # -- task engine --------------------------------------------------------------------------
    # Every task key carries the hash tag {tasks}: the queue stream, the indexes and each task's
    # status and log live in one Cluster slot, so a state change, its index moves and the XACK
    # happen in one Lua script (the layout BullMQ uses for the same reason).
    def task_status(self, task_id: str) -> str:
        """HASH, one task's state, progress, error and result; no TTL while queued or running,
        ``task_ttl`` once finished."""
        return self._k("task_status", "{tasks}", task_id)

    def task_log(self, task_id: str) -> str:
        """STREAM, the task's log lines, progress updates and state changes in order; capped
        at ``task_log_max`` entries, expires with the status."""
        return self._k("task_log", "{tasks}", task_id)

    def task_queue(self, queue: str) -> str:
        """STREAM with consumer group ``workers``: one entry ``{id}`` per delivery of a task."""
        return self._k("task_queue", "{tasks}", queue)

    def task_running(self) -> str:
        """ZSET, running task id -> lease deadline (ms, Redis clock), pushed on by heartbeats."""
        return self._k("task_running", "{tasks}")

    def task_delayed(self, queue: str) -> str:
        """ZSET, task id -> time (ms) its retry is due; promoted onto the queue stream."""
        return self._k("task_delayed", "{tasks}", queue)

    def task_index(self, state: str) -> str:
        """ZSET per state, task id -> time (ms) it entered the state: list by state without
        scanning the keyspace."""
        return self._k("task_index", "{tasks}", state)

    def task_workers(self) -> str:
        """HASH, worker id -> JSON (host, pid, slots, running ids, heartbeat)."""
        return self._k("task_workers", "{tasks}")

    def task_events(self) -> str:
        """Pub/sub channel: JSON ``{"id", "type", "state", ...}`` on every task state change."""
        return self._k("task_events")

    # -- response cache -----------------------------------------------------------------------
    # An entry and its coalescing lock share the hash tag {<digest>}: one script stores the
    # answer and releases the lock. The model name sits outside the tag so that `cache clear
    # --model M` finds its entries with SCAN MATCH (never KEYS).
    def response(self, model: str, digest: str) -> str:
        """STRING, a metadata line and the cached response body; TTL per model ± jitter. The
        model name is %-quoted so a ``:`` in it (``llama3:8b``) cannot end it early."""
        return self._k("response", _quote(model), "{" + digest + "}")

    def response_lock(self, model: str, digest: str) -> str:
        """STRING, owner token of the one request computing this answer (coalescing)."""
        return self._k("response_lock", _quote(model), "{" + digest + "}")

    def response_live(self, model: str, digest: str) -> str:
        """STREAM, the pieces of a streamed answer as they are generated, for requests waiting
        for it in other processes (live fan-out): a start entry ``s`` (the lock's token),
        pieces ``c`` (JSON list, ``n`` the index of the first), an end entry ``e``. Lives while
        the answer is computed, then 30 s."""
        return self._k("response_live", _quote(model), "{" + digest + "}")

    def response_readers(self, model: str, digest: str) -> str:
        """ZSET, token -> expiry (epoch s) of each request in another process reading a live
        answer: while any is fresh, the computation goes on without its own client."""
        return self._k("response_readers", _quote(model), "{" + digest + "}")

    def response_pattern(self, model: str | None = None) -> str:
        """SCAN MATCH pattern of every entry (of one model)."""
        body = "response:" + (_glob_escape(_quote(model)) + ":" if model else "") + "*"
        return f"{_glob_escape(self.namespace)}:{body}" if self.namespace else body

    def response_stats(self) -> str:
        """HASH, counters (hit, miss, coalesced, bypass, stored, errors, faults,
        coalesced_errors, coalesce_timeouts) of every server, flushed about once a second."""
        return self._k("response_stats")

    def response_events(self) -> str:
        """Pub/sub channel: ``{"key", "ok"}`` when a computation that others wait for ends."""
        return self._k("response_events")

    # -- evaluation -----------------------------------------------------------------------------
    def eval_result(self, key: str) -> str:
        """STRING, JSON report of one evaluation, keyed by the SHA-256 of the model's
        fingerprint, the dataset's hash and the parameters; TTL ``eval_result_ttl`` ± jitter."""
        return self._k("eval_result", key)

    # -- access: API keys, dashboard sessions, audit log --------------------------------------
    def api_keys(self) -> str:
        """HASH, SHA-256 hex digest of an API key -> JSON ``{id, tenant, role, name, created}``
        (never the key itself). Written by ``yichui keys``; every API process holds a copy."""
        return self._k("api_keys")

    def api_key_events(self) -> str:
        """Pub/sub channel: ``{"event": "created"|"revoked", "id"}`` on every change of
        :meth:`api_keys`, so API processes reload their copy at once."""
        return self._k("api_key_events")

    def session(self, session_id: str) -> str:
        """STRING, JSON ``{digest, csrf, created}`` of one dashboard session (the cookie's id);
        TTL ``session_ttl``. The digest names the key, so revoking the key ends the session."""
        return self._k("session", session_id)

    def audit_log(self) -> str:
        """STREAM, admin actions ``{at, tenant, key, action, target, detail}``, capped at
        ``audit_max`` entries."""
        return self._k("audit_log")

    # -- fleet ----------------------------------------------------------------------------------
    def servers(self) -> str:
        """HASH, server id -> JSON heartbeat of one ``yichui serve`` process (host, pid, port,
        loaded models, requests, last heartbeat); entries older than three heartbeats are
        dropped by the readers."""
        return self._k("servers")


def _quote(model: str) -> str:
    return quote(model, safe="/._-")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
