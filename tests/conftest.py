from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.redis_proc import ClusterProcesses, RedisProcess, redis_for
from tests.secure_redis import AclRedisProcess
from yichui.config import Settings, load_settings
from yichui.models.registry import ModelRegistry
from yichui.runtime import Runtime
from yichui.state.model_status import ModelStatusStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = [
    "tests.hub_fixtures",
    "tests.task_fixtures",
    "tests.training_fixtures",
    "tests.swift_fixtures",
    "tests.suite_checks",
]  # fake hub and SDK isolation fixtures; checks on the whole run


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis",
        choices=("standalone", "cluster", "acl"),
        default="standalone",
        help="what redis_server/redis_url/redis_client give: one redis-server, a 3-master "
        "Redis Cluster, or one redis-server where yichui connects as the documented "
        "least-privilege ACL user and ACL LOG must stay empty (make pytest runs the core "
        "suites all three ways)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "standalone_only(reason): needs one plain redis-server and full rights on it "
        "(CONFIG SET, DEBUG, a kill): deselected under --redis=cluster and --redis=acl",
    )
    config.addinivalue_line(
        "markers",
        "cluster_only(reason): about the cluster client itself: deselected unless --redis=cluster",
    )


def redis_mode(config: pytest.Config) -> str:
    """``standalone``, ``cluster`` or ``acl``: the ``--redis`` option."""
    return str(config.getoption("--redis"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mode = redis_mode(config)
    drop = "cluster_only" if mode != "cluster" else None
    keep, dropped = [], []
    for item in items:
        unfit = item.get_closest_marker(drop) if drop else None
        if mode != "standalone" and item.get_closest_marker("standalone_only"):
            unfit = True
        (dropped if unfit else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def cluster_mode(config: pytest.Config) -> bool:
    return redis_mode(config) == "cluster"


@pytest.fixture(scope="session")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[RedisProcess | ClusterProcesses]:
    """One throwaway redis-server for the session (--redis=cluster: a 3-master cluster;
    --redis=acl: an :class:`AclRedisProcess`, its ``default`` user off, ``admin`` and the
    documented ``yichui`` user for the default namespace); tests get it flushed."""
    server: RedisProcess | ClusterProcesses
    mode = redis_mode(pytestconfig)
    if mode == "cluster":
        server = ClusterProcesses(tmp_path_factory.mktemp("cluster")).start()
    elif mode == "acl":
        server = AclRedisProcess(tmp_path_factory.mktemp("redis-acl")).start()
    else:
        server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess | ClusterProcesses) -> str:
    """The URL yichui connects with (--redis=acl: as the least-privilege ``yichui`` user)."""
    if isinstance(redis_server, ClusterProcesses):
        redis_server.flush()  # every master: our own throwaway nodes
        return redis_server.url
    if redis_server.proc is None:  # a test killed it
        redis_server.start()
    with redis_server.client() as c:  # --redis=acl: admin (yichui's user may not flush)
        c.flushall()  # our own throwaway server, never a shared one
    return redis_server.url


@pytest.fixture
def redis_client(request: pytest.FixtureRequest, redis_url: str) -> Iterator[redis.Redis]:
    """The test's own client of its Redis, to look at keys and set them up (a RedisCluster
    under --redis=cluster, which has the same single-key commands; typed as redis.Redis so
    tests need no cast). Under --redis=acl it is ``admin``: tests look at keys freely, it is
    yichui (through ``redis_url``) that must run least-privileged."""
    acl = redis_mode(request.config) == "acl"
    server = request.getfixturevalue("redis_server") if acl else None
    client: Any
    if isinstance(server, AclRedisProcess) and redis_url == server.url:
        client = server.client()
    else:  # a module's own redis_url may name another server
        client = redis_for(redis_url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def acl_log_stays_empty(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under --redis=acl, fails a test after which ``ACL LOG`` is not empty: a command or key
    the ``yichui`` user was denied, even one yichui swallowed (a cache that quietly bypasses
    on NOPERM), is a finding. Only for tests that use the test's Redis."""
    if redis_mode(request.config) != "acl" or "redis_server" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("redis_server")
    assert isinstance(server, AclRedisProcess)
    with server.client() as admin:
        admin.acl_log_reset()
    yield
    if server.proc is None:  # a test stopped it
        return
    with server.client() as admin:
        entries = admin.acl_log()
        admin.acl_log_reset()
    if entries:
        denied = "; ".join(
            f"{e.get('username')} denied {e.get('reason')} {e.get('object')!r} "
            f"({e.get('context')}, {e.get('count')}x)"
            for e in entries
        )
        pytest.fail(f"ACL LOG is not empty after the test: {denied}", pytrace=False)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No YICHUI_* variable of the developer's shell reaches the test's settings."""
    for key in list(os.environ):
        if key.startswith("YICHUI_"):
            monkeypatch.delenv(key)


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("YICHUI_"):
            monkeypatch.delenv(key)
    return load_settings(
        data_dir=tmp_path / "data",
        models_root=tmp_path / "models",
        redis_url=redis_url,
        mirror_dir=tmp_path / "mirror",
    )


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    """The composition root on the test's settings: tests take their services from it."""
    rt = Runtime(settings)
    yield rt
    rt.close()


@pytest.fixture
def store(runtime: Runtime) -> ModelStatusStore:
    assert runtime.model_store is not None  # the test's Redis is up
    return runtime.model_store


@pytest.fixture
def registry(settings: Settings, runtime: Runtime) -> ModelRegistry:
    settings.models_path.mkdir(parents=True, exist_ok=True)
    return runtime.registry
