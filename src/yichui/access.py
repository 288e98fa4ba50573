"""Who is asking, and what they may do: API keys with roles, dashboard sessions, the audit log.

::

    store = KeyStore(client, keys)                       # yichui keys create / list / revoke
    secret, record = store.create("team-a", "user", name="ci")
    auth = Authenticator(settings, KeyTable())           # one per API process
    await auth.table.load(async_client, keys)            # then kept fresh by auth.table.run()
    auth.principal("Bearer " + secret)                   # Principal(tenant='team-a', role='user')

``settings.auth`` says which mode runs: ``local`` (no key asked for; every caller is the tenant
``local``, an admin) or ``keys`` (a key of ``settings.api_keys``, or one made by ``yichui keys
create`` and stored in Redis as its SHA-256 digest, never in clear). Each API process holds the
Redis keys in memory (:class:`KeyTable`), reloaded on every ``api_key_events`` message and at
least once a second, and keeps its last good copy while Redis is unreachable: checking a key
costs no Redis call, the hit fast path included. A key nobody knows is refused (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import orjson

from yichui.backoff import Backoff
from yichui.config import ROLES, TENANT_PATTERN, Settings
from yichui.errors import (
    AuthenticationError,
    InvalidTaskArgsError,
    NotFoundError,
    PermissionDeniedError,
    RequestError,
)
from yichui.state.connection import AsyncRedis, SyncRedis, state_errors
from yichui.state.keys import Keys

log = logging.getLogger("yichui.access")

LOCAL_TENANT = "local"
KEY_PREFIX = "yc-"
"""Every key ``yichui keys create`` makes starts with this (easy to spot in a leak scan)."""
REFRESH = 1.0
"""Seconds between two reloads of the key table at most (a pub/sub message reloads at once)."""

_TENANT = re.compile(TENANT_PATTERN)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.@:-]{0,63}")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its ``tenant``, ``role`` and, for a key, the key's ``key_id``
    (``settings`` for a key of the settings) and ``name``."""

    tenant: str
    role: str
    key_id: str | None = None
    name: str | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, tenant: str | None) -> bool:
        """Whether this caller may see or act on something owned by ``tenant``."""
        return self.admin or (tenant or LOCAL_TENANT) == self.tenant

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "role": self.role, "key_id": self.key_id, "name": self.name}


LOCAL = Principal(LOCAL_TENANT, "admin", None, "local mode")
"""The caller of ``auth = "local"`` (and of the CLI)."""


def hash_key(key: str) -> str:
    """The digest stored for ``key`` (and to put in ``api_keys``)."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(header: str) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header; None when it carries none."""
    scheme, _, key = header.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def require_admin(principal: Principal, action: str) -> None:
    """403 unless ``principal`` is an admin."""
    if not principal.admin:
        raise PermissionDeniedError(
            f"{action} needs an admin key; this key's role is {principal.role!r}"
        )


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidTaskArgsError(f"unknown role {role!r}", hint=f"roles: {', '.join(ROLES)}")
    return role


def check_tenant(tenant: str) -> str:
    if not _TENANT.fullmatch(tenant):
        raise RequestError(
            f"invalid tenant {tenant!r}: use 1-64 letters, digits, '_', '.', '@' or '-'",
            param="tenant",
        )
    return tenant


# -- the keys in Redis ------------------------------------------------------------------------


class KeyStore:
    """The API keys kept in Redis (``api_keys``): what ``yichui keys`` and ``/api/keys`` call."""

    def __init__(self, client: SyncRedis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    @state_errors
    def create(
        self, tenant: str, role: str, *, name: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """A new key -> (the key, shown once; its record). Only the digest is stored."""
        check_tenant(tenant)
        check_role(role)
        if name is not None and not _NAME.fullmatch(name):
            raise RequestError(
                f"invalid key name {name!r}: 1-64 letters, digits, spaces or '_.@:-'",
                param="name",
            )
        if name is not None and any(r.get("name") == name for r in self.listing()):
            raise RequestError(f"a key named {name!r} exists", status=409, param="name")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = {
            "id": "k" + secrets.token_hex(6),
            "tenant": tenant,
            "role": role,
            "name": name,
            "created": time.time(),
            "digest_prefix": hash_key(secret)[:12],
        }
        self.client.hset(self.keys.api_keys(), hash_key(secret), orjson.dumps(record))
        self._announce("created", str(record["id"]))
        return secret, record

    @state_errors
    def listing(self) -> list[dict[str, Any]]:
        """Every key's record (no secret, no digest), oldest first."""
        rows = [orjson.loads(v) for v in self.client.hgetall(self.keys.api_keys()).values()]
        return sorted(rows, key=lambda r: r.get("created", 0))

    @state_errors
    def revoke(self, ref: str) -> dict[str, Any]:
        """Revoke the key whose id (or name) is ``ref`` -> its record; 404 when none is."""
        for digest, raw in self.client.hgetall(self.keys.api_keys()).items():
            record = orjson.loads(raw)
            if ref in (record.get("id"), record.get("name")):
                self.client.hdel(self.keys.api_keys(), digest)
                self._announce("revoked", record["id"])
                return dict(record)
        raise NotFoundError(f"no API key {ref!r}", hint="see: yichui keys list")

    def _announce(self, event: str, key_id: str) -> None:
        self.client.publish(
            self.keys.api_key_events(), orjson.dumps({"event": event, "id": key_id})
        )


def _principal(record: Mapping[str, Any]) -> Principal:
    return Principal(
        str(record["tenant"]), str(record.get("role", "user")), record.get("id"), record.get("name")
    )


class KeyTable:
    """One process's copy of the Redis keys: digest -> :class:`Principal`. Read without a
    Redis call; replaced whole by :meth:`load`, which :meth:`run` calls on every change and
    every :data:`REFRESH` seconds. While Redis is unreachable the last good copy stays."""

    def __init__(self) -> None:
        self.principals: dict[str, Principal] = {}
        self.loaded_at: float | None = None
        """``time.monotonic()`` of the last good load (None: never loaded)."""

    def get(self, digest: str) -> Principal | None:
        return self.principals.get(digest)

    async def load(self, client: AsyncRedis, keys: Keys) -> None:
        raw = await client.hgetall(keys.api_keys())
        table = {}
        for digest, value in raw.items():
            try:
                table[digest.decode() if isinstance(digest, bytes) else digest] = _principal(
                    orjson.loads(value)
                )
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("ignoring a malformed API key record")
        self.principals = table
        self.loaded_at = time.monotonic()

    async def run(self, client: AsyncRedis, keys: Keys) -> None:
        """Keep the copy fresh until cancelled: reload on each event, and at least once a
        second (a message missed while the connection dropped is caught up by then)."""
        backoff = Backoff(first=0.2, cap=5.0)
        while True:
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(keys.api_key_events())
                await self.load(client, keys)
                backoff.reset()
                while True:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=REFRESH)
                    await self.load(client, keys)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis unreachable: keep the last good copy
                log.debug("api keys: %r", exc)
            finally:
                with contextlib.suppress(Exception):
                    await cast(Any, pubsub).aclose()  # typed from redis-py 8.2 on
            await backoff.sleep()


class Authenticator:
    """The one authentication service of an API process (built by the composition root)."""

    def __init__(self, settings: Settings, table: KeyTable | None = None) -> None:
        self.mode = settings.auth
        self.table = table or KeyTable()
        self._configured = {
            digest: Principal(spec.tenant, spec.role, "settings", None)
            for digest, spec in settings.api_keys.items()
        }

    @property
    def local(self) -> bool:
        return self.mode == "local"

    def by_digest(self, digest: str) -> Principal | None:
        if self.mode == "local":
            return LOCAL
        for known, principal in self._configured.items():
            if hmac.compare_digest(known, digest):
                return principal
        return self.table.get(digest)  # a dict lookup: the digest is no secret worth timing

    def principal(self, authorization: str) -> Principal | None:
        """The caller an ``Authorization`` header names; None when it names none (401)."""
        if self.mode == "local":
            return LOCAL
        key = bearer_token(authorization)
        return None if key is None else self.by_digest(hash_key(key))

    def require(self, authorization: str) -> Principal:
        """The caller; 401 without a key, or with one nobody issued (or one revoked)."""
        principal = self.principal(authorization)
        if principal is not None:
            return principal
        if bearer_token(authorization) is None:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        raise AuthenticationError("invalid API key")


# -- dashboard sessions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    digest: str | None
    """The key's digest (None in local mode); looked up on every request, so a revoked key
    ends its sessions."""
    csrf: str


class SessionStore:
    """Dashboard sessions (``session:<id>``, TTL ``session_ttl``): the HttpOnly cookie holds
    the id, the page sends the ``csrf`` token back in ``X-CSRF-Token`` on every action."""

    KEPT = 10_000
    """Sessions one process remembers, for while Redis is unreachable."""

    def __init__(self, client: AsyncRedis, keys: Keys, ttl: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl = ttl
        self._known: OrderedDict[str, tuple[Session, float]] = OrderedDict()

    def _remember(self, session: Session, expires: float) -> None:
        self._known[session.id] = (session, expires)
        self._known.move_to_end(session.id)
        while len(self._known) > self.KEPT:
            self._known.popitem(last=False)

    async def create(self, digest: str | None) -> Session:
        session = Session(secrets.token_urlsafe(32), digest, secrets.token_urlsafe(24))
        value = {"digest": digest, "csrf": session.csrf, "created": time.time()}
        await self.client.set(self.keys.session(session.id), orjson.dumps(value), ex=self.ttl)
        self._remember(session, time.monotonic() + self.ttl)
        return session

    async def get(self, session_id: str) -> Session | None:
        """The session, from Redis; while Redis is unreachable, the copy this process saw last
        (a revoked key still ends it: the caller looks the key up). None: no such session.
        Raises the Redis error when Redis is unreachable and this process never saw it."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{20,64}", session_id):
            return None
        try:
            raw = await self.client.get(self.keys.session(session_id))
        except Exception:
            known = self._known.get(session_id)
            if known is not None and known[1] > time.monotonic():
                return known[0]
            raise
        if raw is None:
            self._known.pop(session_id, None)
            return None
        value = orjson.loads(raw)
        session = Session(session_id, value.get("digest"), str(value["csrf"]))
        self._remember(session, time.monotonic() + self.ttl)
        return session

    async def delete(self, session_id: str) -> None:
        self._known.pop(session_id, None)
        if re.fullmatch(r"[A-Za-z0-9_-]{20,64}", session_id):
            await self.client.delete(self.keys.session(session_id))


# -- the audit log -------------------------------------------------------------------------------


class AuditLog:
    """Admin actions (rm, verify, rescan, cache clear, key create/revoke, another tenant's
    cancel or retry), one entry each in the ``audit_log`` stream, newest kept."""

    def __init__(self, client: SyncRedis, keys: Keys, cap: int) -> None:
        self.client = client
        self.keys = keys
        self.cap = cap

    @state_errors
    def record(
        self, principal: Principal, action: str, target: str, detail: str | None = None
    ) -> None:
        entry: dict[Any, Any] = {
            "at": f"{time.time():.3f}",
            "tenant": principal.tenant,
            "key": principal.key_id or principal.name or "",
            "action": action,
            "target": target,
            "detail": detail or "",
        }
        self.client.xadd(self.keys.audit_log(), entry, maxlen=self.cap, approximate=True)

    @state_errors
    def entries(self, *, limit: int = 50, before: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` entries (older than the entry id ``before``), newest first."""
        if before is not None:
            ms, _, seq = before.partition("-")
            if not (ms.isdigit() and seq.isdigit() and max(int(ms), int(seq)) < 2**64):
                raise RequestError(f"invalid entry id {before!r}: use <ms>-<seq>", param="before")
            if int(ms) == int(seq) == 0:
                return []  # nothing is older than the first possible id
        top = f"({before}" if before else "+"
        rows: Any = self.client.xrevrange(self.keys.audit_log(), max=top, min="-", count=limit)
        out = []
        for entry_id, fields in rows:
            item: dict[str, Any] = {
                (k.decode() if isinstance(k, bytes) else k): (
                    v.decode() if isinstance(v, bytes) else v
                )
                for k, v in fields.items()
            }
            item["id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            item["at"] = float(item.get("at", 0))
            out.append(item)
        return out
