"""Engines that ``yichui serve`` launches and keeps up (an upstream route's ``launch`` table),
with a fake OpenAI-compatible server as the engine (``tests/fake_engine.py``): the settings,
the commands built, start / ready / restart / crash loop / port in use / standby in-process,
and a real ``yichui serve`` that launches one, answers through it and takes it down with it
(SIGTERM and SIGKILL). The real ``swift deploy`` is in ``test_swift_deploy.py``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_server import ServerProcess
from tests.engine_checks import alive, serve_ready, wait_for
from tests.fake_upstream import fake_upstream, free_port
from tests.redis_proc import RedisProcess
from yichui.config import Settings, load_settings
from yichui.errors import ConfigError
from yichui.models.registry import ModelRegistry
from yichui.runtime.launch import SWIFT_DEPLOY, launch_plan, model_path
from yichui.runtime.supervisor import EngineState, EngineSupervisor, SupervisedEngine
from yichui.swift_env import SwiftEnv

ROOT = Path(__file__).resolve().parent.parent
FAKE = [sys.executable, "-m", "tests.fake_engine", "--port", "{port}", "--model", "{model}"]
FAKE_ENV = {"PYTHONPATH": str(ROOT)}  # `-m tests.fake_engine` from any directory


def launched(port: int, launch: dict[str, Any], **route: Any) -> dict[str, Any]:
    launch = {"env": FAKE_ENV, **launch}
    return {"url": f"http://127.0.0.1:{port}/v1", "model": "fake-up", "launch": launch, **route}


@pytest.fixture
def make_supervisor(settings: Settings) -> Iterator[Callable[..., EngineSupervisor]]:
    """Supervisors on the test's settings with these routes; all stopped at the end."""
    made: list[EngineSupervisor] = []

    def make(**routes: dict[str, Any]) -> EngineSupervisor:
        s = settings.model_copy(update={"upstreams": load_settings(upstreams=routes).upstreams})
        sup = EngineSupervisor(s, model_path=lambda v: v)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.stop()


def ready(engine: SupervisedEngine, timeout: float = 20.0) -> int:
    """Wait until ``engine`` is ready -> its pid."""
    wait_for(lambda: engine.state is EngineState.READY, timeout, f"{engine.name} ready")
    assert engine.pid is not None
    return engine.pid


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"launch": {}}, "upstreams.m.launch: give either command or swift_deploy"),
        (
            {"launch": {"command": ["x"], "swift_deploy": {"model": "y"}}},
            "give either command or swift_deploy",
        ),
        ({"launch": {"command": []}}, "upstreams.m.launch.command: List should have at least 1"),
        ({"launch": {"command": ["x"], "restart": True}}, "launch.restart: Extra inputs"),
        (
            {"launch": {"swift_deploy": {"model": "y", "port": 9}}},
            "swift_deploy: port is taken from the route (url, model, api_key): remove it",
        ),
        (
            {"launch": {"swift_deploy": {"model": "y", "api_key": "k"}}},
            "api_key is taken from the route",
        ),
        (
            {"launch": {"swift_deploy": {"model": "y", "bad": {"a": 1}}}},
            "bad: use a string, number, bool or a list of them",
        ),
        ({"launch": {"swift_deploy": {}}}, "upstreams.m.launch.swift_deploy.model: Field required"),
        (
            {"url": "http://127.0.0.1/v1", "launch": {"swift_deploy": {"model": "y"}}},
            "upstreams.m: a swift_deploy launch needs a port in the route's url",
        ),
        (
            {"launch": {"command": ["x"], "health_url": "health"}},
            "health_url: use an http(s) URL or a path starting with '/'",
        ),
        (
            {"launch": {"command": ["x"], "restart_backoff": 5, "restart_backoff_max": 1}},
            "restart_backoff_max is smaller than restart_backoff",
        ),
        ({"launch": {"command": ["x"], "start_timeout": 0}}, "start_timeout: Input should be"),
    ],
)
def test_launch_settings_are_checked(route: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(upstreams={"m": {"url": "http://127.0.0.1:8011/v1", **route}})
    assert message in str(info.value)
    assert info.value.exit_code == 2


def test_the_errors_documented_are_the_ones_given() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    url = "http://127.0.0.1:8011/v1"
    for launch in ({}, {"swift_deploy": {"model": "smol", "port": 8011}}):
        with pytest.raises(ConfigError) as info:
            load_settings(upstreams={"smol-swift": {"url": url, "launch": launch}})
        assert f"`{info.value}`" in doc, str(info.value)


def test_one_launch_per_server() -> None:
    two = {
        "a": {"url": "http://127.0.0.1:8011/v1", "launch": {"command": ["x"]}},
        "b": {"url": "http://127.0.0.1:8011/v1/", "launch": {"command": ["y"]}},
        "c": {"url": "http://127.0.0.1:8011/v1", "model": "other"},  # routed to it: fine
    }
    with pytest.raises(ConfigError, match="upstreams 'a' and 'b' both launch an engine at"):
        load_settings(upstreams=two)
    del two["b"]
    assert load_settings(upstreams=two).upstreams["c"].launch is None


def test_the_documented_toml_reads(tmp_path: Path) -> None:
    config = tmp_path / "yichui.toml"
    config.write_text(
        """
[upstreams."smol-swift"]
url = "http://127.0.0.1:8011/v1"
model = "smol"
api_key = "sk-local"
[upstreams."smol-swift".launch]
swift_deploy = { model = "smollm2-135m-instruct", model_type = "llama", template = "chatml" }
start_timeout = 300

[upstreams."smol-big".launch.swift_deploy]      # the same as a table of its own
model = "/srv/models/SmolLM2-1.7B-Instruct"
infer_backend = "vllm"
max_model_len = 8192
[upstreams."smol-big"]
url = "http://127.0.0.1:8013/v1"

[upstreams."qwen2.5-7b"]
url = "http://127.0.0.1:8012/v1"
model = "Qwen/Qwen2.5-7B-Instruct"
[upstreams."qwen2.5-7b".launch]
command = ["vllm", "serve", "Qwen/Qwen2.5-7B-Instruct", "--port", "{port}"]
env = { CUDA_VISIBLE_DEVICES = "0" }
health_url = "/health"
"""
    )
    routes = load_settings(config).upstreams
    swift = routes["smol-swift"].launch
    assert swift is not None and swift.swift_deploy is not None
    assert swift.swift_deploy.arguments() == {"model_type": "llama", "template": "chatml"}
    big = routes["smol-big"].launch
    assert big is not None and big.swift_deploy is not None
    assert big.swift_deploy.arguments() == {"infer_backend": "vllm", "max_model_len": 8192}
    assert swift.start_timeout == 300 and swift.restart_backoff == 1.0
    vllm = routes["qwen2.5-7b"].launch
    assert vllm is not None and vllm.env == {"CUDA_VISIBLE_DEVICES": "0"}


# -- the commands -------------------------------------------------------------------------------


def test_swift_deploy_command_takes_the_route() -> None:
    route = load_settings(
        upstreams={
            "smol": {
                "url": "http://127.0.0.1:8011/v1",
                "model": "smol-there",
                "api_key": "sk-secret",
                "launch": {
                    "swift_deploy": {
                        "model": "smollm2",
                        "model_type": "llama",
                        "torch_dtype": "float32",
                        "gpus": [0, 1],
                        "verbose": False,
                    },
                    "env": {"EXTRA": "1"},
                },
            }
        }
    ).upstreams["smol"]
    swift = SwiftEnv(Path("/envs/swift/bin/python"), "3.11", {"ms-swift": "4.6.0"})
    plan = launch_plan("smol", route, swift=swift, model_path=lambda v: f"/models/{v}")
    assert plan.argv == [
        "/envs/swift/bin/python",
        "-c",
        SWIFT_DEPLOY,
        *("--model", "/models/smollm2", "--host", "127.0.0.1", "--port", "8011"),
        *("--served_model_name", "smol-there", "--api_key", "sk-secret"),
        *("--model_type", "llama", "--torch_dtype", "float32", "--gpus", "0", "1"),
        *("--verbose", "false"),
    ]
    assert "sk-secret" not in plan.shown and plan.shown.startswith("swift deploy --model ")
    assert plan.health_url == "http://127.0.0.1:8011/v1/models"
    assert plan.headers == {"Authorization": "Bearer sk-secret"}
    assert plan.env["EXTRA"] == "1" and plan.env["PYTHONUNBUFFERED"] == "1"


def test_command_placeholders_and_health_path() -> None:
    route = load_settings(
        upstreams={
            "m": launched(
                8123,
                {"command": ["srv", "--port={port}", "{model}", "{host}", "k={api_key}"]},
                api_key="sk-1",
            )
            | {"url": "http://bob:pw@127.0.0.1:8123/v1"}
        }
    ).upstreams["m"]
    assert route.launch is not None
    plan = launch_plan("m", route, swift=None, model_path=str)
    assert plan.argv == ["srv", "--port=8123", "fake-up", "127.0.0.1", "k=sk-1"]
    assert plan.shown == "srv --port=8123 fake-up 127.0.0.1 k=***"
    with_path = route.model_copy(
        update={"launch": route.launch.model_copy(update={"health_url": "/health"})}
    )
    assert launch_plan("m", with_path, swift=None, model_path=str).health_url == (
        "http://127.0.0.1:8123/health"  # no user:password
    )


def test_swift_model_is_a_yichui_model_a_folder_or_a_hub_id(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    models = tmp_path / "models"  # the registry fixture's models root
    (models / "tiny").mkdir(parents=True)
    (models / "tiny" / "config.json").write_text('{"model_type": "llama"}')
    assert model_path(registry, "tiny") == str(models / "tiny")
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert model_path(registry, str(folder)) == str(folder)
    assert model_path(registry, "Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_missing_ms_swift_is_a_settings_error(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(
        update={
            "swift_python": tmp_path / "no-such-python",
            "upstreams": load_settings(
                upstreams={"smol": launched(8011, {"swift_deploy": {"model": "smol"}})}
            ).upstreams,
        }
    )
    with pytest.raises(ConfigError) as info:
        EngineSupervisor(s, model_path=str).check()
    assert str(info.value).startswith("upstreams.smol.launch.swift_deploy needs ms-swift: ")
    assert "no-such-python does not exist" in str(info.value)
    assert info.value.exit_code == 2 and info.value.hint and "make swift" in info.value.hint


# -- supervision, in-process --------------------------------------------------------------------


def test_starts_waits_until_ready_and_restarts_a_killed_engine(
    make_supervisor: Callable[..., EngineSupervisor],
) -> None:
    port = free_port()
    sup = make_supervisor(m=launched(port, {"command": FAKE, "restart_backoff": 0.2}))
    sup.start()
    engine = sup.engines["m"]
    assert engine.state in (EngineState.STARTING, EngineState.STOPPED)
    first = ready(engine)
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["fake-up"]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: engine.pid != first and engine.state is EngineState.READY, what="restart")
    assert engine.restarts == 1 and engine.last_exit == "killed by SIGKILL"
    assert not alive(first)
    log = engine.log_path.read_text()
    assert log.count("yichui serve starts: ") == 2
    assert engine.log_path.parent == sup.settings.data_dir / "engines" / sup.folder.name
    (status,) = sup.states()
    assert status["state"] == "ready" and status["pid"] == engine.pid
    assert sup.health() == {"m": {"state": "ready", "pid": engine.pid, "restarts": 1}}


def test_a_crash_loop_is_reported_and_paced(
    make_supervisor: Callable[..., EngineSupervisor], caplog: pytest.LogCaptureFixture
) -> None:
    crash = [sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"]
    launch = {"command": crash, "restart_backoff": 0.2, "restart_backoff_max": 0.6}
    sup = make_supervisor(m=launched(free_port(), launch))
    with caplog.at_level(logging.INFO, logger="yichui.engines"):
        started = time.monotonic()
        sup.start()
        engine = sup.engines["m"]
        wait_for(lambda: engine.state is EngineState.CRASH_LOOP, what="crash loop")
        time.sleep(2.0)
        elapsed = time.monotonic() - started
    assert engine.last_exit == "exited with code 3 before it was ready"
    # 0.2, 0.4, then 0.6 s apart (±20 %): never spun fast
    assert 3 <= engine.restarts <= 2 + elapsed / 0.45
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # reported once, when it became a loop
    assert "engine 'm' is crash-looping: 3 failed starts in a row" in errors[0]
    assert str(engine.log_path) in errors[0]
    assert engine.log_path.read_text().count("bad config") >= 3


def test_not_ready_in_time_is_killed_and_retried(
    make_supervisor: Callable[..., EngineSupervisor],
) -> None:
    silent = [sys.executable, "-c", "import time; time.sleep(600)"]
    launch = {"command": silent, "start_timeout": 0.5, "restart_backoff": 5.0}
    sup = make_supervisor(m=launched(free_port(), launch))
    sup.start()
    engine = sup.engines["m"]
    pid = wait_for(lambda: engine.pid, what="a start")
    wait_for(lambda: engine.state is EngineState.BACKOFF, timeout=10, what="backoff")
    assert engine.last_exit == "not ready within 0.5 s"
    assert not alive(pid) and engine.pid is None


def test_a_port_in_use_starts_nothing(make_supervisor: Callable[..., EngineSupervisor]) -> None:
    with fake_upstream() as other:
        sup = make_supervisor(m=launched(other.port, {"command": FAKE, "restart_backoff": 5.0}))
        sup.start()
        engine = sup.engines["m"]
        wait_for(lambda: engine.state is EngineState.PORT_BUSY, what="port busy")
        assert engine.pid is None
        assert engine.last_exit == f"port {other.port} of 127.0.0.1 is in use by another process"


def test_stop_takes_the_engine_and_its_children(
    make_supervisor: Callable[..., EngineSupervisor], tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    command = [*FAKE, "--child-pidfile", str(pidfile)]
    sup = make_supervisor(m=launched(free_port(), {"command": command, "stop_timeout": 5}))
    sup.start()
    pid = ready(sup.engines["m"])
    child = int(wait_for(pidfile.read_text))
    assert alive(child)
    started = time.monotonic()
    sup.stop()
    assert time.monotonic() - started < 5
    assert not alive(pid) and not alive(child)
    assert sup.engines["m"].state is EngineState.STOPPED


def test_another_server_of_the_host_stands_by_then_takes_over(
    make_supervisor: Callable[..., EngineSupervisor],
) -> None:
    routes = {"m": launched(free_port(), {"command": FAKE, "restart_backoff": 0.2})}
    first, second = make_supervisor(**routes), make_supervisor(**routes)
    first.start()
    pid = ready(first.engines["m"])
    second.start()
    standby = second.engines["m"]
    wait_for(lambda: standby.state is EngineState.STANDBY, what="standby")
    assert standby.pid is None
    first.stop()
    assert not alive(pid)
    assert ready(standby, timeout=30) != pid


# -- a real yichui serve ------------------------------------------------------------------------


@pytest.fixture
def serve_launching(
    redis_server: RedisProcess, tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    made: list[ServerProcess] = []

    def start(**launch: Any) -> ServerProcess:
        port = free_port()
        server = ServerProcess(
            tmp_path,
            redis_url=redis_server.url,
            upstreams={"fake": launched(port, {"command": FAKE, **launch})},
        ).start()
        made.append(server)
        return server

    yield start
    for server in made:
        server.stop()


def test_serve_launches_answers_through_it_and_sigterm_stops_it(
    serve_launching: Callable[..., ServerProcess],
) -> None:
    server = serve_launching()
    pid = serve_ready(server, "fake")
    answer = server.openai().chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "one two"}], temperature=0
    )
    assert answer.choices[0].message.content == "two one"

    def fleet_engines() -> list[dict[str, Any]] | None:  # the heartbeat's record (`yichui ps`)
        servers = httpx.get(f"{server.url}/api/servers").json()["data"]
        found = servers[0].get("engines") if servers else None
        return found if found and found[0]["state"] == "ready" else None

    (engine,) = wait_for(fleet_engines, what="the engine in the fleet record")
    assert engine["route"] == "fake" and engine["pid"] == pid and engine["restarts"] == 0
    assert engine["log"].endswith("fake.log")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises it once it is done
    assert not alive(pid)
    assert "engine 'fake': ready at http://127.0.0.1:" in server.output()


def test_sigkilled_serve_takes_its_engine_and_the_engine_s_children(
    serve_launching: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    server = serve_launching(command=[*FAKE, "--child-pidfile", str(pidfile)])
    pid = serve_ready(server, "fake")
    child = int(wait_for(pidfile.read_text))
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)
    wait_for(lambda: not alive(pid) and not alive(child), timeout=10, what="engine gone")


def test_serve_refuses_a_swift_launch_without_ms_swift(tmp_path: Path, redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    env.update(
        YICHUI_REDIS_URL=redis_url,
        YICHUI_DATA_DIR=str(tmp_path / "data"),
        YICHUI_SWIFT_PYTHON=str(tmp_path / "nothing"),
        YICHUI_UPSTREAMS='{"smol": {"url": "http://127.0.0.1:8011/v1", '
        '"launch": {"swift_deploy": {"model": "smol"}}}}',
    )
    done = subprocess.run(
        [sys.executable, "-m", "yichui.cli.main", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error: upstreams.smol.launch.swift_deploy needs ms-swift: ")
    assert lines[1].startswith("hint: run `make swift`")
    assert len(lines) == 2
