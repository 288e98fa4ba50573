"""Pulls from the mirror source: cache invalidation, single-flight, interrupted downloads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from tests.helpers import make_model
from yichui.config import Settings
from yichui.errors import DownloadError, ModelNotFoundError, SourceNotFoundError
from yichui.models.install import InstallResult
from yichui.models.names import staging_dir
from yichui.models.pull import pull_model
from yichui.models.registry import ModelRegistry
from yichui.models.sources.base import PullSpec
from yichui.models.sources.mirror import MirrorSource
from yichui.state.lock import LeaseLock


@pytest.fixture
def mirror(settings: Settings) -> MirrorSource:
    assert settings.mirror_dir is not None
    make_model(settings.mirror_dir, "org/small", weight_bytes=4096)
    make_model(settings.mirror_dir, "org/vl", kind="multimodal", weight_bytes=4096)
    return MirrorSource(settings.mirror_dir)


def _events(client: redis.Redis) -> redis.client.PubSub:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("model_events")
    return pubsub


def _next_event(pubsub: redis.client.PubSub, timeout: float = 2.0) -> dict[str, object] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.1)  # the subscribe confirmation reads as None
        if msg is not None:
            event: dict[str, object] = json.loads(msg["data"])
            return event
    return None


def test_pull_updates_status_and_publishes(
    registry: ModelRegistry, mirror: MirrorSource, redis_client: redis.Redis
) -> None:
    assert not registry.status("org/small").status.exists  # negative entry now cached
    events = _events(redis_client)
    result = pull_model(registry, mirror, "org/small", PullSpec("org/small"))
    assert result.action == "installed"
    found = registry.status("org/small")
    assert found.cached and found.status.exists  # the negative entry was replaced at once
    assert found.status.source == "mirror" and found.status.revision
    assert "org/small" in [m["name"] for m in registry.listing().models]
    event = _next_event(events)
    assert event is not None and event["event"] == "pulled" and event["name"] == "org/small"
    again = pull_model(registry, mirror, "org/small", PullSpec("org/small"))
    assert again.action == "present"


def test_dry_run_writes_nothing(registry: ModelRegistry, mirror: MirrorSource) -> None:
    result = pull_model(
        registry, mirror, "org/vl", PullSpec("org/vl", include=["*.json"]), dry_run=True
    )
    assert result.plan is not None
    assert sorted(f.path for f in result.plan.files) == ["config.json", "tokenizer.json"]
    assert not (registry.root / "org").exists()
    assert not registry.status("org/vl").status.exists


def test_include_exclude(registry: ModelRegistry, mirror: MirrorSource) -> None:
    spec = PullSpec("org/vl", exclude=["tokenizer*"])
    status = pull_model(registry, mirror, "org/vl", spec).status
    assert status is not None and status.kind == "multimodal"
    assert sorted(os.listdir(registry.root / "org/vl")) == [
        ".yichui.json",
        "config.json",
        "model.safetensors",
    ]


def test_unknown_repo(registry: ModelRegistry, mirror: MirrorSource) -> None:
    with pytest.raises(SourceNotFoundError):
        pull_model(registry, mirror, "org/nope", PullSpec("org/nope"))
    assert not registry.status("org/nope").status.exists
    assert not (registry.root / "org/nope").exists()


def test_rm_updates_cache(
    registry: ModelRegistry, mirror: MirrorSource, redis_client: redis.Redis
) -> None:
    pull_model(registry, mirror, "org/small", PullSpec("org/small"))
    assert registry.status("org/small").status.exists
    registry.remove("org/small")
    found = registry.status("org/small")
    assert found.cached and not found.status.exists
    assert not (registry.root / "org").exists()
    assert registry.listing().models == []
    with pytest.raises(ModelNotFoundError):
        registry.remove("org/small")


def test_verify_detects_damage(registry: ModelRegistry, mirror: MirrorSource) -> None:
    pull_model(registry, mirror, "org/small", PullSpec("org/small"))
    assert registry.verify("org/small").ok
    weights = registry.root / "org/small/model.safetensors"
    weights.write_bytes(b"\x00" * 4096)  # same size, different bytes
    (registry.root / "org/small/tokenizer.json").unlink()
    report = registry.verify("org/small")
    assert not report.ok
    assert report.changed == ["model.safetensors"] and report.missing == ["tokenizer.json"]
    assert registry.status("org/small").status.files == 2  # verify refreshed the cache


def test_permission_denied_marks_nothing(registry: ModelRegistry, mirror: MirrorSource) -> None:
    if os.geteuid() == 0:
        # root ignores permissions; a file where the staging folder must go fails the same way
        staging = staging_dir(registry.root, "org/small")
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text("in the way")
    else:
        registry.root.chmod(0o500)
    try:
        with pytest.raises(DownloadError) as info:
            pull_model(registry, mirror, "org/small", PullSpec("org/small"))
        assert info.value.message
    finally:
        registry.root.chmod(0o700)
    assert not registry.status("org/small", refresh=True).status.exists
    assert registry.store is not None
    assert redis.Redis.exists(registry.store.client, "model_lock:{org/small}") == 0  # type: ignore[arg-type]


def test_second_puller_waits_and_reuses(
    registry: ModelRegistry, mirror: MirrorSource, redis_client: redis.Redis
) -> None:
    """Another host holds the lock: we wait, then reuse its result instead of downloading."""
    holder = LeaseLock(redis_client, "model_lock:{org/small}", lease=5)
    assert holder.acquire()
    results: list[InstallResult | Exception] = []

    def second() -> None:
        try:
            r = pull_model(registry, mirror, "org/small", PullSpec("org/small"))
            results.append(InstallResult(r.status, r.action))  # type: ignore[arg-type]
        except Exception as exc:
            results.append(exc)

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    assert not results, "the second puller must wait for the lock holder"
    # the "other host" finishes: files in place, status committed with its token
    make_model(registry.root, "org/small")
    assert registry.store is not None
    registry.store.commit("org/small", holder.token, registry.scan("org/small").to_dict())
    t.join(10)
    assert len(results) == 1 and isinstance(results[0], InstallResult)
    assert results[0].action == "reused"
    assert not (registry.root / ".partial" / "org--small").exists()


def _pull_cmd(settings: Settings, name: str) -> list[str]:
    return [sys.executable, "-m", "yichui.cli.main", "models", "pull", name, "--json"]


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    env.update(
        YICHUI_DATA_DIR=str(settings.data_dir),
        YICHUI_MODELS_ROOT=str(settings.models_path),
        YICHUI_REDIS_URL=str(settings.redis_url),
        YICHUI_MIRROR_DIR=str(settings.mirror_dir),
    )
    return env


def _big_mirror_model(settings: Settings, name: str, size: int) -> None:
    assert settings.mirror_dir is not None
    folder = make_model(settings.mirror_dir, name)
    with open(folder / "model-00002.safetensors", "wb") as fh:
        fh.truncate(size)


@pytest.mark.slow
def test_two_processes_one_download(settings: Settings, registry: ModelRegistry) -> None:
    _big_mirror_model(settings, "org/big", 256 << 20)
    procs = [
        subprocess.Popen(
            _pull_cmd(settings, "org/big"), env=_env(settings), stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    actions = sorted(o["action"] for o in outs)
    assert actions in (["installed", "present"], ["installed", "reused"]), actions
    assert registry.status("org/big").status.exists


@pytest.mark.slow
def test_killed_pull_leaves_nothing_and_resumes(
    settings: Settings, registry: ModelRegistry
) -> None:
    _big_mirror_model(settings, "org/big", 128 << 20)
    staging = staging_dir(settings.models_path, "org/big")
    env = {**_env(settings), "YICHUI_PULL_LOCK_LEASE": "1.5"}  # lapses soon after the kill
    proc = subprocess.Popen(_pull_cmd(settings, "org/big"), env=env, stdout=subprocess.DEVNULL)
    part = staging / "model-00002.safetensors.part"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (part.exists() and part.stat().st_size > 0):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    copied = part.stat().st_size
    assert 0 < copied < 128 << 20, "the kill must land mid-copy"
    # nothing is reported as existing: not the cache, not a fresh scan, not the listing
    assert not registry.status("org/big").status.exists
    assert not registry.status("org/big", refresh=True).status.exists
    assert "org/big" not in [m["name"] for m in registry.listing(refresh=True).models]
    # the lock of the dead process lapses with its lease; then a new pull resumes the copy
    progress: list[int] = []
    result = pull_model(
        registry,
        MirrorSource(settings.mirror_dir),  # type: ignore[arg-type]
        "org/big",
        PullSpec("org/big"),
        progress=lambda done, total: progress.append(done),
    )
    assert result.action == "installed"
    # resumed, not restarted: after config.json (62 bytes) the count jumps past what was copied
    assert progress and all(p <= 100 or p >= copied for p in progress), (copied, progress[:3])
    assert registry.status("org/big").status.exists
    assert (settings.models_path / "org/big/model-00002.safetensors").stat().st_size == 128 << 20
