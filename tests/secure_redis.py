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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.redis_proc import RedisProcess, end_process, free_port, wait_until
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


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing here: the wrong one."""


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(folder: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    f = {n: str(folder / n) for n in ("ca.key", "ca.crt", "other.key", "other.crt", "ext.cnf")}
    for key, crt, cn in (("ca.key", "ca.crt", "yichui test CA"), ("other.key", "other.crt", "x")):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                 f"/CN={cn}", "-keyout", f[key], "-out", f[crt])  # fmt: skip
    Path(f["ext.cnf"]).write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    for name in ("server", "client"):
        key, csr, crt = (str(folder / f"{name}.{e}") for e in ("key", "csr", "crt"))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key,
                 "-out", csr)  # fmt: skip
        _openssl("x509", "-req", "-in", csr, "-CA", f["ca.crt"], "-CAkey", f["ca.key"],
                 "-CAcreateserial", "-days", "2", "-extfile", f["ext.cnf"],
                 "-out", crt)  # fmt: skip
    return Certs(
        ca=folder / "ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
        other_ca=folder / "other.crt",
    )


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
            t = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                     str(t.server_cert), "--tls-key-file", str(t.server_key),
                     "--tls-ca-cert-file", str(t.ca), "--tls-auth-clients", "yes"]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*args, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self._ready, what=f"redis-server on port {self.port}")
        return self

    def admin(self) -> redis.Redis:
        """A client that may do anything (to set the server up, or look at it)."""
        kwargs: dict[str, object] = {}
        if self.tls:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.tls.ca),
                      "ssl_certfile": str(self.tls.client_cert),
                      "ssl_keyfile": str(self.tls.client_key)}  # fmt: skip
        if self.acl:
            kwargs.update(username="admin", password=ADMIN_PASSWORD)
        return redis.Redis(port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

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
