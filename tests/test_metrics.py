"""``/metrics``: a real ``yichui serve --workers 1`` with its worker's own metrics port, a real
Redis, the official ``openai`` client (the model ``echo`` is an upstream test double), and the
scrape read back with prometheus-client's parser."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api_server import ServerProcess
from tests.deploy_metrics import used_metric_names
from tests.fake_upstream import FakeUpstream, fake_upstream
from tests.redis_proc import RedisProcess, free_port, wait_until
from yichui.api.app import create_app
from yichui.config import Settings, load_settings
from yichui.errors import ConfigError
from yichui.metrics import ClusterSnapshot, Metrics
from yichui.metrics_access import check_access
from yichui.runtime import Runtime
from yichui.runtime.metrics_server import MetricsServer

TOKEN = "scrape-me"


class Scrape:
    """One scrape, parsed: samples by (name, labels), and every family declared."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """The sum over the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def label_values(self, label: str) -> set[str]:
        return {v for (_, ls) in self.samples for k, v in ls if k == label}

    def declared(self) -> set[str]:
        """Family names as in ``# TYPE`` lines (counters with ``_total``)."""
        return {
            f"{name}_total" if kind == "counter" else name for name, kind in self.families.items()
        }


def scrape(url: str, token: str | None = TOKEN) -> Scrape:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with fake_upstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("metrics-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(
    own_redis: RedisProcess, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, int]]:
    worker_port = free_port()
    proc = ServerProcess(
        tmp_path_factory.mktemp("serve"),
        redis_url=own_redis.url,
        args=("--workers", "1", "--worker-metrics-port", str(worker_port)),
        upstreams={"echo": {"url": upstream.url, "model": "echo-up"}},
        metrics_token=TOKEN,
        cache_timeout=1.0,  # a loaded CI box must not turn these Redis calls into faults
        task_heartbeat=0.5,
    ).start()
    yield proc, worker_port
    proc.stop()


def _chat(client: openai.OpenAI, model: str = "echo") -> str:
    raw = client.chat.completions.with_raw_response.create(
        model=model, temperature=0, messages=[{"role": "user", "content": "capital of France"}]
    )
    raw.parse()
    return str(raw.headers.get("x-yichui-cache"))


def test_a_scrape_after_a_miss_a_hit_and_a_task(
    served: tuple[ServerProcess, int], own_redis: RedisProcess, tmp_path: Path
) -> None:
    server, worker_port = served
    client = server.openai()
    assert [_chat(client), _chat(client)] == ["miss", "hit"]
    with pytest.raises(openai.NotFoundError):
        _chat(client, model="no-such-model-xyz")
    with pytest.raises(openai.NotFoundError):  # asked again: the negative entry answers
        _chat(client, model="no-such-model-xyz")
    rt = Runtime(
        load_settings(redis_url=own_redis.url, data_dir=tmp_path / "data", task_heartbeat=0.5)
    )
    try:
        task = rt.tasks.submit("selftest", {"steps": 2, "step_seconds": 0.05})
        wait_until(lambda: rt.tasks.get(task["id"])["state"] == "succeeded", 30, "the task")
    finally:
        rt.close()

    api = scrape(f"{server.url}/metrics")
    labels = {"endpoint": "chat", "model": "echo"}
    assert api.value("yichui_cache_requests_total", **labels, result="miss") == 1
    assert api.value("yichui_cache_requests_total", **labels, result="hit") == 1
    assert api.value("yichui_cache_stores_total", **labels) == 1
    # the miss was looked up; the hit too, unless the hit fast path answered it from memory
    near = api.value("yichui_cache_near_hits_total", **labels) or 0
    assert api.total("yichui_cache_lookup_seconds_count", endpoint="chat") == 2 - near
    assert api.value("yichui_cache_breaker_state", state="closed") == 1
    assert api.total("yichui_engine_seconds_count", model="echo") == 1
    assert api.total("yichui_request_seconds_count", endpoint="chat", cache="hit") == 1
    assert api.total("yichui_request_seconds_count", endpoint="chat", code="404") == 2
    # model labels are bounded: a name no engine serves never becomes one
    assert "no-such-model-xyz" not in api.text
    assert api.value("yichui_model_status_lookups_total", result="miss") == 1
    assert api.value("yichui_model_status_lookups_total", result="hit") == 1
    # the deployment's figures, read from Redis for this scrape, marked scope="cluster"
    assert api.value("yichui_redis_up", scope="cluster", redis="state") == 1
    assert (api.value("yichui_redis_used_memory_bytes", scope="cluster", redis="state") or 0) > 0
    assert api.value("yichui_redis_maxmemory_bytes", scope="cluster", redis="state") == 0
    assert api.value("yichui_tasks", scope="cluster", state="succeeded") == 1
    assert api.value("yichui_task_queue_depth", scope="cluster", queue="default") == 0
    assert api.value("yichui_task_pending", scope="cluster", queue="default") == 0
    assert api.value("yichui_workers_live", scope="cluster") == 1
    ages = [v for (n, _), v in api.samples.items() if n == "yichui_worker_heartbeat_age_seconds"]
    assert len(ages) == 1 and 0 <= ages[0] < 5
    assert api.value("yichui_build_info", version="0.1.0", role="api") == 1
    # the fleet-wide totals in Redis are written through the same counts (yichui cache stats)
    with own_redis.client() as c:
        wait_until(lambda: c.hget("response_stats", "hit") == b"1", 10, "the flushed totals")
        assert c.hget("response_stats", "miss") == b"1"

    worker = scrape(f"http://127.0.0.1:{worker_port}/metrics")
    assert worker.value("yichui_worker_tasks_total", type="selftest", outcome="succeeded") == 1
    assert worker.total("yichui_worker_task_seconds_count", type="selftest") == 1
    assert worker.value("yichui_worker_running") == 0
    assert worker.value("yichui_build_info", version="0.1.0", role="worker") == 1
    # the same deployment figures on every scraped process: aggregate them with max, not sum
    assert worker.value("yichui_workers_live", scope="cluster") == 1
    assert "yichui_cache_requests_total" not in worker.declared() - api.declared()
    # every metric the alert rules and the Grafana dashboard of deploy/ use is exported
    missing = used_metric_names() - (api.declared() | worker.declared())
    assert not missing, f"deploy/ uses metrics no process exports: {sorted(missing)}"


def test_the_metrics_token(served: tuple[ServerProcess, int]) -> None:
    server, worker_port = served
    for url in (f"{server.url}/metrics", f"http://127.0.0.1:{worker_port}/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = httpx.get(url, headers=headers, timeout=10)
            assert response.status_code == 401, (url, headers)
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and "metrics token" in error["message"]
            assert response.headers["www-authenticate"] == "Bearer"
    response = httpx.get(f"http://127.0.0.1:{worker_port}/other", timeout=10)
    assert response.status_code == 404 and "error" in response.json()


def test_a_scrape_with_redis_down(upstream: FakeUpstream, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = ServerProcess(
        tmp_path, redis_url=dead, upstreams={"echo": {"url": upstream.url, "model": "echo-up"}}
    ).start()
    try:
        assert _chat(server.openai()) == "bypass"  # served uncached, as ever
        started = time.monotonic()
        api = scrape(f"{server.url}/metrics", token=None)  # no token set: loopback may read
        assert time.monotonic() - started < 5
        assert api.value("yichui_redis_up", scope="cluster", redis="state") == 0
        assert "yichui_redis_used_memory_bytes" not in {n for n, _ in api.samples}
        assert "yichui_tasks" not in {n for n, _ in api.samples}
        assert api.value("yichui_cache_requests_total", endpoint="chat", model="echo",
                         result="bypass") == 1  # fmt: skip
        assert api.total("yichui_cache_faults_total") >= 1
    finally:
        server.stop()


async def test_loopback_only_without_a_token(settings: Settings) -> None:
    app = create_app(settings)
    for host, status in (("10.1.2.3", 403), ("127.0.0.1", 200), ("::1", 200)):
        transport = httpx.ASGITransport(app=app, client=(host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/metrics")
        assert response.status_code == status, host
        if status == 403:
            assert "metrics_token" in response.json()["error"]["message"]


def test_check_access() -> None:
    assert check_access(None, "127.0.0.1", None) is None
    assert check_access(None, "::1", "Bearer whatever") is None
    assert check_access(None, "192.168.1.9", None).status == 403  # type: ignore[union-attr]
    assert check_access(None, None, None).status == 403  # type: ignore[union-attr]
    assert check_access("t", "192.168.1.9", "Bearer t") is None
    assert check_access("t", "127.0.0.1", "bearer t") is None
    for auth in (None, "", "Bearer", "Bearer x", "Basic t", "t"):
        assert check_access("t", "127.0.0.1", auth).status == 401  # type: ignore[union-attr]


def test_cluster_figures_absent_or_marked() -> None:
    m = Metrics(role="worker")
    empty = Scrape(m.exposition(None).decode())
    assert not any(n.startswith("yichui_redis") for n, _ in empty.samples)
    snap = ClusterSnapshot(
        redis={"state": {"used_memory": 10.0, "evicted_keys": 2.0}, "cache": None},
        tasks={"queued": 3},
        queues={"default": (3, 1)},
        workers=[],
    )
    full = Scrape(m.exposition(snap).decode())
    assert full.value("yichui_redis_up", scope="cluster", redis="cache") == 0
    assert full.value("yichui_redis_evicted_keys_total", scope="cluster", redis="state") == 2
    assert full.value("yichui_workers_live", scope="cluster") == 0
    cluster = {n for (n, ls) in full.samples if ("scope", "cluster") in ls}
    assert cluster >= {"yichui_redis_up", "yichui_tasks", "yichui_task_queue_depth"}
    per_process = {n for (n, ls) in full.samples if n.startswith("yichui_")} - cluster
    assert per_process == {"yichui_build_info", "yichui_worker_running"}  # unlabelled ones


def test_worker_metrics_port_taken(settings: Settings) -> None:
    rt = Runtime(settings, role="worker")
    first = MetricsServer(rt, host="127.0.0.1", port=0).start()
    try:
        with pytest.raises(ConfigError, match=r"cannot serve metrics on 127\.0\.0\.1"):
            MetricsServer(rt, host="127.0.0.1", port=first.port).start()
        assert "yichui_build_info" in scrape(f"http://127.0.0.1:{first.port}/metrics", None).text
    finally:
        first.stop()
        rt.close()


def test_hit_path_counters_as_prometheus_counts_them() -> None:
    """The hit path's own counters and histograms (plain, on the event loop) give what
    prometheus-client's would: a value on a bucket's bound falls in that bucket."""
    m = Metrics(role="api")
    for seconds in (0.001, 0.0007, 3.0):
        m.request_took("chat", "hit", "200", seconds)
    m.near_hit("chat", "echo", fast=True)
    m.cache_result("chat", "echo", "miss")
    got = Scrape(m.exposition().decode())
    labels = {"endpoint": "chat", "cache": "hit", "code": "200"}
    assert got.value("yichui_request_seconds_bucket", **labels, le="0.0005") == 0
    assert got.value("yichui_request_seconds_bucket", **labels, le="0.001") == 2
    assert got.value("yichui_request_seconds_bucket", **labels, le="2.5") == 2
    assert got.value("yichui_request_seconds_bucket", **labels, le="+Inf") == 3
    assert got.value("yichui_request_seconds_count", **labels) == 3
    assert got.value("yichui_request_seconds_sum", **labels) == pytest.approx(3.0017)
    assert got.families["yichui_request_seconds"] == "histogram"
    assert (
        got.value("yichui_cache_requests_total", endpoint="chat", model="echo", result="hit") == 1
    )
    assert got.value("yichui_cache_near_hits_total", endpoint="chat", model="echo") == 1
    assert m.take_fleet() == {"hit": 1, "near_hits": 1, "fast_hits": 1, "miss": 1}
    assert m.take_fleet() == {}
