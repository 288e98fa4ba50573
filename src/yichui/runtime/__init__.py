"""Wiring: settings -> Redis connection -> services. Built once per process, passed in."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from yichui.config import Settings
from yichui.errors import RedisUnavailableError, StateError
from yichui.models.registry import ModelRegistry
from yichui.models.status import LISTING_FIELDS
from yichui.state.connection import RedisTarget, SyncRedis, connect
from yichui.state.keys import Keys
from yichui.state.model_status import ModelStatusStore
from yichui.state.task_store import TaskStore
from yichui.tasks.service import TaskService

if TYPE_CHECKING:
    from yichui.tasks.worker import Worker


class Runtime:
    """The services of one process::

    rt = Runtime(load_settings())
    rt.registry.status("smollm2-135m-instruct")
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self._redis: tuple[SyncRedis, RedisTarget] | None = None
        self.redis_error: StateError | None = None

    def redis(self) -> tuple[SyncRedis, RedisTarget]:
        """The connected client (the embedded server is started when no URL is set)."""
        if self._redis is None:
            self._redis = connect(self.settings)
        return self._redis

    def try_redis(self) -> SyncRedis | None:
        """The client, or None (error kept in ``redis_error``) when Redis is unreachable."""
        try:
            return self.redis()[0]
        except (RedisUnavailableError, StateError) as exc:
            self.redis_error = exc
            return None

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
        )

    @cached_property
    def registry(self) -> ModelRegistry:
        store = self.model_store
        reason = str(self.redis_error) if self.redis_error else None
        return ModelRegistry(self.settings, store, degraded=reason)

    @cached_property
    def task_store(self) -> TaskStore:
        """Tasks need Redis: raises RedisUnavailableError (one line in the CLI) without it."""
        client, _ = self.redis()
        s = self.settings
        return TaskStore(
            client, self.keys, ttl=s.task_ttl, jitter=s.ttl_jitter, log_max=s.task_log_max
        )

    @cached_property
    def tasks(self) -> TaskService:
        return TaskService(self.task_store, self.settings)

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
        return Worker(
            self.task_store,
            self.tasks.types,
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
        )

    def close(self) -> None:
        if self._redis is not None:
            self._redis[0].close()
            self._redis = None
