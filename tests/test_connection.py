"""Redis URLs and the clients built from them, against real servers, Sentinels and Clusters."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from tests.redis_proc import (
    ClusterProcesses,
    PasswordRedisProcess,
    RedisProcess,
    SentinelProcess,
    free_port,
)
from yichui.config import Settings, load_settings
from yichui.errors import ConfigError, RedisSetupError, RedisUnavailableError
from yichui.state.connection import (
    connect,
    make_async_client,
    make_sync_client,
    mask_password,
    parse_redis_url,
)

MakeSettings = Callable[[str], Settings]


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MakeSettings:
    """Settings pointing at one URL, the environment's YICHUI_* variables ignored."""
    for key in list(os.environ):
        if key.startswith("YICHUI_"):
            monkeypatch.delenv(key)

    def make(url: str) -> Settings:
        return load_settings(data_dir=tmp_path / "data", redis_url=url)

    return make


# -- URL parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "tls"),
    [
        ("redis://localhost:6380/2", False),
        ("redis://:pw@10.0.0.1", False),
        ("rediss://user:pw@cache.example:6380/0", True),
        ("unix:///run/redis/redis.sock?db=3", False),
        ("REDIS://Host:1/0", False),
    ],
)
def test_parse_standalone(url: str, tls: bool) -> None:
    target = parse_redis_url(url)
    assert target.kind == "standalone"
    assert target.tls is tls
    assert target.url == url


def test_parse_sentinel_full() -> None:
    target = parse_redis_url(
        "redis+sentinel://bob:s%40cret@s1.example:26379,10.0.0.2:26380/primary/4"
        "?sentinel_password=sentpw"
    )
    assert target.kind == "sentinel"
    assert target.tls is False
    assert target.nodes == (("s1.example", 26379), ("10.0.0.2", 26380))
    assert target.master == "primary"
    assert target.db == 4
    assert (target.username, target.password) == ("bob", "s@cret")
    assert target.options == {"sentinel_password": "sentpw"}


def test_parse_sentinel_minimal_and_tls() -> None:
    target = parse_redis_url("redis+sentinel://127.0.0.1:26379/mymaster")
    assert (target.nodes, target.master, target.db) == ((("127.0.0.1", 26379),), "mymaster", 0)
    assert (target.username, target.password, target.options) == (None, None, {})
    assert parse_redis_url("rediss+sentinel://h:1/m").tls is True
    only_password = parse_redis_url("redis+sentinel://:pw@h:1/m")
    assert (only_password.username, only_password.password) == (None, "pw")


def test_parse_cluster() -> None:
    target = parse_redis_url("redis+cluster://:pw@n1:7000, n2:7001,[::1]:7002")
    assert target.kind == "cluster"
    assert target.nodes == (("n1", 7000), ("n2", 7001), ("::1", 7002))
    assert target.master is None
    assert target.db == 0
    assert target.password == "pw"
    assert parse_redis_url("rediss+cluster://n1:7000").tls is True
    assert parse_redis_url("redis+cluster://n1:7000/").nodes == (("n1", 7000),)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:6379", "expected scheme://"),
        ("http://localhost:6379", "unknown scheme 'http'"),
        ("redis+sentinal://h:1/m", "unknown scheme 'redis+sentinal'"),
        ("redis+sentinel://h:26379", "missing /<master-name>"),
        ("redis+sentinel://h:26379/", "missing /<master-name>"),
        ("redis+sentinel://h:26379/m/x", "unexpected path /x"),
        ("redis+sentinel://h:26379/m/1/2", "unexpected path /1/2"),
        ("redis+sentinel://h:port/m", "expected host:port, got 'h:port'"),
        ("redis+sentinel://h/m", "expected host:port, got 'h'"),
        ("redis+cluster://h:1,:2", "expected host:port, got ':2'"),
        ("redis+cluster://h:1,h:99999", "expected host:port, got 'h:99999'"),
        ("redis+cluster://h:7000/0", "unexpected path /0"),
        ("redis+cluster://h:7000,h:7001/1", "unexpected path /1"),
        ("redis://localhost:abc/0", "Port could not be cast"),
        ("redis://localhost:99999", "Port out of range"),
        ("redis://localhost:6379/zero", "unexpected path /zero"),
        ("unix://redis.sock", "expected unix:///path/to/socket"),
    ],
)
def test_parse_malformed(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_redis_url(url)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_scheme_has_a_hint() -> None:
    with pytest.raises(ConfigError) as info:
        parse_redis_url("memcached://h:1")
    assert info.value.hint is not None
    assert "redis+sentinel://" in info.value.hint


def test_malformed_url_error_does_not_leak_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_redis_url("redis+sentinel://:topsecret@h:1")
    assert "topsecret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_redis_url("redis://:topsecret@h:bad/0")
    assert "topsecret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:pw@h:1/0", "redis://user:***@h:1/0"),
        ("rediss://user:p%40w@h:1", "rediss://user:***@h:1"),
        ("redis://user@h:1/0", "redis://user@h:1/0"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("REDIS://:pw@h:1", "REDIS://:***@h:1"),
        ("redis+sentinel://u:p@ss@a:1,b:2/m/1", "redis+sentinel://u:***@a:1,b:2/m/1"),
        (
            "redis+sentinel://:pw@a:1/m?sentinel_password=spw",
            "redis+sentinel://:***@a:1/m?sentinel_password=***",
        ),
        ("redis+cluster://:pw@a:1,b:2", "redis+cluster://:***@a:1,b:2"),
        ("unix:///tmp/r.sock?db=1&password=pw", "unix:///tmp/r.sock?db=1&password=***"),
    ],
)
def test_display_masks_passwords(url: str, shown: str) -> None:
    assert mask_password(url) == shown
    assert parse_redis_url(url).display == shown


# -- standalone ------------------------------------------------------------------------------


@dataclass
class Secured:
    server: PasswordRedisProcess
    socket: Path

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A standalone server with a password and a unix socket (short path: 108-byte limit)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="yc-", dir="/tmp"))
    server = PasswordRedisProcess(tmp_path_factory.mktemp("secured"), "s3cret")
    try:
        server.start("--unixsocket", str(sock_dir / "redis.sock"), "--unixsocketperm", "700")
        yield Secured(server, sock_dir / "redis.sock")
    finally:
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_standalone_tcp_sync(make_settings: MakeSettings, redis_url: str) -> None:
    settings = make_settings(redis_url.rsplit("/", 1)[0] + "/3")
    client, target = connect(settings)
    try:
        assert target.kind == "standalone"
        assert isinstance(client, redis.Redis)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.connection_pool.connection_kwargs["db"] == 3
        assert client.client_getname() == "yichui"
    finally:
        client.close()
    with redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3") as raw:
        assert raw.get("k") == b"v"


def test_standalone_with_password(make_settings: MakeSettings, secured_server: Secured) -> None:
    url = f"redis://:s3cret@127.0.0.1:{secured_server.port}/1"
    client, target = connect(make_settings(url))
    try:
        client.set("k", "tcp")
        assert client.get("k") == b"tcp"
    finally:
        client.close()
    assert target.display == f"redis://:***@127.0.0.1:{secured_server.port}/1"

    wrong = f"redis://:nope@127.0.0.1:{secured_server.port}/1"
    with pytest.raises(RedisSetupError) as info:  # a setting to fix: exit code 2
        connect(make_settings(wrong))
    assert "nope" not in str(info.value) and "authentication failed" in str(info.value)
    assert info.value.exit_code == 2


def test_standalone_unix_socket(make_settings: MakeSettings, secured_server: Secured) -> None:
    sock = secured_server.socket
    client, target = connect(make_settings(f"unix://{sock}?db=2&password=s3cret"))
    try:
        assert target.kind == "standalone"
        assert "s3cret" not in target.display
        assert isinstance(client, redis.Redis)
        client.set("via", "socket")
        assert client.get("via") == b"socket"
        assert client.connection_pool.connection_kwargs["path"] == str(sock)
    finally:
        client.close()
    with redis.Redis(port=secured_server.port, password="s3cret", db=2) as tcp:
        assert tcp.get("via") == b"socket"


async def test_standalone_async(make_settings: MakeSettings, secured_server: Secured) -> None:
    sock = secured_server.socket
    for url in (
        f"redis://:s3cret@127.0.0.1:{secured_server.port}/4",
        f"unix://:s3cret@{sock}?db=4",
    ):
        client = make_async_client(parse_redis_url(url), make_settings(url))
        try:
            assert isinstance(client, aredis.Redis)
            await client.set("a", url)
            assert await client.get("a") == url.encode()
        finally:
            await client.aclose()


def test_tls_url_builds_ssl_clients(make_settings: MakeSettings) -> None:
    url = "rediss://:pw@127.0.0.1:6390/0"
    client = make_sync_client(parse_redis_url(url), make_settings(url))
    try:
        assert isinstance(client, redis.Redis)
        assert client.connection_pool.connection_class is redis.SSLConnection
    finally:
        client.close()


# -- unreachable -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "redis://:topsecret@127.0.0.1:{port}/0",
        "redis+sentinel://:topsecret@127.0.0.1:{port}/mymaster",
        "redis+cluster://:topsecret@127.0.0.1:{port}",
    ],
    ids=["standalone", "sentinel", "cluster"],
)
def test_connect_unreachable_fails_fast(make_settings: MakeSettings, template: str) -> None:
    url = template.format(port=free_port())  # nothing listens there: connection refused
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        connect(make_settings(url))
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "\n" not in message
    assert "unreachable" in message
    assert "topsecret" not in message and ":***@" in message
    assert info.value.reason
    assert info.value.hint


# -- Sentinel --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["open", "auth"])
def sentinel(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RedisProcess]]:
    """A master and one Sentinel watching it; yields the ``redis+sentinel://`` URL."""
    auth = request.param == "auth"
    workdir = tmp_path_factory.mktemp(f"sentinel-{request.param}")
    master = (
        PasswordRedisProcess(workdir / "master", "masterpw")
        if auth
        else RedisProcess(workdir / "master")
    )
    sentinel = SentinelProcess(
        workdir / "sentinel",
        master.port,
        master_name="yc-master",
        master_password="masterpw" if auth else None,
        password="sentinelpw" if auth else None,
    )
    master.start()
    try:
        sentinel.start()
        if auth:
            url = (
                f"redis+sentinel://:masterpw@127.0.0.1:{sentinel.port}/yc-master/2"
                "?sentinel_password=sentinelpw"
            )
        else:
            url = f"redis+sentinel://127.0.0.1:{sentinel.port}/yc-master/2"
        yield url, master
    finally:
        sentinel.stop()
        master.stop()


def _master_password(url: str) -> str | None:
    return parse_redis_url(url).password


def test_sentinel_sync(make_settings: MakeSettings, sentinel: tuple[str, RedisProcess]) -> None:
    url, master = sentinel
    client, target = connect(make_settings(url))
    try:
        assert target.kind == "sentinel"
        assert isinstance(client, redis.Redis)
        client.set("sentinel:sync", "yes")
        assert client.get("sentinel:sync") == b"yes"
    finally:
        client.close()
    # it really landed on the master, in db 2
    with redis.Redis(port=master.port, password=_master_password(url), db=2) as direct:
        assert direct.get("sentinel:sync") == b"yes"


async def test_sentinel_async(
    make_settings: MakeSettings, sentinel: tuple[str, RedisProcess]
) -> None:
    url, master = sentinel
    client = make_async_client(parse_redis_url(url), make_settings(url))
    try:
        assert isinstance(client, aredis.Redis)
        await client.set("sentinel:async", "yes")
        assert await client.get("sentinel:async") == b"yes"
    finally:
        await client.aclose()
    gc.collect()  # a leaked Sentinel connection would warn (ResourceWarning) here
    with redis.Redis(port=master.port, password=_master_password(url), db=2) as direct:
        assert direct.get("sentinel:async") == b"yes"


def test_sentinel_unknown_master(
    make_settings: MakeSettings, sentinel: tuple[str, RedisProcess]
) -> None:
    url, _ = sentinel
    target = parse_redis_url(url)
    port = target.nodes[0][1]
    bad = url.replace(f":{port}/yc-master/", f":{port}/no-such-master/")
    with pytest.raises(RedisSetupError) as info:  # a setting to fix: exit code 2
        connect(make_settings(bad))
    assert "'no-such-master'" in str(info.value) and "yc-master" in str(info.value)
    assert info.value.exit_code == 2


# -- Cluster ---------------------------------------------------------------------------------

_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', 30000) then
    redis.call('HSET', KEYS[2], 'state', ARGV[2])
    return 1
end
return 0
"""
_LOCK, _STATUS = "model_lock:{x}", "model_status:{x}"
_SPREAD = [f"spread:{i}" for i in range(12)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcesses]:
    procs = ClusterProcesses(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture
def cluster_url(cluster: ClusterProcesses) -> str:
    for node in cluster.nodes:
        with node.client() as c:
            c.flushall()
    return cluster.url


def test_cluster_sync(make_settings: MakeSettings, cluster_url: str) -> None:
    client, target = connect(make_settings(cluster_url))
    try:
        assert target.kind == "cluster"
        assert isinstance(client, RedisCluster)
        assert len({client.keyslot(k) for k in _SPREAD}) > 1
        assert len({client.get_node_from_key(k).name for k in _SPREAD}) == 3

        client.set("plain", "1")
        assert client.get("plain") == b"1"

        pipe = client.pipeline(transaction=False)
        for key in _SPREAD:
            pipe.set(key, key.upper())
        for key in _SPREAD:
            pipe.get(key)
        results = pipe.execute()
        assert results[len(_SPREAD) :] == [k.upper().encode() for k in _SPREAD]

        assert client.keyslot(_LOCK) == client.keyslot(_STATUS)
        assert client.eval(_SCRIPT, 2, _LOCK, _STATUS, "owner", "pulling") == 1
        script = client.register_script(_SCRIPT)
        assert script(keys=[_LOCK, _STATUS], args=["other", "x"]) == 0  # lock held
        assert client.hget(_STATUS, "state") == b"pulling"
        assert client.get(_LOCK) == b"owner"
    finally:
        client.close()


async def test_cluster_async(make_settings: MakeSettings, cluster_url: str) -> None:
    client = make_async_client(parse_redis_url(cluster_url), make_settings(cluster_url))
    try:
        assert isinstance(client, AsyncRedisCluster)
        await client.set("plain", "2")
        assert await client.get("plain") == b"2"

        async with client.pipeline(transaction=False) as pipe:
            for key in _SPREAD:
                pipe.set(key, key)
            for key in _SPREAD:
                pipe.get(key)
            results = await pipe.execute()
        assert results[len(_SPREAD) :] == [k.encode() for k in _SPREAD]

        assert await client.eval(_SCRIPT, 2, _LOCK, _STATUS, "owner", "ready") == 1
        script = client.register_script(_SCRIPT)
        assert await script(keys=[_LOCK, _STATUS], args=["other", "x"]) == 0
        assert await client.hget(_STATUS, "state") == b"ready"
    finally:
        await client.aclose()


def test_cluster_rejects_cross_slot_script(make_settings: MakeSettings, cluster_url: str) -> None:
    client, _ = connect(make_settings(cluster_url))
    try:
        with pytest.raises(RedisClusterException, match="same key slot"):
            client.eval(_SCRIPT, 2, "model_lock:a", "model_status:b", "o", "s")
    finally:
        client.close()
