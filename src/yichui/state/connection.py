"""Redis clients from one URL.

Supported URLs::

    redis://[[user]:password@]host[:port][/db]
    rediss://…                                   TLS
    unix:///path/to/redis.sock[?db=N]
    redis+sentinel://[[user]:password@]host:port[,host:port…]/<master-name>[/db]
    redis+cluster://[[user]:password@]host:port[,host:port…]
    (rediss+sentinel:// and rediss+cluster:// for TLS)

With no URL configured, :func:`resolve_url` starts (or reuses) the embedded redis-server under the
data directory. Every client gets connect/socket timeouts, retries with jittered exponential
backoff on connection errors, and periodic health checks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeAlias, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from yichui.errors import (
    ConfigError,
    RedisFullError,
    RedisSetupError,
    RedisUnavailableError,
    StateError,
)
from yichui.state.cluster import ReshardingCluster
from yichui.state.sentinel import auth_refusal, check_master
from yichui.state.tls import tls_kwargs, tls_refusal

if TYPE_CHECKING:
    from yichui.config import Settings

REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)
"""What a Redis failure can raise: cluster setup errors do not derive from ``RedisError``."""

SyncRedis: TypeAlias = "redis.Redis | RedisCluster"
AsyncRedis: TypeAlias = "aredis.Redis | AsyncRedisCluster"

_SCHEMES = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "unix": ("standalone", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL."""

    url: str
    kind: str  # standalone | sentinel | cluster
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def display(self) -> str:
        """The URL with any password masked, safe to print or log."""
        return mask_password(self.url)


_USERINFO_PASSWORD = re.compile(r"^([a-z0-9+.-]+://[^:@/?#]*):[^/?#]*@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)[^&#]*", re.IGNORECASE)


def mask_password(url: str) -> str:
    """``url`` with its passwords (userinfo, ``?password=``, ``?sentinel_password=``) masked."""
    url = _USERINFO_PASSWORD.sub(r"\1:***@", url)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse and validate a Redis URL; raise :class:`ConfigError` on anything malformed."""
    if "://" not in url:
        raise ConfigError(f"invalid Redis URL {mask_password(url)!r}: expected scheme://…")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"invalid Redis URL: unknown scheme {scheme!r}",
            hint="use redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://",
        )
    kind, tls = _SCHEMES[scheme]
    query: dict[str, str] = {}
    if "?" in rest:
        rest, qs = rest.split("?", 1)
        query = {k: v[-1] for k, v in parse_qs(qs).items()}
    if kind == "standalone":
        _check_standalone(url, scheme)
        return RedisTarget(url=url, kind=kind, tls=tls, options=query)

    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    shown = mask_password(url)
    nodes = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"invalid Redis URL {shown!r}: expected host:port, got {part!r}")
        nodes.append((host.strip("[]"), int(port)))
    segments = [s for s in path.split("/") if s]
    master = None
    db = 0
    if kind == "sentinel":
        if not segments:
            raise ConfigError(f"invalid Redis URL {shown!r}: missing /<master-name>")
        master = segments.pop(0)
    if segments:
        if kind == "cluster" or len(segments) > 1 or not segments[0].isdigit():
            raise ConfigError(f"invalid Redis URL {shown!r}: unexpected path /{'/'.join(segments)}")
        db = int(segments[0])
    return RedisTarget(
        url=url,
        kind=kind,
        tls=tls,
        nodes=tuple(nodes),
        master=master,
        db=db,
        username=username,
        password=password,
        options=query,
    )


def _check_standalone(url: str, scheme: str) -> None:
    """Reject what redis-py would only reject later, with a less helpful error."""
    shown = mask_password(url)
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {shown!r}: {exc}") from None
    if scheme == "unix":
        if not parts.path:
            raise ConfigError(f"invalid Redis URL {shown!r}: expected unix:///path/to/socket")
        return
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"invalid Redis URL {shown!r}: unexpected path {parts.path}")


class _ClosingAsyncSentinelPool(AsyncSentinelPool):
    """Also closes the Sentinel clients when the master's client is closed: nothing else can,
    and their open asyncio connections would otherwise leak (ResourceWarning)."""

    async def aclose(self) -> None:
        await super().aclose()
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.aclose()


def _common_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "socket_connect_timeout": settings.redis_connect_timeout,
        "socket_timeout": settings.redis_socket_timeout,
        "health_check_interval": settings.redis_health_check_interval,
        "client_name": "yichui",
    }


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=1.0, base=0.05)


def _build(target: RedisTarget, settings: Settings, *, asyncio: bool) -> Any:
    kwargs = _common_kwargs(settings)
    if target.tls:
        kwargs.update(tls_kwargs(settings))
    if asyncio:
        redis_cls: Any = aredis.Redis
        sentinel_cls: Any = AsyncSentinel
        cluster_cls: Any = AsyncRedisCluster
        node_cls: Any = AsyncClusterNode
        retry: Any = AsyncRetry(_backoff(), settings.redis_retries)
        sentinel_retry: Any = AsyncRetry(NoBackoff(), 0)
    else:
        redis_cls, sentinel_cls, cluster_cls, node_cls = (
            redis.Redis,
            Sentinel,
            ReshardingCluster,  # TRYAGAIN for as long as a slot takes to move
            ClusterNode,
        )
        retry = Retry(_backoff(), settings.redis_retries)
        sentinel_retry = Retry(NoBackoff(), 0)
    if target.kind == "standalone":
        return redis_cls.from_url(target.url, retry=retry, **kwargs)
    auth = {"username": target.username, "password": target.password}
    if target.kind == "sentinel":
        # No retries per Sentinel (redis-py's default is 3, backing off up to 10 s each): the
        # master's own retries already ask the Sentinels again, so a dead one fails fast.
        sentinel_kwargs = {**kwargs, "ssl": target.tls, "retry": sentinel_retry}
        if "sentinel_password" in target.options:
            sentinel_kwargs["password"] = target.options["sentinel_password"]
        sentinel = sentinel_cls(
            list(target.nodes), sentinel_kwargs=sentinel_kwargs, ssl=target.tls, **kwargs
        )
        pool = {"connection_pool_class": _ClosingAsyncSentinelPool} if asyncio else {}
        return sentinel.master_for(target.master, db=target.db, retry=retry, **auth, **pool)
    nodes = [node_cls(host, port) for host, port in target.nodes]
    return cluster_cls(startup_nodes=nodes, retry=retry, ssl=target.tls, **auth, **kwargs)


def make_sync_client(target: RedisTarget, settings: Settings) -> SyncRedis:
    """A blocking client for ``target`` (standalone, Sentinel master, or Cluster)."""
    client: SyncRedis = _build(target, settings, asyncio=False)
    return client


def make_async_client(target: RedisTarget, settings: Settings) -> AsyncRedis:
    """An asyncio client for ``target``, configured like :func:`make_sync_client`."""
    client: AsyncRedis = _build(target, settings, asyncio=True)
    return client


def resolve_url(settings: Settings, *, start: bool = True) -> str:
    """The configured Redis URL, or the embedded server's (started if needed and ``start``)."""
    if settings.redis_url:
        return settings.redis_url
    from yichui.state.embedded import EmbeddedRedis

    embedded = EmbeddedRedis(settings.data_dir)
    return embedded.ensure().url if start else embedded.require_running().url


def connect(settings: Settings, *, start_embedded: bool = True) -> tuple[SyncRedis, RedisTarget]:
    """Resolve the URL, build a sync client and check it answers ``PING``."""
    url = resolve_url(settings, start=start_embedded)
    target = parse_redis_url(url)
    if target.kind == "sentinel":
        # asked first, one try each Sentinel (a few ms): a master name none knows or a
        # Sentinel password refused is a setting, said at once (the client's discovery
        # would retry with backoff for seconds before it failed with a vaguer error)
        check_master(target, settings)
    try:
        # a cluster client connects (and may fail) while it is built, with its own exception
        client = make_sync_client(target, settings)
        client.ping()
    except REDIS_ERRORS as exc:
        cause = _cluster_refusal(target, settings) if target.kind == "cluster" else None
        raise connect_error(target, cause or exc) from exc
    return client, target


def _cluster_refusal(target: RedisTarget, settings: Settings) -> Exception | None:
    """What ``CLUSTER SLOTS`` really answers on the first node that answers: redis-py reports
    any refusal of it (an ACL without ``+cluster|slots`` too) as "cluster mode is not
    enabled". -> that error, or None when a node accepts it."""
    kwargs = _common_kwargs(settings) | (tls_kwargs(settings) if target.tls else {})
    for host, port in target.nodes:
        plain = redis.Redis(host=host, port=port, username=target.username,
                            password=target.password, ssl=target.tls, **kwargs)  # fmt: skip
        try:
            plain.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            return None
        except (redis.ResponseError, redis.AuthenticationError) as exc:
            return exc  # NOPERM, "cluster support disabled", a password refused
        except REDIS_ERRORS:
            continue  # this node is down: ask the next one
        finally:
            plain.close()
    return None


_ACL_DOC = "docs/deployment.md#secure-redis-acl-tls"


def connect_error(target: RedisTarget, exc: BaseException) -> StateError:
    """What a failed first contact with ``target`` means, in one line with the fix: a setting
    (:class:`RedisSetupError`, exit code 2) when the server answered but refused us, else
    :class:`RedisUnavailableError`. Never the password (redis-py's messages hold none)."""
    url, text = target.display, _reason(exc)
    upper = text.upper()
    refused = auth_refusal(exc)
    if refused == "missing":
        return RedisSetupError(
            url,
            "the server requires a password and none was given",
            hint="put the user and password in the URL (redis://user:password@host:port)",
        )
    if refused == "wrong":
        return RedisSetupError(
            url,
            "authentication failed: wrong password, or an unknown or disabled ACL user",
            hint="check the user and password in the URL (redis://user:password@host:port)",
        )
    if isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in upper:
        return RedisSetupError(
            url,
            f"the ACL user lacks a permission yichui needs ({text})",
            hint=f"grant it the ACL of {_ACL_DOC}",
        )
    mismatch = tls_refusal(exc, tls=target.tls)
    if mismatch is not None:
        return RedisSetupError(url, mismatch[0], hint=mismatch[1])
    if target.kind == "cluster" and (
        "CLUSTER MODE IS NOT ENABLED" in upper or "CLUSTER SUPPORT DISABLED" in upper
    ):
        return RedisSetupError(
            url,
            "the node is a plain Redis, not a Redis Cluster node (cluster mode is not enabled)",
            hint="use redis://host:port for a single server, or point redis+cluster:// at the "
            "nodes of a cluster (cluster-enabled yes)",
        )
    return RedisUnavailableError(url, text)


def is_oom(exc: BaseException) -> bool:
    """Whether Redis refused a command for ``maxmemory`` (``OOM command not allowed``)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM ")


def is_denied(exc: BaseException) -> bool:
    """Whether the ACL refused a command (``NOPERM``): a setting, which no retry mends."""
    return isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in str(exc)[:16]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


P = ParamSpec("P")
T = TypeVar("T")


def state_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn a Redis failure inside ``fn`` into a :class:`StateError` with a one-line message."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except REDIS_ERRORS as exc:
            if is_oom(exc):
                raise RedisFullError(fn.__name__) from exc
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StateError(f"Redis error: {first}") from exc

    return wrapper
