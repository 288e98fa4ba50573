"""The model status cache in Redis: hits, misses, negative entries, TTLs and jitter."""

from __future__ import annotations

import random
from pathlib import Path

import redis

from tests.helpers import make_model
from yichui.models.registry import ModelRegistry
from yichui.state.codec import jittered
from yichui.state.keys import Keys
from yichui.state.model_status import ModelStatusStore


def test_miss_then_hit(registry: ModelRegistry, redis_client: redis.Redis) -> None:
    make_model(registry.root, "org/m1", weight_bytes=2048)
    first = registry.status("org/m1")
    assert first.status.exists and not first.cached
    assert first.status.size == 2048 + len("{}") + len(
        (registry.root / "org/m1/config.json").read_bytes()
    )
    assert first.status.kind == "text" and first.status.files == 3
    second = registry.status("org/m1")
    assert second.cached
    assert second.status.to_dict() == first.status.to_dict()
    assert redis_client.exists("model_status:{org/m1}")


def test_hit_does_not_touch_the_disk(registry: ModelRegistry) -> None:
    folder = make_model(registry.root, "m2")
    registry.status("m2")
    (folder / "model.safetensors").unlink()
    # the cache answers without rescanning; --refresh sees the change
    assert registry.status("m2").status.files == 3
    refreshed = registry.status("m2", refresh=True)
    assert not refreshed.cached and refreshed.status.files == 2


def test_negative_entry_cached_with_short_ttl(
    registry: ModelRegistry, redis_client: redis.Redis
) -> None:
    missing = registry.status("nobody/here")
    assert not missing.status.exists and not missing.cached
    ttl = redis_client.ttl("model_status:{nobody/here}")
    assert 0 < ttl <= registry.settings.model_missing_ttl * 1.1 + 1
    again = registry.status("nobody/here")
    assert again.cached and not again.status.exists
    # a model that appears later is seen at once with --refresh, or after the short TTL
    make_model(registry.root, "nobody/here")
    assert registry.status("nobody/here", refresh=True).status.exists


def test_positive_ttl_is_jittered_24h(registry: ModelRegistry, redis_client: redis.Redis) -> None:
    ttls = []
    for i in range(30):
        make_model(registry.root, f"j{i}")
        registry.status(f"j{i}")
        ttls.append(redis_client.ttl(f"model_status:{{j{i}}}"))
    day = 24 * 3600
    assert all(day * 0.9 - 1 <= t <= day * 1.1 + 1 for t in ttls)
    assert len(set(ttls)) > 5, "TTLs must be spread, not identical"


def test_jitter_bounds() -> None:
    rng = random.Random(7)
    values = [jittered(1000, 0.1, rng) for _ in range(2000)]
    assert min(values) >= 900 and max(values) <= 1100
    assert min(values) < 920 and max(values) > 1080
    assert jittered(1, 0.1, rng) == 1
    assert jittered(1000, 0.0, rng) == 1000


def test_value_and_expiry_written_atomically(
    registry: ModelRegistry, redis_client: redis.Redis
) -> None:
    # every status key carries a TTL the moment it exists (SET … EX, never SET then EXPIRE)
    make_model(registry.root, "atomic")
    registry.status("atomic")
    registry.status("absent")
    for key in redis_client.scan_iter("model_status:*"):
        assert redis_client.ttl(key) > 0


def test_namespace_prefix(registry: ModelRegistry, redis_client: redis.Redis) -> None:
    store = ModelStatusStore(redis_client, Keys("team-a"), ttl=100, missing_ttl=10, jitter=0.1)
    store.put("x", {"name": "x", "exists": True})
    assert redis_client.exists("team-a:model_status:{x}")
    assert redis_client.hexists("team-a:model_index:{models}", "x")
    assert not redis_client.exists("model_status:{x}")
    assert not [k for k in redis_client.scan_iter("*") if not k.startswith(b"team-a:")]


def test_listing_blob_follows_every_change(
    registry: ModelRegistry, redis_client: redis.Redis
) -> None:
    assert registry.store is not None
    make_model(registry.root, "b")
    registry.rescan()
    assert [r["name"] for r in registry.store.listing() or []] == ["b"]
    # a single put (pull, import, a status miss) keeps the listing in step, sorted by name
    make_model(registry.root, "A")
    registry.status("A")
    make_model(registry.root, "c")
    registry.status("c")
    assert [r["name"] for r in registry.store.listing() or []] == ["A", "b", "c"]
    registry.store.put("b", {"name": "b", "exists": False})
    assert [r["name"] for r in registry.store.listing() or []] == ["A", "c"]


def test_single_puts_do_not_fake_a_built_index(
    registry: ModelRegistry, redis_client: redis.Redis
) -> None:
    # a status lookup before any listing must not make a one-model index look complete
    make_model(registry.root, "one")
    make_model(registry.root, "two")
    registry.status("one")
    assert registry.store is not None and registry.store.listing() is None
    assert [m["name"] for m in registry.listing().models] == ["one", "two"]


def test_listing_answered_from_index(registry: ModelRegistry, tmp_path: Path) -> None:
    make_model(registry.root, "a/text1")
    make_model(registry.root, "a/vision1", kind="multimodal")
    make_model(registry.root, "solo")
    first = registry.listing()
    assert not first.cached  # the first listing builds the index with one walk
    names = [m["name"] for m in first.models]
    assert names == ["a/text1", "a/vision1", "solo"]
    # later listings come from Redis: a folder created behind yichui's back is not seen…
    make_model(registry.root, "sneaky")
    second = registry.listing()
    assert second.cached and [m["name"] for m in second.models] == names
    # …until a rescan (or a status lookup of that name)
    registry.rescan()
    assert "sneaky" in [m["name"] for m in registry.listing().models]
    assert [m["name"] for m in registry.listing(kind="multimodal").models] == ["a/vision1"]
    assert [m["name"] for m in registry.listing(pattern="A/*").models] == ["a/text1", "a/vision1"]
    assert registry.listing(source="huggingface").models == []
    assert len(registry.listing(source="local").models) == 4


def test_rescan_drops_vanished_models(registry: ModelRegistry, redis_client: redis.Redis) -> None:
    folder = make_model(registry.root, "gone")
    make_model(registry.root, "kept")
    registry.rescan()
    import shutil

    shutil.rmtree(folder)
    registry.rescan()
    assert [m["name"] for m in registry.listing().models] == ["kept"]
    assert not redis_client.exists("model_status:{gone}")


def test_fingerprint_changes_with_weights(registry: ModelRegistry) -> None:
    folder = make_model(registry.root, "fp")
    before = registry.status("fp", refresh=True).status.fingerprint
    assert registry.status("fp", refresh=True).status.fingerprint == before
    (folder / "model.safetensors").write_bytes(b"\x02" * 1024)  # same size, new content
    import os

    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert registry.status("fp", refresh=True).status.fingerprint != before


def test_folders_with_unmanageable_names_are_not_listed(registry: ModelRegistry) -> None:
    make_model(registry.root, "good")
    make_model(registry.root, "bad name")
    make_model(registry.root, "org/also bad")
    assert [m["name"] for m in registry.listing().models] == ["good"]
