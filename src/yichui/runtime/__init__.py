"""The composition root: every service of a process is built here, once, and handed out.

::

    rt = Runtime(load_settings())
    rt.registry.status("smollm2-135m-instruct")      # sync services, built when first used
    rt.tasks.submit("selftest", {"steps": 3})
    rt.worker(burst=True).run()                      # handlers get ``rt`` as ctx.services
    async with rt.serving() as services:             # the async side of an API process
        await services.inference.answer(...)

The CLI builds one :class:`Runtime` per command, a worker one per process, the API one per
server (:func:`yichui.api.app.create_app`); tests build their own. Nothing else constructs a
store, a client or an engine. Two Redis clients: the **state** instance (``redis_url``: model
status, tasks, locks, events) and the **cache** instance (``cache_redis_url``, by default the
same URL: response-cache entries, coalescing locks and counters).
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from yichui import __version__
from yichui.access import AuditLog, Authenticator, KeyStore
from yichui.config import Settings
from yichui.errors import RedisSetupError, RedisUnavailableError, StateError
from yichui.metrics import Metrics
from yichui.models.registry import ModelRegistry
from yichui.models.sources import Sources
from yichui.models.status import LISTING_FIELDS
from yichui.runtime import capabilities
from yichui.state.cluster import ClusterWatch
from yichui.state.connection import RedisTarget, SyncRedis, connect, parse_redis_url, resolve_url
from yichui.state.eval_store import EvalResultStore
from yichui.state.fleet import ServerStore
from yichui.state.keys import Keys
from yichui.state.memory import check_no_eviction
from yichui.state.model_status import ModelStatusStore
from yichui.state.sentinel import SentinelWatch, check_master
from yichui.state.task_store import TaskStore
from yichui.tasks.service import TaskService
from yichui.tasks.types import TaskTypes

if TYPE_CHECKING:
    from yichui.inference.engine import Engine
    from yichui.runtime.probe import ClusterProbe
    from yichui.runtime.serving import ServingServices
    from yichui.runtime.supervisor import EngineSupervisor
    from yichui.tasks.worker import Worker
    from yichui.training.service import TrainingService


class Runtime:
    """The services of one process (see the module docstring)."""

    def __init__(self, settings: Settings, *, role: str = "cli") -> None:
        self.settings = settings
        self.role = role
        """``api``, ``worker`` or ``cli``: what this process is (a label of its metrics); set
        it before :attr:`metrics` is first used."""
        self.keys = Keys(settings.namespace)
        self._redis: tuple[SyncRedis, RedisTarget] | None = None
        self.redis_error: StateError | None = None

    # -- Redis ----------------------------------------------------------------------------------
    def redis(self) -> tuple[SyncRedis, RedisTarget]:
        """The state instance's client (the embedded server is started when no URL is set);
        :class:`RedisSetupError` when it refuses us or may evict keys (``state/memory.py``)."""
        if self._redis is None:
            client, target = connect(self.settings)
            try:
                check_no_eviction(client, target)
            except BaseException:
                client.close()
                raise
            self._redis = client, target
        return self._redis

    def try_redis(self) -> SyncRedis | None:
        """The client, or None (error kept in ``redis_error``) when Redis is unreachable; a
        Redis that refuses us or evicts is no degraded mode: it fails closed."""
        try:
            return self.redis()[0]
        except RedisSetupError:
            raise
        except (RedisUnavailableError, StateError) as exc:
            self.redis_error = exc
            return None

    def cache_target(self) -> RedisTarget:
        """Where the response cache lives: ``cache_redis_url``, else the state instance."""
        url = self.settings.cache_redis_url
        return parse_redis_url(url) if url else self.redis()[1]

    # -- metrics --------------------------------------------------------------------------------
    @cached_property
    def metrics(self) -> Metrics:
        """Every metric of this process (``docs/operations.md``), handed to each service."""
        return Metrics(role=self.role, version=__version__)

    def probe(self) -> ClusterProbe:
        """Reads the deployment's figures (Redis ``INFO``, tasks) for a scrape."""
        from yichui.runtime.probe import ClusterProbe

        return ClusterProbe(self)

    # -- access ---------------------------------------------------------------------------------
    @cached_property
    def key_store(self) -> KeyStore:
        """The API keys in Redis (``yichui keys``); RedisUnavailableError without Redis."""
        return KeyStore(self.redis()[0], self.keys)

    @cached_property
    def audit(self) -> AuditLog:
        """The audit log of admin actions (in the state instance)."""
        return AuditLog(self.redis()[0], self.keys, self.settings.audit_max)

    def authenticator(self) -> Authenticator:
        """The authentication service of an API process (its key table not loaded yet)."""
        return Authenticator(self.settings)

    # -- models ---------------------------------------------------------------------------------
    @cached_property
    def model_store(self) -> ModelStatusStore | None:
        client = self.try_redis()
        if client is None:
            return None
        s = self.settings
        return ModelStatusStore(
            client,
            self.keys,
            ttl=s.model_status_ttl,
            missing_ttl=s.model_missing_ttl,
            jitter=s.ttl_jitter,
            listing_fields=LISTING_FIELDS,
            metrics=self.metrics,
        )

    @cached_property
    def registry(self) -> ModelRegistry:
        store = self.model_store
        reason = str(self.redis_error) if self.redis_error else None
        return ModelRegistry(self.settings, store, degraded=reason)

    @cached_property
    def sources(self) -> Sources:
        """Every model source by name (yichui's own and the extensions')."""
        return capabilities.sources(self.settings.extensions, self.settings)

    # -- tasks ----------------------------------------------------------------------------------
    @cached_property
    def task_types(self) -> TaskTypes:
        """Every capability's task types, and the extensions' (see :mod:`.capabilities`)."""
        return capabilities.task_types(self.settings.extensions)

    @cached_property
    def task_store(self) -> TaskStore:
        """Tasks need Redis: raises RedisUnavailableError (one line in the CLI) without it."""
        client, _ = self.redis()
        s = self.settings
        return TaskStore(
            client,
            self.keys,
            ttl=s.task_ttl,
            jitter=s.ttl_jitter,
            log_max=s.task_log_max,
            durability=s.task_durability,
            replicas=s.task_durability_replicas,
            durability_timeout=s.task_durability_timeout,
        )

    @cached_property
    def tasks(self) -> TaskService:
        return TaskService(self.task_store, self.settings, self.task_types, metrics=self.metrics)

    def worker(
        self,
        *,
        concurrency: int | None = None,
        queue: str | None = None,
        burst: bool = False,
        name: str | None = None,
    ) -> Worker:
        """A worker wired to these settings, running handlers with this runtime."""
        from yichui.tasks.worker import Worker

        s = self.settings
        worker = Worker(
            self.task_store,
            self.task_types,
            queue=queue or s.task_queue,
            concurrency=concurrency or s.worker_concurrency,
            lease=s.task_lease,
            heartbeat=s.task_heartbeat,
            backoff=s.task_backoff,
            backoff_max=s.task_backoff_max,
            progress_interval=s.task_progress_interval,
            burst=burst,
            name=name,
            services=self,
            metrics=self.metrics,
        )
        client, target = self.redis()
        if target.kind == "sentinel":

            def switched(host: str, port: int) -> None:
                # idle connections to the old master go; every retry wait ends at once
                client.connection_pool.disconnect(inuse_connections=False)  # type: ignore[union-attr]
                worker.redis_changed()

            worker.failovers = SentinelWatch(target, s, on_switch=switched)
        elif target.kind == "cluster":  # no announcement: asked while Redis seems down
            worker.failovers = ClusterWatch(
                client,  # type: ignore[arg-type]
                wanted=lambda: worker.redis_down,
                on_back=worker.redis_changed,
            )
        return worker

    def check_redis_names(self) -> None:
        """RedisSetupError (exit 2) when a Sentinel URL names a master no Sentinel monitors."""
        for url in (self.settings.redis_url, self.settings.cache_redis_url):
            target = parse_redis_url(url) if url else None
            if target is not None and target.kind == "sentinel":
                check_master(target, self.settings)

    # -- training -------------------------------------------------------------------------------
    @cached_property
    def training(self) -> TrainingService:
        from yichui.training.service import TrainingService  # not needed to serve requests

        return TrainingService(self.settings, self.registry, self.tasks, self.eval_store)

    def eval_store(self) -> EvalResultStore | None:
        """The Redis side of the evaluation cache; None while Redis is unreachable."""
        client = self.try_redis()
        if client is None:
            return None
        s = self.settings
        return EvalResultStore(client, self.keys, ttl=s.eval_result_ttl, jitter=s.ttl_jitter)

    # -- inference ------------------------------------------------------------------------------
    @cached_property
    def fleet(self) -> ServerStore:
        """The API servers' heartbeats (``yichui ps``, ``/api/servers``):
        ``rt.fleet.listing(stale_after=3 * settings.server_heartbeat)``;
        RedisUnavailableError without Redis."""
        return ServerStore(self.redis()[0], self.keys)

    def engines(self) -> list[Engine]:
        """Every engine of this process, in the order the router asks them."""
        return capabilities.engines(self.settings.extensions, self)

    def serving(self) -> ServingServices:
        """The async services of an API process, not started yet: ``async with`` them (or
        ``start()`` and ``close()``, as the API's lifespan does)."""
        from yichui.runtime.serving import ServingServices

        return ServingServices(self)

    @cached_property
    def supervisor(self) -> EngineSupervisor:
        """The engine processes of the routes' ``launch`` tables, which ``yichui serve``
        starts and keeps up (``runtime/supervisor.py``); nothing runs before ``start()``."""
        from yichui.runtime.launch import model_path
        from yichui.runtime.supervisor import EngineSupervisor

        return EngineSupervisor(self.settings, model_path=lambda v: model_path(self.registry, v))

    def state_url(self) -> str:
        """The state instance's URL (the embedded server started when no URL is set)."""
        return resolve_url(self.settings)

    def close(self) -> None:
        if self._redis is not None:
            self._redis[0].close()
            self._redis = None
