"""Secure Redis and memory (docs/deployment.md): yichui as a least-privilege ACL user, over TLS
with client certificates, the clear one-line errors of a wrong password, user, CA or port, the
refusal of an evicting state instance, a full Redis, and the largest cached answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import make_model
from tests.redis_proc import RedisProcess
from tests.secure_redis import (
    ADMIN_PASSWORD,
    NAMESPACE,
    NO_NAMESPACE_PATTERNS,
    YICHUI_ACL,
    YICHUI_PASSWORD,
    Certs,
    SecureRedis,
    make_certs,
)
from tests.test_cli import assert_one_line_error, run
from yichui.access import Principal
from yichui.config import Settings, load_settings
from yichui.errors import RedisFullError, RedisSetupError
from yichui.inference.cache import ResponseCache
from yichui.inference.session import CacheStatus
from yichui.runtime import Runtime
from yichui.state.connection import make_async_client
from yichui.state.keys import Keys
from yichui.state.response_store import ResponseStore

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=["acl", "acl+tls"])
def secure(request: pytest.FixtureRequest, certs: Certs) -> Iterator[SecureRedis]:
    """A server whose only usable users are ``admin`` and ``yichui`` (the documented ACL);
    over TLS with client certificates for ``acl+tls``."""
    tmp = request.getfixturevalue("tmp_path_factory").mktemp(request.param.replace("+", "-"))
    server = SecureRedis(tmp, tls=certs if "tls" in request.param else None).start()
    yield server
    server.stop()


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("YICHUI_"):
            monkeypatch.delenv(key)


def _settings(tmp_path: Path, server: SecureRedis, certs: Certs, **over: Any) -> Settings:
    tls: dict[str, Any] = {}
    if server.tls:
        tls = {"redis_ssl_ca_certs": certs.ca, "redis_ssl_certfile": certs.client_cert,
               "redis_ssl_keyfile": certs.client_key}  # fmt: skip
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "models_root": tmp_path / "models",
        "redis_url": server.url(),
        "namespace": NAMESPACE,
        "mirror_dir": tmp_path / "mirror",
        **tls,
        **over,
    }
    return load_settings(**values)


def _env(settings: Settings) -> dict[str, str]:
    out = {"YICHUI_NAMESPACE": settings.namespace}
    for name in ("ca_certs", "certfile", "keyfile"):
        value = getattr(settings, f"redis_ssl_{name}")
        if value is not None:
            out[f"YICHUI_REDIS_SSL_{name.upper()}"] = str(value)
    return out


CHAT = {"model": "echo/shout", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
"""A deterministic request to the echo engine (``tests.extensions.echo_engine``)."""


@contextlib.asynccontextmanager
async def _api(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` in this process, its lifespan (startup, shutdown) around it."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        yield client


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert YICHUI_PASSWORD not in text and ADMIN_PASSWORD not in text


# -- the documented ACL ------------------------------------------------------------------------


def test_the_documented_acl_is_the_tested_one() -> None:
    text = DOCS.read_text()
    block = re.search(r"```\nACL SETUSER yichui (.*?)\n```", text, re.S)
    assert block, "docs/deployment.md shows the ACL as ACL SETUSER yichui …"
    documented = block.group(1).replace("\\\n", " ").split()
    tested = [">PASSWORD" if rule.startswith(">") else rule for rule in YICHUI_ACL]
    assert documented == tested
    # without a namespace (what --redis=acl runs the core suites with): the listed prefixes
    bullet = re.search(r"^- Without a namespace, (.*?)\n(?=- |\n)", text, re.M | re.S)
    assert bullet, "docs/deployment.md says what replaces ~yc:* &yc:* without a namespace"
    spans = " ".join(re.findall(r"`([^`]*)`", bullet.group(1))).split()
    assert [r for r in spans if not r.startswith(("~yc:", "&yc:"))] == list(NO_NAMESPACE_PATTERNS)


async def _ask(cache: ResponseCache, calls: list[str], key: str) -> CacheStatus:
    async with cache.session("org/a", key) as s:
        if s.body is not None:
            return s.status
        calls.append(key)
        await asyncio.sleep(0.3)
        await s.commit(json.dumps({"choices": [{"text": "Paris"}]}).encode())
        return s.status


def test_yichui_runs_as_the_acl_user(
    secure: SecureRedis, certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model status, tasks (enqueue, claim, finish), API keys, the audit log and the response
    cache with coalescing, as ``yichui`` with the documented ACL (and over TLS)."""
    _clean_env(monkeypatch)
    settings = _settings(tmp_path, secure, certs)
    make_model(settings.models_path, "org/a")
    rt = Runtime(settings)
    try:
        _, target = rt.redis()  # the eviction check (INFO memory) as that user
        with secure.admin() as admin:
            admin.acl_log_reset()
            names = [(c["name"], c["user"]) for c in admin.client_list()]
        assert ("yichui", "yichui") in names
        assert target.tls is bool(secure.tls)
        first = rt.registry.status("org/a")
        assert first.status.exists and not first.degraded
        again = rt.registry.status("org/a")
        assert again.cached and not again.degraded
        assert rt.registry.listing().models  # the index and listing scripts

        task = rt.tasks.submit("selftest", {"steps": 2, "step_seconds": 0.01})
        rt.worker(burst=True).run()
        done = rt.tasks.get(task["id"])
        assert done["state"] == "succeeded", done
        assert [e.kind for e in rt.tasks.tail(task["id"], 50)][-1] == "state"
        _no_secret(json.dumps(done, default=str))

        rt.key_store.create("team-a", "user", name="ci")
        assert rt.key_store.listing()
        rt.audit.record(Principal("local", "admin", None, "cli"), "keys.create", "ci")
        assert rt.audit.entries()
    finally:
        rt.close()

    async def cache_side() -> None:
        made = []
        for _ in range(2):  # two caches, their own connections: two server processes
            client = make_async_client(target, settings)
            cache = ResponseCache(ResponseStore(client, rt.keys), ttl_for=lambda m: 60, timeout=1.0)
            await cache.start()
            made.append((cache, client))
        try:
            await asyncio.sleep(0.1)  # subscriptions in place
            calls: list[str] = []
            statuses = await asyncio.gather(*(_ask(made[i % 2][0], calls, "k1") for i in range(6)))
            assert calls == ["k1"]
            assert sorted(statuses) == sorted([CacheStatus.MISS] + [CacheStatus.COALESCED] * 5), (
                statuses
            )
            assert await _ask(made[0][0], calls, "k1") == CacheStatus.HIT
            assert made[0][0].counts["faults"] == 0 and made[1][0].counts["faults"] == 0
            assert await made[0][0].clear() == 1  # SCAN MATCH over the namespace
        finally:
            for cache, client in made:
                await cache.close()
                await client.aclose()

    asyncio.run(cache_side())
    with secure.admin() as admin:  # nothing was denied; everything is inside its namespace
        assert admin.acl_log() == []
        assert all(k.startswith(f"{NAMESPACE}:".encode()) for k in admin.keys("*"))


async def test_no_secret_in_logs_answers_records_or_metrics(
    secure: SecureRedis,
    certs: Certs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The password of redis_url (and the admin's) appears in no log line at DEBUG, no API
    answer (health, Redis and fleet views, tasks and their logs, cache stats), no task record
    and not in /metrics; nor in what `yichui redis status` and `yichui doctor` print."""
    from yichui.api.app import create_app

    _clean_env(monkeypatch)
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, secure, certs, extensions=["tests.extensions.echo_engine"])
    rt = Runtime(settings, role="api")
    app = create_app(settings, runtime=rt)
    texts: list[str] = []
    try:
        async with _api(app) as client:
            task = (await client.post("/api/tasks", json={"type": "noop", "args": {}})).json()
            await asyncio.to_thread(Runtime(settings, role="worker").worker(burst=True).run)
            for _ in range(2):
                assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            for path in (
                "/health",
                "/metrics",
                "/api/redis",
                "/api/workers",
                "/api/servers",
                "/api/overview",
                "/api/cache/stats",
                "/api/tasks",
                f"/api/tasks/{task['id']}",
                f"/api/tasks/{task['id']}/logs",
            ):
                response = await client.get(path)
                assert response.status_code == 200, (path, response.text)
                texts.append(response.text)
        assert "yichui_redis" in texts[1]  # /metrics read the server's INFO as that user
        assert '"succeeded"' in texts[-2]
        with secure.admin() as admin:  # the task's record as it lies in Redis
            texts += [repr(admin.hgetall(k)) for k in admin.scan_iter("*task_status*")]
    finally:
        rt.close()
    env = _env(settings)
    for args in (("redis", "status"), ("doctor",)):
        proc = run(settings, *args, redis_url=str(settings.redis_url), **env)
        texts += [proc.stdout, proc.stderr]
    texts.append("\n".join(r.getMessage() for r in caplog.records))
    assert len(caplog.records) > 10
    assert any("127.0.0.1" in t for t in texts[-3:-1])  # the URL is shown, masked
    _no_secret(*texts)


# -- bad input: one line, exit 2, no secret ----------------------------------------------------


def _bad_urls(secure: SecureRedis) -> dict[str, tuple[str, str]]:
    plain = secure.url().replace("rediss://", "redis://")
    cases = {
        "wrong password": (secure.url(password="not-the-" + YICHUI_PASSWORD), "authentication"),
        "unknown user": (secure.url(user="nobody"), "authentication"),
    }
    if secure.tls:
        cases["plain client to the TLS port"] = (plain, "closed the connection")
    return cases


def test_bad_credentials_and_tls_mismatch_are_one_line(
    secure: SecureRedis, certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    settings = _settings(tmp_path, secure, certs)
    cases = _bad_urls(secure)
    if secure.tls:  # the server's certificate checked against a CA that did not sign it
        wrong_ca = {**_env(settings), "YICHUI_REDIS_SSL_CA_CERTS": str(certs.other_ca)}
        proc = run(settings, "tasks", "submit", "noop", **wrong_ca)
        assert_one_line_error(proc, 2, "TLS certificate is not trusted")
        assert "redis_ssl_ca_certs" in proc.stderr
        _no_secret(proc.stderr, proc.stdout)
    for what, (url, text) in cases.items():
        proc = run(settings, "tasks", "submit", "noop", redis_url=url, **_env(settings))
        assert_one_line_error(proc, 2, text)
        assert "hint:" in proc.stderr, what
        _no_secret(proc.stderr, proc.stdout)
        worker = run(settings, "worker", "--burst", redis_url=url, **_env(settings))
        assert_one_line_error(worker, 2, text)
        _no_secret(worker.stderr, worker.stdout)


def test_a_user_without_a_needed_command_is_told_which(
    secure: SecureRedis, certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clean_env(monkeypatch)
    with secure.admin() as admin:
        admin.acl_setuser(
            "blind",
            enabled=True,
            passwords=[f"+{YICHUI_PASSWORD}"],
            keys=["yc:*"],
            commands=["+ping", "+hello", "+client|setname"],
        )
    settings = _settings(tmp_path, secure, certs, redis_url=secure.url(user="blind"))
    with pytest.raises(RedisSetupError) as info:
        Runtime(settings).redis()
    assert "lacks a permission" in str(info.value) and "info" in str(info.value).lower()
    assert info.value.exit_code == 2
    _no_secret(str(info.value), str(info.value.hint))


async def test_a_cache_refused_by_the_acl_says_so_once(
    secure: SecureRedis, certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A command the cache's user may not run is no passing fault: it is logged as a warning
    naming it and the fix, once, while every request goes on uncached."""
    rules = [r for r in YICHUI_ACL if r != "+get"]
    with secure.admin() as admin:
        admin.execute_command("ACL", "SETUSER", "no-get", "reset", *rules)
    settings = _settings(tmp_path, secure, certs, redis_url=secure.url(user="no-get"))
    client = make_async_client(Runtime(settings).cache_target(), settings)
    cache = ResponseCache(ResponseStore(client, Keys(NAMESPACE)), ttl_for=lambda m: 60, timeout=1.0)
    caplog.set_level(logging.DEBUG, logger="yichui.cache")
    try:
        for _ in range(2):
            assert await cache.lookup("m", "k") == (None, False)  # uncached, not an error
            cache.breaker.success()  # ask Redis again, not the open breaker
    finally:
        await client.aclose()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "'get'" in warned[0] and "docs/deployment.md" in warned[0]
    _no_secret(*warned)


# -- eviction ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evicting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("evicting")).start(
        "--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lfu"
    )
    yield server
    server.stop()


@pytest.mark.parametrize("policy", ["allkeys-lfu", "volatile-lru"])
def test_an_evicting_state_instance_is_refused(
    evicting: RedisProcess, settings: Settings, policy: str
) -> None:
    with evicting.client() as c:
        c.config_set("maxmemory-policy", policy)
    try:
        for args in (("tasks", "submit", "noop"), ("worker", "--burst"), ("models", "rescan")):
            proc = run(settings, *args, redis_url=evicting.url)
            assert_one_line_error(proc, 2, f"maxmemory-policy is {policy}")
            assert "noeviction" in proc.stderr
        with pytest.raises(RedisSetupError):
            Runtime(settings.model_copy(update={"redis_url": evicting.url})).redis()
    finally:
        with evicting.client() as c:
            c.config_set("maxmemory-policy", "allkeys-lfu")


def test_noeviction_state_beside_an_evicting_cache(
    evicting: RedisProcess, settings: Settings
) -> None:
    """The cache on its own ``allkeys-lfu`` instance is allowed: tasks run, cache entries go
    when memory is short and the next request computes the answer again."""
    s = settings.model_copy(update={"cache_redis_url": evicting.url})
    rt = Runtime(s)
    try:
        task = rt.tasks.submit("noop", {})
        rt.worker(burst=True).run()
        assert rt.tasks.get(task["id"])["state"] == "succeeded"
    finally:
        rt.close()

    async def fill() -> None:
        client = make_async_client(rt.cache_target(), s)
        cache = ResponseCache(ResponseStore(client, rt.keys), ttl_for=lambda m: 600, timeout=1.0)
        try:
            body = b"x" * 200_000
            for i in range(120):  # 24 MB of answers into 8 MB
                async with cache.session("org/a", f"k{i}") as session:
                    assert session.body is None
                    await session.commit(body)
            with evicting.client() as c:  # evicting, never refusing (a fault may be a
                assert "errorstat_OOM" not in c.info("errorstats")  # slow call under load)
            assert await cache.store.get("org/a", "k0") is None  # type: ignore[union-attr]
            cache.near.drop_model(None)
            async with cache.session("org/a", "k0") as session:  # evicted: computed again
                assert session.body is None and session.status == CacheStatus.MISS
                await session.commit(body)
        finally:
            await cache.close()
            await client.aclose()

    asyncio.run(fill())
    with evicting.client() as c:
        assert int(c.info("stats")["evicted_keys"]) > 0


# -- a full Redis, the largest cached answer ------------------------------------------------------


@pytest.fixture
def full(tmp_path: Path) -> Iterator[RedisProcess]:
    """A noeviction instance filled to its maxmemory: every write is refused (OOM)."""
    server = RedisProcess(tmp_path / "full").start()
    with server.client() as c:  # 2 MB of ballast over a 1 MB limit: no room left at all
        c.set("ballast", b"x" * 2_000_000)
        c.config_set("maxmemory", "1mb")
    yield server
    server.stop()


def test_a_full_redis_serves_uncached_and_shows_in_metrics(
    full: RedisProcess, settings: Settings
) -> None:
    s = settings.model_copy(update={"redis_url": full.url})
    rt = Runtime(s)

    async def serve_one() -> None:
        client = make_async_client(rt.cache_target(), s)
        cache = ResponseCache(ResponseStore(client, rt.keys), ttl_for=lambda m: 60, timeout=1.0)
        try:
            async with cache.session("org/a", "k-full") as session:
                assert session.body is None  # computed, answered; not stored
                await session.commit(b'{"choices": []}')
            assert cache.counts["faults"] >= 1 and cache.counts["stored"] == 0
        finally:
            await cache.close()
            await client.aclose()

    try:
        asyncio.run(serve_one())
        text = rt.metrics.exposition(rt.probe().read()).decode()
        match = re.search(
            r'yichui_redis_oom_errors_total\{redis="state",scope="cluster"\} (\S+)', text
        )
        assert match and float(match.group(1)) >= 2, text
    finally:
        rt.close()


def test_enqueue_into_a_full_redis_fails_loudly_and_writes_nothing(
    full: RedisProcess, settings: Settings
) -> None:
    """The ENQUEUE script's first write is one Redis refuses under OOM: nothing half-written
    (a task status without its queue entry), the caller told why."""
    rt = Runtime(settings.model_copy(update={"redis_url": full.url}))
    try:
        with full.client() as c:
            before = c.dbsize()
        with pytest.raises(RedisFullError, match="out of memory"):
            rt.tasks.submit("noop", {}, task_id="t-full")
        with full.client() as c:
            assert c.dbsize() == before  # no status, log, index or stream entry
    finally:
        rt.close()


async def test_the_api_on_a_full_redis_refuses_tasks_with_503_and_serves_uncached(
    full: RedisProcess, settings: Settings
) -> None:
    from yichui.api.app import create_app

    s = settings.model_copy(
        update={
            "redis_url": full.url,
            "extensions": ["tests.extensions.echo_engine"],
            "cache_near_ttl": 0,
        }
    )
    rt = Runtime(s, role="api")
    app = create_app(s, runtime=rt)
    try:
        async with _api(app) as client:
            refused = await client.post("/api/tasks", json={"type": "noop", "args": {}})
            answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(2)]
            metrics = (await client.get("/metrics")).text
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert "out of memory" in error["message"] and "maxmemory" in error["message"]
        assert [a.status_code for a in answers] == [200, 200]
        assert [a.headers.get("x-yichui-cache") for a in answers] != ["miss", "hit"]
        assert answers[0].json()["choices"] == answers[1].json()["choices"]
        match = re.search(
            r'yichui_redis_oom_errors_total\{[^}]*redis="state"[^}]*\} (\S+)', metrics
        )
        assert match and float(match.group(1)) >= 1, metrics
    finally:
        rt.close()


async def test_a_larger_answer_than_cache_max_entry_bytes_is_served_not_stored(
    settings: Settings,
) -> None:
    from yichui.state.connection import parse_redis_url

    client = make_async_client(parse_redis_url(str(settings.redis_url)), settings)
    cache = ResponseCache(
        ResponseStore(client, Runtime(settings).keys), ttl_for=lambda m: 60, max_entry_bytes=1000
    )
    try:
        for key, size in (("small", 999), ("large", 1001)):
            async with cache.session("org/a", key) as session:
                assert session.body is None
                await session.commit(b"x" * size)
        assert await cache.store.get("org/a", "small") is not None  # type: ignore[union-attr]
        assert await cache.store.get("org/a", "large") is None  # type: ignore[union-attr]
        assert cache.counts["too_large"] == 1
        text = cache.metrics.exposition().decode()
        assert 'yichui_cache_too_large_total{endpoint="other",model="org/a"} 1.0' in text
    finally:
        await cache.close()
        await client.aclose()
