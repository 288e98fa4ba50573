"""The capability seams: a throwaway engine and a throwaway task type, each one module
(``tests/extensions/``) plus one registration (the ``extensions`` setting), are served by a real
``yichui serve`` and run by a real worker; a bad extension is refused in one line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.api_server import ServerProcess
from tests.redis_proc import RedisProcess
from yichui.config import Settings, load_settings
from yichui.errors import ConfigError
from yichui.runtime import Runtime

EXTENSIONS = ["tests.extensions.echo_engine", "tests.extensions.tally_task"]


@pytest.fixture
def server(redis_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, redis_url=redis_url, extensions=EXTENSIONS).start()
    yield proc
    proc.stop()


def test_an_extension_engine_is_served_and_cached(server: ServerProcess) -> None:
    client = server.openai()
    ids = [m.id for m in client.models.list().data]
    assert "echo/shout" in ids
    ask = {"model": "echo/shout", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    first = client.chat.completions.with_raw_response.create(**ask)
    again = client.chat.completions.with_raw_response.create(**ask)
    assert first.parse().choices[0].message.content == "HI"
    assert (first.headers["x-yichui-cache"], again.headers["x-yichui-cache"]) == ("miss", "hit")
    streamed = client.chat.completions.create(**ask, stream=True, max_tokens=8)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text.strip() == "HI"


def test_a_bug_inside_an_engine_is_a_500_without_its_text(server: ServerProcess) -> None:
    for stream in (False, True):
        body = {"model": "echo/shout", "messages": [{"role": "user", "content": "boom"}]}
        response = httpx.post(
            f"{server.url}/v1/chat/completions", json={**body, "stream": stream}, timeout=30
        )
        if stream:  # the stream had begun: the error is its last event
            assert response.status_code == 200
            error = orjson.loads(response.text.split("data: ")[-1])["error"]
        else:
            assert response.status_code == 500
            error = response.json()["error"]
        assert error == {
            "message": "internal error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    assert "tensor a (3)" in server.output()  # logged, with its traceback, for the operator
    assert "Traceback" in server.output()


def test_an_extension_task_type_runs_on_a_worker(settings: Settings) -> None:
    rt = Runtime(load_settings(**{**settings.model_dump(), "extensions": EXTENSIONS}))
    try:
        assert "tally" in rt.task_types.names() and "train" in rt.task_types.names()
        task = rt.tasks.submit("tally", {"numbers": [1, 2, 3]})
        stats = rt.worker(burst=True).run()
        done = rt.tasks.get(task["id"])
        assert stats["succeeded"] == 1 and done["state"] == "succeeded"
        assert done["result"]["total"] == 6
        assert done["result"]["models_root"] == str(settings.models_path)  # typed services
    finally:
        rt.close()


def test_a_bad_extension_is_one_clear_error(
    settings: Settings, redis_server: RedisProcess, tmp_path: Path
) -> None:
    rt = Runtime(load_settings(**{**settings.model_dump(), "extensions": ["tests.nowhere"]}))
    with pytest.raises(ConfigError, match=r"cannot import extension 'tests\.nowhere'"):
        _ = rt.task_types
    rt.close()
    with pytest.raises(ConfigError, match="neither task_types"):
        bare = Runtime(load_settings(**{**settings.model_dump(), "extensions": ["tests.helpers"]}))
        _ = bare.task_types
    out = subprocess.run(
        [sys.executable, "-m", "yichui.cli.main", "tasks", "submit", "noop"],
        env={
            "YICHUI_REDIS_URL": redis_server.url,
            "YICHUI_DATA_DIR": str(tmp_path / "d"),
            "YICHUI_EXTENSIONS": '["tests.nowhere"]',
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: cannot import extension 'tests.nowhere'"), out.stderr
    assert "Traceback" not in out.stderr
