"""The CLI as users run it: JSON output, one-line errors, degraded reads without Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_model
from tests.redis_proc import free_port
from yichui.config import Settings


def run(
    settings: Settings, *args: str, redis_url: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    full_env.update(
        YICHUI_DATA_DIR=str(settings.data_dir),
        YICHUI_MODELS_ROOT=str(settings.models_path),
        YICHUI_REDIS_URL=redis_url or str(settings.redis_url),
        YICHUI_MIRROR_DIR=str(settings.mirror_dir),
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "yichui.cli.main", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and text in proc.stderr.splitlines()[0], proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # the message, and maybe a hint


@pytest.fixture
def root(settings: Settings) -> Path:
    make_model(settings.models_path, "org/text-a")
    make_model(settings.models_path, "org/vision-b", kind="multimodal")
    return settings.models_path


def test_list_and_status_json(settings: Settings, root: Path) -> None:
    proc = run(settings, "models", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    items = json.loads(proc.stdout)
    assert [i["name"] for i in items] == ["org/text-a", "org/vision-b"]
    for item in items:
        assert {"name", "exists", "kind", "size", "source"} <= item.keys()
        assert item["exists"] is True and item["size"] > 0
    assert [i["kind"] for i in items] == ["text", "multimodal"]
    only = json.loads(run(settings, "models", "list", "--json", "--kind", "multimodal").stdout)
    assert [i["name"] for i in only] == ["org/vision-b"]

    status = run(settings, "models", "status", "org/text-a", "--json")
    obj = json.loads(status.stdout)
    assert status.returncode == 0 and obj["name"] == "org/text-a" and obj["kind"] == "text"
    assert obj["cached"] is True  # the listing filled the cache


def test_human_output(settings: Settings, root: Path) -> None:
    proc = run(settings, "models", "list")
    assert proc.returncode == 0 and "org/text-a" in proc.stdout
    proc = run(settings, "models", "status", "org/vision-b")
    assert proc.returncode == 0 and "multimodal" in proc.stdout


def test_unknown_and_unsafe_names(settings: Settings, root: Path) -> None:
    proc = run(settings, "models", "status", "org/missing")
    assert_one_line_error(proc, 1, "not found")
    proc = run(settings, "models", "status", "org/missing", "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["exists"] is False
    for bad in ("../etc", "/abs", "a/b/c", "bad\x01name"):
        proc = run(settings, "models", "status", bad)
        assert_one_line_error(proc, 2, "invalid model name")
        proc = run(settings, "models", "pull", bad)
        assert_one_line_error(proc, 2, "invalid model name")


def test_pull_rm_verify_through_cli(settings: Settings) -> None:
    assert settings.mirror_dir is not None
    make_model(settings.mirror_dir, "hub/m")
    dry = run(settings, "models", "pull", "hub/m", "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["action"] == "dry-run"
    pulled = run(settings, "models", "pull", "hub/m", "--json")
    assert json.loads(pulled.stdout)["action"] == "installed", pulled.stderr
    listed = json.loads(run(settings, "models", "list", "--json").stdout)
    assert [i["name"] for i in listed] == ["hub/m"] and listed[0]["source"] == "mirror"
    verified = run(settings, "models", "verify", "hub/m", "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True
    refused = run(settings, "models", "rm", "hub/m")  # no tty, no --yes
    assert_one_line_error(refused, 1, "confirmation")
    removed = run(settings, "models", "rm", "hub/m", "--yes", "--json")
    assert removed.returncode == 0 and json.loads(removed.stdout)["removed"] is True
    assert json.loads(run(settings, "models", "list", "--json").stdout) == []
    missing_src = run(settings, "models", "pull", "hub/other")
    assert_one_line_error(missing_src, 1, "not in the mirror")


def test_redis_down_reads_fall_back_to_disk(settings: Settings, root: Path) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    proc = run(settings, "models", "list", "--json", redis_url=down)
    assert proc.returncode == 0, proc.stderr
    assert [i["name"] for i in json.loads(proc.stdout)] == ["org/text-a", "org/vision-b"]
    assert "degraded" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(settings, "models", "status", "org/vision-b", "--json", redis_url=down)
    obj = json.loads(proc.stdout)
    assert proc.returncode == 0 and obj["exists"] and obj["degraded"]
    # writes need the lock, so they fail in one line
    proc = run(settings, "models", "pull", "org/anything", redis_url=down)
    assert_one_line_error(proc, 1, "unreachable")
    proc = run(settings, "doctor", "--json", redis_url=down)
    assert proc.returncode == 1 and json.loads(proc.stdout)["ok"] is False


def test_bad_configuration(settings: Settings, tmp_path: Path) -> None:
    proc = run(settings, "models", "list", YICHUI_TTL_JITTER="5")
    assert_one_line_error(proc, 2, "ttl_jitter")
    proc = run(settings, "models", "list", redis_url="http://nope")
    assert_one_line_error(proc, 2, "unknown scheme")
    cfg = tmp_path / "bad.toml"
    cfg.write_text("this is = = not toml")
    proc = run(settings, "--config", str(cfg), "models", "list")
    assert_one_line_error(proc, 2, "config file")
    proc = run(settings, "--config", str(tmp_path / "none.toml"), "models", "list")
    assert_one_line_error(proc, 2, "does not exist")


def test_setting_errors_are_the_ones_documented(settings: Settings) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for env, message in (
        ({"YICHUI_TASK_HEARTBEAT": "20"}, "task_heartbeat must be at most half of task_lease"),
        ({"YICHUI_INFERENCE_DTYPE": "bogus"}, "inference_dtype: Input should be 'auto', 'bf"),
    ):
        proc = run(settings, "models", "list", **env)  # refused at load, by every command
        assert_one_line_error(proc, 2, message)
        quoted = proc.stderr.splitlines()[0].removeprefix("error: ")
        assert f"`{quoted}`" in doc, quoted


def test_config_file(settings: Settings, root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-root"
    make_model(other, "from-config")
    cfg = tmp_path / "yichui.toml"
    cfg.write_text(f'models_root = "{other}"\nnamespace = "cfg"\n')
    env_root = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    proc = subprocess.run(
        [sys.executable, "-m", "yichui.cli.main", "--config", str(cfg), "models", "list", "--json"],
        env={**env_root, "YICHUI_REDIS_URL": str(settings.redis_url)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert [i["name"] for i in json.loads(proc.stdout)] == ["from-config"], proc.stderr


def test_debug_shows_traceback(settings: Settings) -> None:
    proc = run(settings, "models", "status", "../x", YICHUI_DEBUG="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_doctor(settings: Settings) -> None:
    proc = run(settings, "doctor", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"] is True, proc.stdout
    names = {c["name"] for c in report["checks"]}
    assert {"redis", "models root", "data dir", "extra [ml]", "extra [hub]"} <= names
    redis_check = next(c for c in report["checks"] if c["name"] == "redis")
    assert "Redis 7" in redis_check["detail"] or "Redis 6" in redis_check["detail"]


def test_no_arguments_prints_the_help(settings: Settings) -> None:
    for args in ((), ("models",)):
        proc = run(settings, *args)
        assert proc.returncode == 0, proc.stderr
        assert "Usage: yichui" in proc.stdout and "Commands" in proc.stdout
        assert proc.stderr == ""


def test_usage_errors_are_one_line_with_exit_2(settings: Settings) -> None:
    proc = run(settings, "nope")
    assert_one_line_error(proc, 2, "No such command 'nope'")
    assert proc.stderr.splitlines()[1] == "hint: yichui --help shows the usage"
    proc = run(settings, "models", "list", "--bogus")
    assert_one_line_error(proc, 2, "No such option: --bogus")
    assert "yichui models list --help" in proc.stderr
    proc = run(settings, "models", "status")
    assert_one_line_error(proc, 2, "Missing argument")
