"""A rolling upgrade: an older commit of yichui and today's, side by side on one Redis (issue 16,
item 3). The old code runs from a git worktree (tests/multihost.py ``old_checkout``) with this
interpreter and venv.

The old commit, 32f239f (2026-12-02), differs from today's in every versioned thing the two
share: its response-cache keys are ``rc2-`` (KEY_VERSION 2, today 3), its model status entries
``"v": 1`` (STATUS_VERSION, today 2), and its task scripts have other SHAs (ENQUEUE writes no
``tenant``, no script publishes ``event``/``tenant`` or progress on ``task_events``).

What must hold: each side's tasks run on the other side's workers and a task the old worker
claimed and lost is taken over by a new worker, each ending once; each side's cached answers are
a miss for the other (computed once per version, then hits), never an error; model status
entries of the other version are read without a crash (today's code reads an old one again from
the disk)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.fake_upstream import FakeUpstream, fake_upstream
from tests.helpers import make_model
from tests.multihost import Host, client_runtime, old_checkout
from tests.redis_proc import RedisProcess, wait_until
from yichui.models.status import STATUS_VERSION
from yichui.runtime import Runtime
from yichui.state.keys import Keys
from yichui.state.task_store import TERMINAL

pytestmark = pytest.mark.slow

OLD_COMMIT = "32f239f7e7a77fd69547839d1fcac6abbc41a53f"

_SUBMIT = """
import json, sys
from yichui.config import load_settings
from yichui.runtime import Runtime
rt = Runtime(load_settings())
steps, seconds, n = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
ids = [rt.tasks.submit("selftest", {"steps": steps, "step_seconds": seconds})["id"]
       for _ in range(n)]
rt.close()
print(json.dumps(ids))
"""


@dataclass
class Side:
    host: Host

    def submit(self, n: int, steps: int = 2, seconds: float = 0.05) -> list[str]:
        """``n`` selftests queued by this side's code (the old one's own TaskService)."""
        out = subprocess.run(
            [sys.executable, "-c", _SUBMIT, str(steps), str(seconds), str(n)],
            env=self.host.worker_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        ids: list[str] = json.loads(out.stdout.splitlines()[-1])
        return ids


@dataclass
class Mixed:
    redis: RedisProcess
    upstream: FakeUpstream
    old: Host
    new: Host
    rt: Runtime
    nas: Path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    tmp = tmp_path_factory.mktemp("upgrade")
    with old_checkout(OLD_COMMIT, tmp / "old-yichui") as checkout:
        old_src = checkout / "src"
        assert "KEY_VERSION = 2" in (old_src / "yichui/inference/cache_key.py").read_text()
        redis_proc = RedisProcess(tmp / "redis").start()
        nas = tmp / "nas"
        (nas / "models").mkdir(parents=True)
        (nas / "mirror").mkdir()
        old = Host(tmp / "host-old", "old", redis_proc.url, nas, pythonpath=old_src)
        new = Host(tmp / "host-new", "new", redis_proc.url, nas)
        rt = client_runtime(redis_proc.url, tmp / "client", nas)
        with fake_upstream() as upstream:
            try:
                route = {"echo": {"url": upstream.url, "model": "echo-up"}}
                old.server(upstreams=route).start()
                new.server(upstreams=route).start()
                yield Mixed(redis_proc, upstream, old, new, rt, nas)
            finally:
                old.stop()
                new.stop()
                rt.close()
                redis_proc.stop()


def _wait_done(rt: Runtime, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    wait_until(lambda: all(rt.tasks.get(t)["state"] in TERMINAL for t in ids), timeout, "the tasks")
    return [rt.tasks.get(t) for t in ids]


def _terminal_states(rt: Runtime, task_id: str) -> list[str]:
    return [
        e.data["state"]
        for e in rt.tasks.tail(task_id, 10_000)
        if e.kind == "state" and e.data["state"] in TERMINAL
    ]


def test_old_and_new_tasks_run_on_each_others_workers(mixed: Mixed) -> None:
    rt, old_side = mixed.rt, Side(mixed.old)
    # 1. only the old worker: it runs tasks queued by old and new code alike
    old_worker = mixed.old.worker("old1")
    wait_until(lambda: any(w["id"] == "old1" for w in rt.tasks.alive_workers()), 30, "old1")
    from_old = old_side.submit(3)
    from_new = [
        rt.tasks.submit("selftest", {"steps": 2, "step_seconds": 0.05})["id"] for _ in range(3)
    ]
    long_task = rt.tasks.submit("selftest", {"steps": 40, "step_seconds": 0.05})["id"]
    for t in _wait_done(rt, from_old + from_new, 30):
        assert (t["state"], t["worker"], t["attempt"]) == ("succeeded", "old1", 1), t
    assert rt.tasks.get(from_old[0]).get("tenant", "local") == "local"  # old: no tenant field
    wait_until(
        lambda: rt.tasks.get(long_task)["progress"]["step"] >= 3, 15, "the long task at step 3"
    )
    # 2. the old worker dies mid-task; a new worker takes over what the old scripts claimed
    old_worker.signal(signal.SIGKILL)
    old_worker.wait(10)
    mixed.new.worker("new1")
    later_old = old_side.submit(3)
    later_new = [
        rt.tasks.submit("selftest", {"steps": 2, "step_seconds": 0.05})["id"] for _ in range(3)
    ]
    for t in _wait_done(rt, later_old + later_new, 30):
        assert (t["state"], t["worker"], t["attempt"]) == ("succeeded", "new1", 1), t
    (final,) = _wait_done(rt, [long_task], 30)
    assert (final["state"], final["worker"], final["attempt"]) == ("succeeded", "new1", 2)
    assert final["last_error"]["type"] == "WorkerLost"
    assert final["result"]["resumed_from"] >= 3  # the old run's checkpoint, read by new code
    for task_id in from_old + from_new + later_old + later_new + [long_task]:
        assert _terminal_states(rt, task_id) == ["succeeded"]
    # both CLIs list and show the other's tasks
    for host in (mixed.old, mixed.new):
        listed = host.cli("tasks", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {t["id"] for t in json.loads(listed.stdout)["tasks"]} >= set(from_old + from_new)
        for task_id in (from_old[0], from_new[0], long_task):
            shown = host.cli("tasks", "show", task_id)
            assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr


def _ask(url: str, text: str) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}], "temperature": 0}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_cache_entries_of_the_other_version_are_misses(mixed: Mixed) -> None:
    mixed.upstream.reset()
    old_url, new_url = mixed.old.servers[0].url, mixed.new.servers[0].url
    seen = []
    for url in (old_url, new_url, old_url, new_url):
        r = _ask(url, "one answer per version")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "version per answer one"
        seen.append(r.headers["x-yichui-cache"])
    assert seen == ["miss", "miss", "hit", "hit"]  # the other version's entry is no hit
    assert len(mixed.upstream.requests) == 2
    with redis.Redis.from_url(mixed.redis.url) as client:
        keys = sorted(k.decode() for k in client.scan_iter("response:*"))
    assert [k.split("{")[1][:4] for k in keys] == ["rc2-", "rc3-"]
    for host in (mixed.old, mixed.new):  # each side's stats read the other's entries
        stats = host.cli("cache", "stats", "--json")
        assert stats.returncode == 0 and "Traceback" not in stats.stderr, stats.stderr


def test_model_status_of_the_other_version_is_read_again(mixed: Mixed) -> None:
    make_model(mixed.nas / "models", "org/both", weight_bytes=2048)
    key = Keys().model_status("org/both")
    with redis.Redis.from_url(mixed.redis.url) as client:
        old_status = mixed.old.cli("models", "status", "org/both", "--json")
        assert old_status.returncode == 0, old_status.stderr
        assert json.loads(client.get(key) or b"{}")["v"] == 1  # written by the old code
        found = mixed.rt.registry.status("org/both")
        assert not found.cached and found.status.exists  # an old entry: read from the disk
        assert json.loads(client.get(key) or b"{}")["v"] == STATUS_VERSION
        again = mixed.old.cli("models", "status", "org/both", "--json")  # a v2 entry for it
        assert again.returncode == 0, again.stderr
        seen = json.loads(again.stdout)
        assert seen["exists"] and seen["size"] == found.status.size
        for host in (mixed.old, mixed.new):
            listed = host.cli("models", "list", "--json")
            assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
            assert "org/both" in [m["name"] for m in json.loads(listed.stdout)]
