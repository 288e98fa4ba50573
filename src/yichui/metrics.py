"""Every metric of a process, in one typed object (prometheus-client). Who may read them is
``metrics_access.py``.

::

    metrics = Metrics(role="api")                    # built once, by the composition root
    metrics.cache_result("chat", "smollm2", "hit")   # Prometheus, and the fleet totals in Redis
    metrics.exposition(cluster=snapshot)             # the text a scrape gets

Each process has its own registry (tests build many in one interpreter). The figures fall in
two kinds:

- **Per process** (no ``scope`` label): what this process did: cache results, latencies, model
  loads, tasks run. Summing them over processes gives the fleet's figure.
- **Per deployment** (``scope="cluster"``): read from Redis at scrape time (queue depth, tasks
  by state, live workers, Redis ``INFO``). Every process that is scraped exports the same
  values, so aggregate them with ``max``, never ``sum`` (``docs/operations.md``).

Model labels are bounded: the inference service labels with the name of a model it bound (a
registry model or an upstream route); anything else is ``other``.

The response cache's counters are also kept as fleet-wide totals in Redis (``yichui cache
stats``): each count goes through :meth:`Metrics.cache_result` or :meth:`Metrics.cache_event`,
which adds it to :attr:`Metrics.fleet` too, and the cache flushes that to Redis every second.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import (
    Counter as PromCounter,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# no ``_created`` series beside every counter and histogram: one more series each, unused
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format's content type."""

OTHER = "other"
"""The label of every model name that is neither in the registry nor a route."""

CacheResult = Literal["hit", "miss", "coalesced", "bypass"]
RESULTS: frozenset[str] = frozenset({"hit", "miss", "coalesced", "bypass"})
CacheEvent = Literal[
    "stored",
    "faults",
    "near_hits",
    "fast_hits",
    "errors",
    "coalesced_errors",
    "coalesce_timeouts",
    "too_large",
    "live_resumed",
]

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_REQUESTS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
             30.0, 60.0, 120.0)  # fmt: skip
_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_LOADS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TASKS = (0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)

REDIS_INFO: Mapping[str, tuple[str, str]] = {
    # INFO field -> (metric suffix, help)
    "used_memory": ("used_memory_bytes", "Bytes Redis has allocated (INFO used_memory)."),
    "used_memory_peak": (
        "used_memory_peak_bytes",
        "The most bytes Redis has allocated since it started (INFO used_memory_peak).",
    ),
    "maxmemory": ("maxmemory_bytes", "Redis's memory limit; 0: none (INFO maxmemory)."),
    "mem_fragmentation_ratio": (
        "mem_fragmentation_ratio",
        "Resident memory over used memory (INFO mem_fragmentation_ratio).",
    ),
    "evicted_keys": ("evicted_keys", "Keys evicted for maxmemory since Redis started."),
    "errorstat_OOM": (
        "oom_errors",
        "Commands Redis refused since it started because maxmemory was reached (INFO "
        "errorstats: OOM command not allowed).",
    ),
    "expired_keys": ("expired_keys", "Keys expired since Redis started."),
    "connected_clients": ("connected_clients", "Client connections open now."),
    "instantaneous_ops_per_sec": ("ops_per_second", "Commands per second (Redis's estimate)."),
}
"""The Redis ``INFO`` figures exported, each as ``yichui_redis_<suffix>`` (``_total`` added to
the counters)."""
_COUNTERS = frozenset({"evicted_keys", "expired_keys", "errorstat_OOM"})


@dataclass
class ClusterSnapshot:
    """The deployment's figures read from Redis for one scrape (see ``runtime/probe.py``).

    ``redis``: instance name (``state``, ``cache``) -> its ``INFO`` fields, or None when it did
    not answer in time. The task figures are None when the state instance did not answer."""

    redis: dict[str, dict[str, float] | None] = field(default_factory=dict)
    tasks: dict[str, int] | None = None
    """State -> how many tasks are in it."""
    queues: dict[str, tuple[int, int]] | None = None
    """Queue -> (waiting for a worker, delivered and not yet acknowledged)."""
    workers: list[tuple[str, str, float]] | None = None
    """Live workers: (id, queue, seconds since the last heartbeat)."""


class Metrics:
    """The metrics of one process. ``role``: ``api``, ``worker`` or ``cli`` (a label of
    ``yichui_build_info``)."""

    def __init__(self, *, role: str = "cli", version: str = "") -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.fleet: Counter[str] = Counter()
        """Cache counts not yet added to the fleet totals in Redis (see :meth:`take_fleet`)."""
        self._cluster: ClusterSnapshot | None = None
        self._scrape_lock = threading.Lock()

        info = Gauge("yichui_build_info", "yichui's version and this process's role.",
                     ["version", "role"], registry=r)  # fmt: skip
        info.labels(version or "unknown", role).set(1)

        # -- response cache and requests (per process, counted on the event loop) --
        loop = _LoopCollector()
        r.register(loop)
        self.cache_requests = loop.counter(
            "yichui_cache_requests",
            "Chat and completion requests by what the cache did: hit (Redis or the near "
            "cache), miss (computed and stored), coalesced (joined an identical computation), "
            "bypass (not cacheable, Redis failing, or the breaker open).",
            ("endpoint", "model", "result"),
        )
        self.cache_stores = loop.counter(
            "yichui_cache_stores", "Answers stored in the response cache.", ("endpoint", "model")
        )
        self.cache_faults = loop.counter(
            "yichui_cache_faults",
            "Response-cache Redis calls that failed or timed out (the request went on uncached).",
            ("endpoint", "model"),
        )
        self.cache_near_hits = loop.counter(
            "yichui_cache_near_hits",
            "Hits answered from this process's memory (the near cache), fast path included.",
            ("endpoint", "model"),
        )
        self.cache_errors = loop.counter(
            "yichui_cache_errors",
            "Cacheable computations that failed (kind=compute), or whose failure reached "
            "requests that waited for them (kind=coalesced); none is stored.",
            ("endpoint", "model", "kind"),
        )
        self.cache_coalesce_timeouts = loop.counter(
            "yichui_cache_coalesce_timeouts",
            "Requests that waited cache_wait seconds for an identical computation and then "
            "computed their answer themselves.",
            ("endpoint", "model"),
        )
        self.cache_too_large = loop.counter(
            "yichui_cache_too_large",
            "Answers served but not stored because they exceed cache_max_entry_bytes.",
            ("endpoint", "model"),
        )
        self.cache_live_resumed = loop.counter(
            "yichui_cache_live_resumed",
            "Streamed requests whose live stream from another process broke off (evicted, or "
            "its computation gone) and that computed the rest of their answer themselves.",
            ("endpoint", "model"),
        )
        self.cache_lookup_seconds = loop.histogram(
            "yichui_cache_lookup_seconds",
            "Time to look a request up in the response cache (near cache, then Redis).",
            ("endpoint",),
            _FAST,
        )
        self.request_seconds = loop.histogram(
            "yichui_request_seconds",
            "Whole HTTP requests, until the last byte of the answer was sent.",
            ("endpoint", "cache", "code"),
            _REQUESTS,
        )
        self.image_decode_seconds = loop.histogram(
            "yichui_image_decode_seconds",
            "Time to read, check, decode and hash the images of one request (all of them, in "
            "a worker thread), before its cache lookup.",
            ("endpoint",),
            _FAST,
        )
        self._breaker_state: Any = None
        self._near: Any = None

        # -- engines (per process) --
        self.engine_first_token_seconds = Histogram(
            "yichui_engine_first_token_seconds",
            "Time from the start of a streamed computation to its first piece of text.",
            ["model"],
            buckets=_SLOW,
            registry=r,
        )
        self.engine_seconds = Histogram(
            "yichui_engine_seconds",
            "Time an engine took for a whole answer (cache misses and uncached requests).",
            ["model"],
            buckets=_SLOW,
            registry=r,
        )
        self.engine_tokens = PromCounter(
            "yichui_engine_tokens",
            "Tokens engines read (kind=prompt) and generated (kind=completion).",
            ["model", "kind"],
            registry=r,
        )
        self.engine_batch_size = Histogram(
            "yichui_engine_batch_size",
            "Requests a local model generated together in one batch.",
            ["model"],
            buckets=_BATCHES,
            registry=r,
        )
        self.engine_queue_depth = Gauge(
            "yichui_engine_queue_depth",
            "Requests waiting for a local model (not yet in a batch).",
            ["model"],
            registry=r,
        )
        self.engine_queue_wait_seconds = Histogram(
            "yichui_engine_queue_wait_seconds",
            "Time a request waited for a local model before its batch started.",
            ["model"],
            buckets=_REQUESTS,
            registry=r,
        )
        self.engine_queue_rejected = PromCounter(
            "yichui_engine_queue_rejected",
            "Requests a local model refused with 503: its queue was full (reason=full), or "
            "they waited longer than batch_queue_timeout (reason=timeout).",
            ["model", "reason"],
            registry=r,
        )

        # -- model pool (per process) --
        self.pool_loads = PromCounter(
            "yichui_pool_loads", "Models loaded into this process's pool.", ["model"], registry=r
        )
        self.pool_load_seconds = Histogram(
            "yichui_pool_load_seconds", "Time to load a model into the pool.", ["model"],
            buckets=_LOADS, registry=r,
        )  # fmt: skip
        self.pool_evictions = PromCounter(
            "yichui_pool_evictions",
            "Models evicted from the pool to make room for another.",
            ["model"],
            registry=r,
        )
        self._pool: Any = None

        # -- model status cache (per process) --
        self.model_status_lookups = PromCounter(
            "yichui_model_status_lookups",
            "Reads of model_status:<name> in Redis: hit (found, no disk scan) or miss.",
            ["result"],
            registry=r,
        )

        # -- tasks (per process) --
        self.tasks_submitted = PromCounter(
            "yichui_tasks_submitted", "Tasks this process submitted.", ["type"], registry=r
        )
        self.worker_tasks = PromCounter(
            "yichui_worker_tasks",
            "Task attempts this worker ended, by outcome: succeeded, failed, retry (failed, "
            "retried after a backoff), dead (retries exhausted), cancelled, handed_back (at "
            "shutdown), abandoned (its lease was lost).",
            ["type", "outcome"],
            registry=r,
        )
        self.worker_task_seconds = Histogram(
            "yichui_worker_task_seconds", "Time one attempt of a task ran on this worker.",
            ["type"], buckets=_TASKS, registry=r,
        )  # fmt: skip
        self.worker_running = Gauge(
            "yichui_worker_running", "Tasks this worker runs now.", registry=r
        )

        r.register(_Snapshot(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    # -- response cache (the event loop's thread only) ------------------------------------------
    def cache_result(self, endpoint: str, model: str, result: CacheResult) -> None:
        """One request's outcome in the cache (hit, miss, coalesced or bypass)."""
        self.cache_requests.inc((endpoint, model, result))
        self.fleet[result] += 1

    def near_hit(self, endpoint: str, model: str, *, fast: bool = False) -> None:
        """A hit answered from memory (``fast``: by the hit fast path, before any parsing)."""
        self.cache_requests.inc((endpoint, model, "hit"))
        self.cache_near_hits.inc((endpoint, model))
        fleet = self.fleet
        fleet["hit"] += 1
        fleet["near_hits"] += 1
        if fast:
            fleet["fast_hits"] += 1

    def cache_event(self, event: CacheEvent, endpoint: str, model: str) -> None:
        """Anything else the cache did for a request (stored it, a Redis fault, …)."""
        if event == "stored":
            self.cache_stores.inc((endpoint, model))
        elif event == "faults":
            self.cache_faults.inc((endpoint, model))
        elif event == "near_hits":
            self.cache_near_hits.inc((endpoint, model))
        elif event == "coalesce_timeouts":
            self.cache_coalesce_timeouts.inc((endpoint, model))
        elif event == "too_large":
            self.cache_too_large.inc((endpoint, model))
        elif event == "live_resumed":
            self.cache_live_resumed.inc((endpoint, model))
        elif event != "fast_hits":  # a fast hit is a near hit too: only the fleet tells apart
            kind = "compute" if event == "errors" else "coalesced"
            self.cache_errors.inc((endpoint, model, kind))
        self.fleet[event] += 1

    def take_fleet(self) -> Counter[str]:
        """The cache counts since the last call, to add to the fleet totals in Redis."""
        counts, self.fleet = self.fleet, Counter()
        return counts

    def lookup_took(self, endpoint: str, seconds: float) -> None:
        self.cache_lookup_seconds.observe((endpoint,), seconds)

    def watch_cache(self, breaker: Any, near: Any) -> None:
        """Export ``breaker``'s state and ``near``'s size at scrape time."""
        self._breaker_state, self._near = breaker, near

    # -- requests (the event loop's thread only) --------------------------------------------------
    def request_took(self, endpoint: str, cache: str, code: str, seconds: float) -> None:
        self.request_seconds.observe((endpoint, cache, code), seconds)

    def images_took(self, endpoint: str, seconds: float) -> None:
        self.image_decode_seconds.observe((endpoint,), seconds)

    # -- engines --------------------------------------------------------------------------------
    def first_token(self, model: str, seconds: float) -> None:
        self.engine_first_token_seconds.labels(model).observe(seconds)

    def engine_answered(self, model: str, seconds: float, usage: Any = None) -> None:
        """A whole answer of ``model``'s engine took ``seconds``; ``usage``: its token counts
        (``prompt_tokens``, ``completion_tokens``), when the engine gave them."""
        self.engine_seconds.labels(model).observe(seconds)
        if usage is not None:
            self.engine_tokens.labels(model, "prompt").inc(usage.prompt_tokens)
            self.engine_tokens.labels(model, "completion").inc(usage.completion_tokens)

    def batch_ran(self, model: str, size: int, waits: list[float]) -> None:
        """A batch of ``size`` requests of ``model`` started; ``waits``: their seconds queued."""
        self.engine_batch_size.labels(model).observe(size)
        for wait in waits:
            self.engine_queue_wait_seconds.labels(model).observe(wait)

    def queue_depth(self, model: str, depth: int) -> None:
        self.engine_queue_depth.labels(model).set(depth)

    def queue_rejected(self, model: str, reason: str) -> None:
        self.engine_queue_rejected.labels(model, reason).inc()

    # -- model pool -----------------------------------------------------------------------------
    def watch_pool(self, pool: Any) -> None:
        """Export ``pool``'s memory in use and budget at scrape time (``nbytes``, ``budget_bytes``,
        ``loaded()``)."""
        self._pool = pool

    # -- cluster figures ------------------------------------------------------------------------
    def exposition(self, cluster: ClusterSnapshot | None = None) -> bytes:
        """The text a scrape gets; ``cluster``: the deployment's figures read just now."""
        with self._scrape_lock:  # one scrape at a time sees its own snapshot
            self._cluster = cluster
            return generate_latest(self.registry)


class _LoopCounter:
    """A labelled counter for the hit path: a plain dict, bumped on the event loop's thread
    only and read there by the scrape. prometheus-client's children take a lock and validate
    labels on every ``inc``: several per hit, measurable (bench/compare.py) on a path of some
    100 µs."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], n: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + n

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        return family


class _LoopHistogram:
    """A labelled histogram on the same terms as :class:`_LoopCounter`."""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.bounds = list(buckets)
        self.series: dict[tuple[str, ...], list[float]] = {}
        """Labels -> a count per bucket (the last one +Inf), then the sum."""

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        series[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket with le >= value
        series[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, series in list(self.series.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip([*self.bounds, math.inf], series[:-1], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
            family.add_metric(labels, buckets, sum_value=series[-1])
        return family


class _LoopCollector(Collector):
    def __init__(self) -> None:
        self.metrics: list[_LoopCounter | _LoopHistogram] = []

    def counter(self, name: str, documentation: str, labels: tuple[str, ...]) -> _LoopCounter:
        counter = _LoopCounter(name, documentation, labels)
        self.metrics.append(counter)
        return counter

    def histogram(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> _LoopHistogram:
        histogram = _LoopHistogram(name, documentation, labels, buckets)
        self.metrics.append(histogram)
        return histogram

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()


class _Snapshot(Collector):
    """The figures read at scrape time: the cluster snapshot, the breaker, the pool."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        m = self.m
        if m._breaker_state is not None:
            breaker = GaugeMetricFamily(
                "yichui_cache_breaker_state",
                "The response cache's circuit breaker: 1 for its current state (closed: Redis "
                "answers; open: bypassed after repeated faults; half-open: probing).",
                labels=["state"],
            )
            now = m._breaker_state.state
            for state in ("closed", "open", "half-open"):
                breaker.add_metric([state], 1.0 if state == now else 0.0)
            yield breaker
        if m._near is not None:
            yield GaugeMetricFamily(
                "yichui_cache_near_entries",
                "Answers held in this process's near cache.",
                value=len(m._near),
            )
        if m._pool is not None:
            pool = m._pool
            yield GaugeMetricFamily(
                "yichui_pool_memory_bytes", "Bytes of model weights loaded now.", value=pool.nbytes
            )
            yield GaugeMetricFamily(
                "yichui_pool_budget_bytes",
                "The pool's memory budget (model_memory_budget).",
                value=pool.budget_bytes,
            )
            yield GaugeMetricFamily(
                "yichui_pool_models", "Models loaded now.", value=len(pool.loaded())
            )
        snap = m._cluster
        if snap is not None:
            yield from _cluster_families(snap)


def _cluster_families(snap: ClusterSnapshot) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "yichui_redis_up",
        "1 when this Redis instance answered the scrape's INFO in time, else 0 (its other "
        "figures are then absent).",
        labels=["scope", "redis"],
    )
    families = {
        field_: (CounterMetricFamily if field_ in _COUNTERS else GaugeMetricFamily)(
            f"yichui_redis_{suffix}", help_, labels=["scope", "redis"]
        )
        for field_, (suffix, help_) in REDIS_INFO.items()
    }
    for name, info in snap.redis.items():
        up.add_metric(["cluster", name], 0.0 if info is None else 1.0)
        for field_, family in families.items():
            if info is not None and field_ in info:
                family.add_metric(["cluster", name], info[field_])
    yield up
    yield from families.values()
    if snap.tasks is not None:
        tasks = GaugeMetricFamily(
            "yichui_tasks", "Tasks by state (kept 2 h after they end).", labels=["scope", "state"]
        )
        for state, n in snap.tasks.items():
            tasks.add_metric(["cluster", state], n)
        yield tasks
    if snap.queues is not None:
        depth = GaugeMetricFamily(
            "yichui_task_queue_depth",
            "Tasks waiting for a worker (undelivered, or retries in backoff).",
            labels=["scope", "queue"],
        )
        pending = GaugeMetricFamily(
            "yichui_task_pending",
            "Stream entries delivered to a worker and not acknowledged yet.",
            labels=["scope", "queue"],
        )
        for queue, (waiting, unacked) in snap.queues.items():
            depth.add_metric(["cluster", queue], waiting)
            pending.add_metric(["cluster", queue], unacked)
        yield depth
        yield pending
    if snap.workers is not None:
        live = GaugeMetricFamily(
            "yichui_workers_live",
            "Task workers with a heartbeat within three intervals.",
            labels=["scope"],
        )
        live.add_metric(["cluster"], len(snap.workers))
        yield live
        age = GaugeMetricFamily(
            "yichui_worker_heartbeat_age_seconds",
            "Seconds since each live worker's last heartbeat.",
            labels=["scope", "worker", "queue"],
        )
        for worker, queue, seconds in snap.workers:
            age.add_metric(["cluster", worker, queue], seconds)
        yield age
