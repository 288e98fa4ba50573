"""The systems bench/tasks.py compares (yichui, arq, RQ), behind one client interface:
submit a no-op task, tell when it is done, its start/finish times, and the worker child's
configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import redis

from yichui.config import load_settings
from yichui.runtime import Runtime
from yichui.state.task_store import TERMINAL

ARQ_DEFAULT_POLL_DELAY = 0.5
RQ_QUEUE = "bench"
RQ_FUNC = "__main__.rq_noop"
"""RQ imports jobs by dotted name; the worker runs this script as ``__main__`` (``--child``)."""
ARQ_FUNC = "arq_noop"

T = TypeVar("T")


# -- the systems, behind one interface --------------------------------------------------------
class Side:
    """One system: what the bench does as its client."""

    label: str
    key: str

    def child_spec(self, concurrency: int, burst: bool) -> dict[str, Any]:
        raise NotImplementedError

    def submit(self) -> Any:
        raise NotImplementedError

    def done(self, handle: Any) -> bool:
        raise NotImplementedError

    def latency_ms(self, handle: Any) -> float:
        raise NotImplementedError

    def enqueue(self, n: int) -> list[Any]:
        return [self.submit() for _ in range(n)]

    def spans(self, handles: list[Any]) -> list[tuple[float, float]]:
        """(start, finish) in seconds of every task; raises unless all succeeded."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class YichuiSide(Side):
    def __init__(self, url: str, data_dir: Path) -> None:
        self.label, self.key = "yichui", "yichui"
        self.url, self.data_dir = url, data_dir
        self.rt = Runtime(load_settings(redis_url=url, data_dir=data_dir))
        self.svc = self.rt.tasks
        self.store = self.rt.task_store

    def child_spec(self, concurrency: int, burst: bool) -> dict[str, Any]:
        return {
            "system": "yichui",
            "url": self.url,
            "data_dir": str(self.data_dir),
            "concurrency": concurrency,
            "burst": burst,
        }

    def submit(self) -> str:
        task_id: str = self.svc.submit("noop")["id"]
        return task_id

    def _status(self, task_id: str) -> dict[str, Any]:
        status = self.store.get(task_id)
        if status is None:
            raise RuntimeError(f"task {task_id} vanished")
        return status

    def done(self, handle: str) -> bool:
        return self._status(handle)["state"] in TERMINAL

    def _succeeded(self, task_id: str) -> dict[str, Any]:
        status = self._status(task_id)
        if status["state"] != "succeeded":
            raise RuntimeError(f"yichui task {task_id} ended {status['state']}")
        return status

    def latency_ms(self, handle: str) -> float:
        status = self._succeeded(handle)
        return (status["started"] - status["created"]) * 1000

    def spans(self, handles: list[str]) -> list[tuple[float, float]]:
        out = []
        for task_id in handles:
            status = self._succeeded(task_id)
            out.append((status["started"], status["finished"]))
        return out

    def close(self) -> None:
        self.rt.close()


class ArqSide(Side):
    def __init__(self, url: str, poll_delay: float, key: str) -> None:
        from arq.connections import RedisSettings, create_pool

        self.url, self.poll_delay, self.key = url, poll_delay, key
        default = " (default)" if poll_delay == ARQ_DEFAULT_POLL_DELAY else ""
        self.label = f"arq, poll {poll_delay:g} s{default}"
        self.loop = asyncio.new_event_loop()
        self.pool = self._run(create_pool(RedisSettings.from_dsn(url)))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def child_spec(self, concurrency: int, burst: bool) -> dict[str, Any]:
        return {
            "system": "arq",
            "url": self.url,
            "concurrency": concurrency,
            "burst": burst,
            "poll_delay": self.poll_delay,
        }

    def submit(self) -> Any:
        job = self._run(self.pool.enqueue_job(ARQ_FUNC))
        if job is None:
            raise RuntimeError("arq refused a job")
        return job

    def done(self, handle: Any) -> bool:
        from arq.constants import result_key_prefix

        return bool(self._run(self.pool.exists(result_key_prefix + handle.job_id)))

    def latency_ms(self, handle: Any) -> float:
        info = self._run(handle.result_info())
        if info is None or not info.success:
            raise RuntimeError(f"arq job {handle.job_id} failed: {info}")
        return float((info.start_time - info.enqueue_time).total_seconds() * 1000)

    def enqueue(self, n: int) -> list[Any]:
        async def many() -> list[Any]:
            return [await self.pool.enqueue_job(ARQ_FUNC) for _ in range(n)]

        return self._run(many())

    def spans(self, handles: list[Any]) -> list[tuple[float, float]]:
        # not ArqRedis.all_job_results(): it GETs every result at once (asyncio.gather), and
        # redis-py 8 caps an asyncio pool at 100 connections (MaxConnectionsError)
        from arq.constants import result_key_prefix
        from arq.jobs import deserialize_result

        keys = [result_key_prefix + h.job_id for h in handles]
        raw: list[bytes | None] = []
        for i in range(0, len(keys), 500):
            raw += self._run(self.pool.mget(keys[i : i + 500]))
        results = [deserialize_result(r) for r in raw if r is not None]
        ok = [r for r in results if r.success]
        if len(ok) != len(handles):
            raise RuntimeError(f"arq: {len(ok)} of {len(handles)} jobs succeeded")
        return [(r.start_time.timestamp(), r.finish_time.timestamp()) for r in ok]

    def close(self) -> None:
        self._run(self.pool.aclose())
        self.loop.close()


class RqSide(Side):
    def __init__(self, url: str) -> None:
        from rq import Queue

        self.label, self.key, self.url = "RQ, SimpleWorker", "rq", url
        self.conn = redis.Redis.from_url(url)
        self.queue = Queue(RQ_QUEUE, connection=self.conn)

    def child_spec(self, concurrency: int, burst: bool) -> dict[str, Any]:
        return {"system": "rq", "url": self.url, "concurrency": 1, "burst": burst}

    def submit(self) -> Any:
        return self.queue.enqueue(RQ_FUNC)

    def done(self, handle: Any) -> bool:
        from rq.job import JobStatus

        return handle.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED)

    def _finished(self, job: Any) -> Any:
        from rq.job import JobStatus

        job.refresh()
        if job.get_status(refresh=False) != JobStatus.FINISHED:
            raise RuntimeError(f"RQ job {job.id} ended {job.get_status(refresh=False)}")
        return job

    def latency_ms(self, handle: Any) -> float:
        job = self._finished(handle)
        return float((job.started_at - job.enqueued_at).total_seconds() * 1000)

    def spans(self, handles: list[Any]) -> list[tuple[float, float]]:
        from rq.job import Job, JobStatus

        jobs = Job.fetch_many([h.id for h in handles], connection=self.conn)
        out = []
        for job in jobs:
            if job is None or job.get_status(refresh=False) != JobStatus.FINISHED:
                raise RuntimeError(f"RQ job not finished: {job}")
            out.append((job.started_at.timestamp(), job.ended_at.timestamp()))
        return out

    def close(self) -> None:
        self.conn.close()
