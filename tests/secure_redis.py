"""Throwaway redis-servers with ACL users and TLS (certificates made with openssl), for the
tests of docs/deployment.md#secure-redis-acl-tls::

    certs = make_certs(tmp_path / "certs")            # a CA, the server's and a client's
    server = SecureRedis(tmp_path / "r", tls=certs).start()
    server.url(user="yichui", password=YICHUI_PASSWORD)    # rediss://yichui:…@127.0.0.1:<port>/0

and the server of ``--redis=acl`` (tests/conftest.py), which runs the core suites as that user::

    server = AclRedisProcess(tmp_path).start()        # no namespace: the documented prefixes
    server.url                                        # redis://yichui:…@127.0.0.1:<port>/0
    server.client()                                   # admin
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import redis

from tests.redis_proc import RedisProcess, end_process, free_port, wait_until
from tests.tls_certs import Certs as Certs
from tests.tls_certs import make_certs as make_certs  # re-exported: the tests import it here
from tests.tls_certs import tls_args, tls_client_kwargs
from yichui.state.embedded import find_redis_server

ADMIN_PASSWORD = "adm1n-Secret-9f3"
YICHUI_PASSWORD = "yc-S3cret-pw-51d7"
"""Passwords the tests grep for: they must appear in no output, log, record or metric."""

NAMESPACE = "yc"

NO_NAMESPACE_PATTERNS = (
    "~model_*",
    "~task_*",
    "~response*",
    "~eval_result:*",
    "~api_keys",
    "~session:*",
    "~audit_log",
    "~servers",
    "&model_events",
    "&task_events",
    "&response_events",
    "&api_key_events",
)
"""The keys and channels of a deployment without a namespace (docs/deployment.md, from
docs/keys.md): the ACL's patterns when ``namespace`` is empty."""

YICHUI_COMMANDS = (
    "-@all",
    # connection: redis-py's handshake and health checks
    "+hello",
    "+auth",
    "+ping",
    "+select",
    "+client|setname",
    # the eviction check, the metrics; the scripts' clock
    "+info",
    "+time",
    # strings and key lifetimes
    "+get",
    "+set",
    "+strlen",
    "+del",
    "+unlink",
    "+exists",
    "+expire",
    "+pexpire",
    "+persist",
    "+ttl",
    "+pttl",
    "+scan",
    # hashes
    "+hget",
    "+hset",
    "+hdel",
    "+hgetall",
    "+hkeys",
    "+hexists",
    "+hincrby",
    # sorted sets
    "+zadd",
    "+zrem",
    "+zscore",
    "+zcard",
    "+zcount",
    "+zrange",
    "+zrevrange",
    "+zrangebyscore",
    "+zremrangebyscore",
    # streams (task queue, logs, live answers, audit log)
    "+xadd",
    "+xrange",
    "+xrevrange",
    "+xread",
    "+xreadgroup",
    "+xack",
    "+xdel",
    "+xlen",
    "+xclaim",
    "+xautoclaim",
    "+xpending",
    "+xinfo|consumers",
    "+xgroup|create",
    "+xgroup|createconsumer",
    "+xgroup|delconsumer",
    # task_durability's replica acknowledgements
    "+wait",
    # events
    "+publish",
    "+subscribe",
    "+unsubscribe",
    # Lua scripts (their commands are checked against this same ACL)
    "+evalsha",
    "+eval",
    "+script|load",
    "+script|exists",
    # the response cache's transactional pipeline
    "+multi",
    "+exec",
    "+discard",
    # a Redis Cluster client's: the slots, the commands' key positions, a slot being moved
    "+cluster|slots",
    "+command",
    "+asking",
)
"""The commands of the documented ACL: everything yichui runs, nothing more."""


def yichui_acl(namespace: str) -> tuple[str, ...]:
    """The documented ACL rules of the ``yichui`` user for ``namespace`` (``""``: none)."""
    patterns = (f"~{namespace}:*", f"&{namespace}:*") if namespace else NO_NAMESPACE_PATTERNS
    return ("on", f">{YICHUI_PASSWORD}", "resetkeys", "resetchannels", *patterns, *YICHUI_COMMANDS)


YICHUI_ACL = yichui_acl(NAMESPACE)
"""The ACL of docs/deployment.md, for namespace ``yc``: a test checks the two agree."""


def acl_users(namespace: str) -> list[str]:
    """redis-server arguments: the ``default`` user off, ``admin`` with every right, ``yichui``
    with the documented ACL for ``namespace``."""
    return [
        *("--user", "default", "off"),
        *("--user", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all"),
        *("--user", "yichui", *yichui_acl(namespace)),
    ]


class SecureRedis:
    """A redis-server whose default user is off: ``admin`` may do anything, ``yichui`` has
    :data:`YICHUI_ACL`. With ``tls``, it listens on TLS only and asks for client certificates."""

    def __init__(self, workdir: Path, *, tls: Certs | None = None, acl: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.acl = acl
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, user: str = "yichui", password: str = YICHUI_PASSWORD) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}:{password}@127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> SecureRedis:
        assert self.port != 6379, "tests never use the shared Redis on 6379"
        args = [find_redis_server(), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no",
                "--logfile", str(self.workdir / "redis.log")]  # fmt: skip
        if self.acl:
            args += acl_users(NAMESPACE)
        if self.tls:
            args += tls_args(self.tls, self.port)
        else:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*args, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self._ready, what=f"redis-server on port {self.port}")
        return self

    def admin(self) -> redis.Redis:
        """A client that may do anything (to set the server up, or look at it)."""
        kwargs = tls_client_kwargs(self.tls)
        if self.acl:
            kwargs.update(username="admin", password=ADMIN_PASSWORD)
        return redis.Redis(port=self.port, socket_timeout=5, **kwargs)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited, see {self.workdir / 'redis.log'}")
        with self.admin() as c:
            return bool(c.ping())

    def stop(self) -> None:
        end_process(self.proc, signal.SIGTERM)
        self.proc = None


class AclRedisProcess(RedisProcess):
    """A :class:`RedisProcess` with the users of :func:`acl_users` (``--redis=acl``): its
    :attr:`url` is the ``yichui`` user's, what yichui connects with; its :meth:`client` is
    ``admin``, for the tests' own setup, inspection, flushing and ``ACL LOG``."""

    def __init__(self, workdir: Path, *, namespace: str = "", **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.namespace = namespace

    @property
    def url(self) -> str:
        return f"redis://yichui:{YICHUI_PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> AclRedisProcess:
        super().start(*acl_users(self.namespace), *extra)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, username="admin", password=ADMIN_PASSWORD, socket_timeout=5
        )
