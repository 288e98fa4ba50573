"""The management API under /api, against a real `yichui serve --workers 1` on a throwaway
Redis: tasks and their log streams, models, datasets, the cache, sessions and CSRF."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_server import ServerProcess
from tests.redis_proc import RedisProcess, wait_until


@pytest.fixture(scope="module")
def server(
    redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with redis_server.client() as c:
        c.flushall()  # our own throwaway server: no model index another module left there
    work = tmp_path_factory.mktemp("manage")
    datasets = work / "datasets"
    datasets.mkdir()
    (datasets / "tiny.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    proc = ServerProcess(
        work,
        redis_url=redis_server.url,
        args=("--workers", "1"),
        datasets_dir=str(datasets),
        upload_max_bytes=4096,
        task_heartbeat=0.5,
        task_lease=5.0,
        task_progress_interval=0.05,
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def finished(api: httpx.Client, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = api.get(f"/api/tasks/{task_id}").json()
        if task["state"] in ("succeeded", "failed", "dead", "cancelled"):
            return dict(task)
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not end")


def sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Events of a Server-Sent Events stream (``id``, ``event``, ``data``)."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


def test_task_lifecycle_and_errors(api: httpx.Client) -> None:
    types = {t["name"]: t for t in api.get("/api/tasks/types").json()["data"]}
    assert {"selftest", "download", "train"} <= set(types)
    assert "steps" in types["selftest"]["schema"]["properties"]

    r = api.post("/api/tasks", json={"type": "selftest", "args": {"steps": 3, "step_seconds": 0}})
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["tenant"] == "local" and task["state"] in ("queued", "running")
    done = finished(api, task["id"])
    assert done["state"] == "succeeded" and done["progress"]["step"] == 3
    listed = api.get("/api/tasks", params={"state": "succeeded"}).json()
    assert task["id"] in [t["id"] for t in listed["data"]]
    assert listed["counts"]["succeeded"] >= 1

    logs = api.get(f"/api/tasks/{task['id']}/logs").json()
    kinds = [e["kind"] for e in logs["data"]]
    assert "progress" in kinds and kinds[-1] == "state"
    later = api.get(f"/api/tasks/{task['id']}/logs", params={"after": logs["next"]}).json()
    assert later["data"] == []

    # bad input: 4xx with an OpenAI-style body, naming what is wrong
    bad = error_of(api.post("/api/tasks", json={"type": "selftest", "args": {"steps": 0}}), 400)
    assert "steps" in bad["message"]
    assert "nope" in error_of(api.post("/api/tasks", json={"type": "nope"}), 400)["message"]
    error_of(api.get("/api/tasks/t-never"), 404)
    error_of(api.post("/api/tasks/t-never/cancel"), 404)
    error_of(api.post(f"/api/tasks/{task['id']}/retry"), 409)
    error_of(api.get(f"/api/tasks/{task['id']}/logs", params={"after": "x"}), 400)


def test_log_stream_resumes_after_a_dropped_connection(api: httpx.Client) -> None:
    r = api.post(
        "/api/tasks", json={"type": "selftest", "args": {"steps": 12, "step_seconds": 0.15}}
    )
    task_id = r.json()["id"]
    seen: list[str] = []
    url = f"/api/tasks/{task_id}/logs/stream"
    with api.stream("GET", url) as first:  # read a few entries, then drop the connection
        assert first.headers["content-type"].startswith("text/event-stream")
        for event in sse(first.iter_lines()):
            if "id" in event:
                seen.append(event["id"])
            if len(seen) >= 4:
                break
    ended = None
    with api.stream("GET", url, headers={"Last-Event-ID": seen[-1]}) as second:
        for event in sse(second.iter_lines()):
            if event.get("event") == "end":
                ended = json.loads(event["data"])["state"]
                break
            if "id" in event:
                seen.append(event["id"])
    assert ended == "succeeded"
    everything = [e["id"] for e in api.get(f"/api/tasks/{task_id}/logs").json()["data"]]
    assert seen == everything  # every entry once, in order: no gap, no repeat


def test_events_feed_carries_task_progress_and_states(api: httpx.Client) -> None:
    got: list[dict[str, Any]] = []
    with api.stream("GET", "/api/events") as feed:
        task_id = api.post(
            "/api/tasks", json={"type": "selftest", "args": {"steps": 3, "step_seconds": 0.1}}
        ).json()["id"]
        for event in sse(feed.iter_lines()):
            if event.get("event") != "task":
                continue
            data = json.loads(event["data"])
            if data["id"] == task_id:
                got.append(data)
                if data.get("state") == "succeeded":
                    break
    assert any(e["event"] == "progress" for e in got)
    assert [e["state"] for e in got if e["event"] == "state"][-1] == "succeeded"


def test_models_datasets_and_training_validation(api: httpx.Client, server: ServerProcess) -> None:
    listing = api.get("/api/models").json()
    assert listing["data"] == [] and listing["total"] == 0
    err = error_of(api.get("/api/models/org/absent"), 404)
    assert err["code"] == "model_not_found"
    error_of(api.post("/api/models/pull", json={"name": "a/b", "source": "nowhere"}), 400)
    error_of(api.post("/api/models/pull", json={"name": "../evil"}), 400)
    error_of(api.delete("/api/models/org/absent"), 404)

    offered = api.get("/api/datasets").json()["data"]
    assert [d["name"] for d in offered] == ["tiny.jsonl"]
    uploads = Path(server.env["YICHUI_DATA_DIR"]) / "uploads"
    bad = b'{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n'
    r = api.post("/api/datasets", params={"filename": "bad.jsonl"}, content=bad)
    assert "line 2" in error_of(r, 400)["message"]
    big = b'{"prompt": "a", "completion": "b"}\n' * 200
    r = api.post("/api/datasets", params={"filename": "big.jsonl"}, content=big)
    assert "limit" in error_of(r, 400)["message"]
    error_of(api.post("/api/datasets", params={"filename": "x.txt"}, content=b"{}"), 400)
    assert not uploads.exists() or not list(uploads.iterdir())  # nothing stored
    good = b'{"prompt": "<script>x</script>", "completion": "b"}\n'
    stored = api.post("/api/datasets", params={"filename": "good.jsonl"}, content=good)
    assert stored.status_code == 201 and stored.json()["rows"] == 1

    # training: the dataset must be one offered, the model must exist; nothing is queued
    before = api.get("/api/tasks").json()["data"]
    r = api.post("/api/train", json={"model": "org/absent", "dataset": "/etc/passwd"})
    assert "not one of the datasets" in error_of(r, 400)["message"]
    r = api.post("/api/train", json={"model": "org/absent", "dataset": stored.json()["path"]})
    assert error_of(r, 404)["code"] == "model_not_found"
    r = api.post("/api/train", json={"model": "org/absent", "dataset": "tiny.jsonl", "rank": 0})
    assert r.status_code in (400, 404)
    assert api.get("/api/tasks").json()["data"] == before
    assert api.get("/api/runs").json()["data"] == []
    error_of(api.get("/api/runs/nope/v0-x/loss"), 404)
    error_of(api.get("/api/evals/" + "0" * 64), 404)


def test_system_views(api: httpx.Client) -> None:
    redis = api.get("/api/redis").json()
    assert redis["reachable"] is True
    assert redis["info"]["used_memory"] > 0 and redis["info"]["maxmemory_policy"]
    overview = api.get("/api/overview").json()
    assert overview["redis"]["reachable"] and overview["principal"]["role"] == "admin"
    wait_until(lambda: any(w["alive"] for w in api.get("/api/workers").json()["data"]))
    stats = api.get("/api/cache/stats").json()
    assert stats["reachable"] and stats["entries"] == 0 and stats["by_model"] == []
    assert api.post("/api/cache/clear", json={}).json()["removed"] == 0
    audit = api.get("/api/audit").json()["data"]
    assert audit[0]["action"] == "cache.clear"
    schema = api.get("/openapi.json").json()
    assert {"/api/tasks", "/api/models/pull", "/api/cache/stats"} <= set(schema["paths"])


def test_session_cookie_needs_csrf_and_same_origin(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        session = browser.get("/api/session")
        assert session.status_code == 200
        cookie = session.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        csrf = session.json()["csrf"]
        # an action with the cookie but without the token: refused
        body = {"type": "noop", "args": {}}
        assert browser.post("/api/tasks", json=body).status_code == 403
        ok = browser.post("/api/tasks", json=body, headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 202
        # another site's page posting through the browser: refused
        evil = {"Origin": "http://evil.example", "X-CSRF-Token": csrf}
        assert browser.post("/api/tasks", json=body, headers=evil).status_code == 403
        assert browser.delete("/api/session", headers={"X-CSRF-Token": csrf}).status_code == 204
