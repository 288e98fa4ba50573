"""``yichui tasks …`` and ``yichui worker`` as users run them: JSON shapes, exit codes,
one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.api_server import ServerProcess
from tests.helpers import make_model
from tests.test_cli import assert_one_line_error, run
from yichui.config import Settings

FAST = {"YICHUI_TASK_HEARTBEAT": "0.1", "YICHUI_TASK_LEASE": "2", "YICHUI_TASK_BACKOFF": "0"}


def tasks(settings: Settings, *args: str) -> Any:
    proc = run(settings, "tasks", *args, "--json", **FAST)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def burst(settings: Settings, expect: int = 0) -> str:
    proc = run(settings, "worker", "--burst", "-n", "2", **FAST)
    assert proc.returncode == expect, proc.stderr
    return proc.stderr


def test_selftest_show_list_logs_watch(settings: Settings) -> None:
    task = tasks(settings, "selftest", "--steps", "3", "--step-seconds", "0")
    assert task["state"] == "queued" and task["id"]
    shown = tasks(settings, "show", task["id"])
    assert shown["progress"]["step"] == 0 and shown["progress"]["total"] is None
    burst(settings)
    shown = tasks(settings, "show", task["id"])
    assert {"id", "state", "attempt", "progress"} <= shown.keys()
    assert (shown["state"], shown["attempt"]) == ("succeeded", 1)
    assert (shown["progress"]["step"], shown["progress"]["total"]) == (3, 3)
    listed = tasks(settings, "list", "--state", "succeeded")
    assert [t["id"] for t in listed["tasks"]] == [task["id"]]
    assert listed["counts"]["succeeded"] == 1
    logs = run(settings, "tasks", "logs", task["id"])
    assert "step 3/3" in logs.stdout and "succeeded" in logs.stdout
    watched = run(settings, "tasks", "watch", task["id"], "--json")
    assert watched.returncode == 0
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert events[-1]["state"] == "succeeded"
    human = run(settings, "tasks", "watch", task["id"])
    assert human.returncode == 0 and "succeeded" in human.stdout


def test_exit_codes_follow_the_outcome(settings: Settings) -> None:
    dead = tasks(
        settings,
        "selftest",
        "--steps",
        "2",
        "--step-seconds",
        "0",
        "--fail-at",
        "1",
        "--max-attempts",
        "2",
    )
    cancelled = tasks(settings, "submit", "noop")
    out = tasks(settings, "cancel", cancelled["id"])
    assert out["state"] == "cancelled" and out["outcome"] == "cancelled"
    stderr = burst(settings, expect=1)  # a burst worker reports failures in its status
    assert "dead" in stderr
    shown = tasks(settings, "show", dead["id"])
    assert shown["state"] == "dead" and "gave up after 2 attempts" in shown["error"]["message"]
    assert run(settings, "tasks", "watch", dead["id"]).returncode == 1
    assert run(settings, "tasks", "watch", cancelled["id"]).returncode == 3
    again = tasks(settings, "retry", cancelled["id"])
    assert again["state"] == "queued" and again["attempt"] == 0
    unchanged = tasks(settings, "cancel", dead["id"])
    assert unchanged["outcome"] == "unchanged" and unchanged["state"] == "dead"


def test_submit_is_idempotent_for_an_id(settings: Settings) -> None:
    first = tasks(settings, "submit", "selftest", "--id", "nightly-1", "-a", "steps=2")
    again = tasks(settings, "submit", "selftest", "--id", "nightly-1", "-a", "steps=2")
    assert first["id"] == again["id"] == "nightly-1"
    assert first["created_now"] and not again["created_now"]
    other = run(settings, "tasks", "submit", "selftest", "--id", "nightly-1", "-a", "steps=3")
    assert_one_line_error(other, 2, "nightly-1")
    assert tasks(settings, "list")["counts"]["queued"] == 1


def test_bad_input_is_one_line(settings: Settings) -> None:
    assert_one_line_error(run(settings, "tasks", "submit", "nope"), 2, "unknown task type")
    assert_one_line_error(run(settings, "tasks", "submit", "selftest", "-a", "steps=0"), 2, "steps")
    assert_one_line_error(
        run(settings, "tasks", "submit", "selftest", "--args", "[1]"), 2, "JSON object"
    )
    assert_one_line_error(
        run(settings, "tasks", "submit", "download", "-a", "name=../etc"), 2, "name"
    )
    assert_one_line_error(run(settings, "tasks", "show", "t-missing"), 1, "not found")
    assert_one_line_error(run(settings, "tasks", "list", "--state", "bogus"), 2, "bogus")
    assert_one_line_error(run(settings, "worker", "--queue", "no way"), 2, "queue")
    assert_one_line_error(run(settings, "tasks", "submit", "noop", "--queue", "no way"), 2, "queue")
    assert tasks(settings, "list")["counts"] == dict.fromkeys(
        ("queued", "running", "succeeded", "failed", "cancelled", "dead"), 0
    )
    done = tasks(settings, "submit", "noop")
    burst(settings)
    assert_one_line_error(run(settings, "tasks", "retry", done["id"]), 1, "succeeded")


def test_models_pull_detach_runs_a_download_task(settings: Settings) -> None:
    assert settings.mirror_dir is not None
    make_model(settings.mirror_dir, "org/small", weight_bytes=50_000)
    proc = run(settings, "models", "pull", "org/small", "--source", "mirror", "--detach", "--json")
    assert proc.returncode == 0, proc.stderr
    task = json.loads(proc.stdout)
    assert task["type"] == "download" and task["args"]["name"] == "org/small"
    burst(settings)
    shown = tasks(settings, "show", task["id"])
    assert shown["state"] == "succeeded" and shown["result"]["action"] == "installed"
    assert shown["progress"]["unit"] == "bytes"
    assert shown["progress"]["step"] == shown["progress"]["total"] > 50_000
    status = json.loads(run(settings, "models", "status", "org/small", "--json").stdout)
    assert status["exists"] is True


def test_serve_runs_task_workers_beside_the_api(settings: Settings, tmp_path: Path) -> None:
    server = ServerProcess(
        tmp_path,
        redis_url=str(settings.redis_url),
        args=("--workers", "1"),
        data_dir=str(settings.data_dir),
        task_heartbeat="0.2",
        task_lease="2",
    ).start()
    try:
        done = run(
            settings,
            "tasks",
            "selftest",
            "--steps",
            "2",
            "--step-seconds",
            "0",
            "--wait",
            "--json",
            **FAST,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1])["state"] == "succeeded"
    finally:
        server.stop()
    # the worker child got SIGTERM with its parent and left the group
    assert tasks(settings, "workers")["workers"] == []
