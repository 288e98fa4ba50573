from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.redis_proc import ClusterProcesses, RedisProcess, redis_for
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
        choices=("standalone", "cluster"),
        default="standalone",
        help="what redis_server/redis_url/redis_client give: one redis-server, or a 3-master "
        "Redis Cluster (make pytest runs the core suites both ways)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "standalone_only(reason): deselected under --redis=cluster, with the reason"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--redis") != "cluster":
        return
    keep, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("standalone_only") else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def cluster_mode(config: pytest.Config) -> bool:
    return bool(config.getoption("--redis") == "cluster")


@pytest.fixture(scope="session")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[RedisProcess | ClusterProcesses]:
    """One throwaway redis-server (or with --redis=cluster a 3-master cluster) for the
    session; tests get it flushed."""
    server: RedisProcess | ClusterProcesses
    if cluster_mode(pytestconfig):
        server = ClusterProcesses(tmp_path_factory.mktemp("cluster")).start()
    else:
        server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess | ClusterProcesses) -> str:
    if isinstance(redis_server, ClusterProcesses):
        redis_server.flush()  # every master: our own throwaway nodes
        return redis_server.url
    if redis_server.proc is None:  # a test killed it
        redis_server.start()
    with redis_server.client() as c:
        c.flushall()  # our own throwaway server, never a shared one
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test's Redis (a RedisCluster under --redis=cluster, which has the same
    single-key commands; typed as redis.Redis so tests need no cast)."""
    client: Any = redis_for(redis_url)
    yield client
    client.close()


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
