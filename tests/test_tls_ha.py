"""TLS beyond one server (issue 16): yichui on ``rediss+sentinel://`` (TLS to the Sentinels,
which have their own password, and to the master) and on ``rediss+cluster://`` (every node),
with the CA, client certificate and key of the ``redis_ssl_*`` settings: tasks, model status
and the response cache; yichui's own Sentinel watch and master-name check over TLS; a
failover; a wrong CA on a Sentinel URL said in one line."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import make_model
from tests.redis_proc import ClusterProcesses, wait_until
from tests.sentinel_fixtures import SentinelGroup, api_client, ask, failover_settings, until
from tests.test_cli import assert_one_line_error, run
from tests.tls_certs import Certs, make_certs, tls_directives
from yichui.config import Settings
from yichui.errors import RedisSetupError
from yichui.runtime import Runtime
from yichui.state.connection import parse_redis_url
from yichui.state.sentinel import SentinelWatch, check_master

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"

pytestmark = pytest.mark.usefixtures("clean_env")  # no YICHUI_* of the developer's


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _group(workdir: Path, certs: Certs) -> SentinelGroup:
    return SentinelGroup(
        workdir, password="masterpw", sentinel_password="sentinelpw", tls=certs
    ).start()


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[SentinelGroup]:
    """A master, a replica and three Sentinels, all TLS only, with passwords."""
    ha = _group(tmp_path_factory.mktemp("ha-tls"), certs)
    try:
        yield ha
    finally:
        ha.stop()


def _settings(tmp_path: Path, url: str, certs: Certs, **extra: Any) -> Settings:
    tls = {"redis_ssl_ca_certs": certs.ca, "redis_ssl_certfile": certs.client_cert,
           "redis_ssl_keyfile": certs.client_key}  # fmt: skip
    return failover_settings(tmp_path, url, **tls, **extra)


def _env(settings: Settings, **over: str) -> dict[str, str]:
    """The ``redis_ssl_*`` settings as the CLI's environment, with ``over`` changed."""
    names = ("ca_certs", "certfile", "keyfile")
    env = {f"YICHUI_REDIS_SSL_{n.upper()}": str(getattr(settings, f"redis_ssl_{n}")) for n in names}
    return {**env, **over}


async def _round(rt: Runtime, client: httpx.AsyncClient, prompt: str) -> None:
    """Three tasks run by a burst worker; ``prompt`` answered, stored, then a hit."""
    ids = [rt.tasks.submit("stamp", {"seconds": 0})["id"] for _ in range(3)]
    await asyncio.to_thread(rt.worker(burst=True).run)
    assert [rt.tasks.get(t)["state"] for t in ids] == ["succeeded"] * 3
    assert await ask(client, prompt) == (200, "miss")
    assert await ask(client, prompt) == (200, "hit")


def _watchers(group: SentinelGroup) -> list[int]:
    """How many of yichui's Sentinel watch connections each Sentinel has."""
    counts = []
    for sentinel in group.sentinels:
        with sentinel.client() as c:
            names = [x["name"] for x in c.client_list()]
        counts.append(names.count("yichui-sentinel-watch"))
    return counts


# -- Sentinel --------------------------------------------------------------------------------


def test_the_documented_tls_lines_are_the_tested_ones(certs: Certs) -> None:
    """docs/deployment.md's TLS row of the Sentinel settings is what the servers and the
    Sentinels here run (tests/tls_certs.py)."""
    row = next(line for line in DOCS.read_text().splitlines() if "| TLS only: `port 0`" in line)
    documented = [d.split() for d in re.findall(r"`([^`]*)`", row.split(" | ")[1])]
    tested = tls_directives(certs, 26379)
    assert [d[0] for d in documented] == [name for name, _ in tested]
    for words, (_, value) in zip(documented, tested, strict=True):
        assert len(words) == 1 or words[1].startswith("<") or words[1] == value


async def test_sentinel_over_tls(group: SentinelGroup, certs: Certs, tmp_path: Path) -> None:
    """Tasks and the response cache through TLS Sentinels to a TLS master; the API's own
    +switch-master watch holds a TLS connection to every Sentinel."""
    settings = _settings(tmp_path, group.url(db=1), certs)
    rt = Runtime(settings)
    try:
        assert rt.redis()[1].tls
        async with api_client(settings) as (client, _):
            await _round(rt, client, "over tls")
            # the API's AsyncSentinelWatch (on this loop: polled from a thread)
            await asyncio.to_thread(until, lambda: min(_watchers(group)) >= 1, 10.0)
    finally:
        rt.close()


def test_the_sentinel_watch_and_check_speak_tls(
    group: SentinelGroup, certs: Certs, tmp_path: Path
) -> None:
    """check_master asks the Sentinels over TLS, so a master name none monitors is refused
    (it was let through: no Sentinel could be asked); the worker's SentinelWatch subscribes on
    every Sentinel over TLS."""
    settings = _settings(tmp_path, group.url(), certs)
    target = parse_redis_url(group.url())
    check_master(target, settings)
    wrong = parse_redis_url(group.url().replace("/yc-ha/", "/no-such-master/"))
    with pytest.raises(RedisSetupError, match="no Sentinel monitors a master named"):
        check_master(wrong, settings)
    before = _watchers(group)
    watch = SentinelWatch(target, settings, on_switch=lambda host, port: None).start()
    try:
        wait_until(lambda: all(n > b for n, b in zip(_watchers(group), before, strict=True)))
    finally:
        watch.stop()


def test_a_wrong_ca_on_a_sentinel_url_is_one_line(
    group: SentinelGroup, certs: Certs, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, group.url(), certs)
    env = _env(settings, YICHUI_REDIS_SSL_CA_CERTS=str(certs.other_ca))
    proc = run(settings, "tasks", "list", redis_url=group.url(), **env)
    assert_one_line_error(proc, 2, "the server's TLS certificate is not trusted")
    assert "redis_ssl_ca_certs" in proc.stderr and "(the Sentinel at 127.0.0.1:" in proc.stderr
    assert len(proc.stderr) < 600, proc.stderr  # the reason, not redis-py's connection dump
    assert "masterpw" not in proc.stderr + proc.stdout
    assert "sentinelpw" not in proc.stderr + proc.stdout


@pytest.mark.slow
async def test_a_failover_over_tls(certs: Certs, tmp_path: Path) -> None:
    """SIGKILL the master: the Sentinels, over TLS, promote the replica; yichui's watch hears
    the +switch-master; tasks and cached answers (replicated before) work again."""
    ha = _group(tmp_path / "ha", certs)
    settings = _settings(tmp_path, ha.url(db=2), certs)
    heard: list[int] = []
    watch = SentinelWatch(
        parse_redis_url(ha.url()), settings, on_switch=lambda host, port: heard.append(port)
    )
    rt = Runtime(settings)
    try:
        async with api_client(settings) as (client, _):
            await _round(rt, client, "before")
            with ha.master().client() as c:
                assert c.execute_command("WAIT", 1, 2000) == 1
            switches = ha.listen()
            watch.start()
            await asyncio.to_thread(until, lambda: min(_watchers(ha)) >= 2, 10.0)  # API's, this
            ha.kill_master()
            await asyncio.to_thread(switches.wait)
            switches.stop()
            await asyncio.to_thread(until, lambda: bool(heard), 10.0)
            assert heard[0] == ha.master_port() != ha.killed.port  # type: ignore[union-attr]
            assert await ask(client, "before") == (200, "hit")  # it was replicated
            await _round(rt, client, "after")
    finally:
        watch.stop()
        rt.close()
        ha.stop()


# -- Cluster ---------------------------------------------------------------------------------


async def test_cluster_over_tls(certs: Certs, tmp_path: Path) -> None:
    """Three TLS-only masters (TLS cluster bus): tasks, model status, the response cache."""
    cluster = ClusterProcesses(tmp_path / "cluster", tls=certs).start()
    settings = _settings(tmp_path, cluster.url, certs)
    make_model(settings.models_path, "org/a")
    rt = Runtime(settings)
    try:
        assert cluster.url.startswith("rediss+cluster://") and rt.redis()[1].tls
        lookup = rt.registry.status("org/a")
        assert lookup.status.exists and not lookup.degraded
        async with api_client(settings) as (client, _):
            await _round(rt, client, "cluster over tls")
    finally:
        rt.close()
        cluster.stop()
