"""The model registry on a real 3-node Redis Cluster (hash tags keep scripts in one slot)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_model
from tests.redis_proc import ClusterProcesses
from yichui.config import load_settings
from yichui.models.pull import pull_model
from yichui.models.sources.base import PullSpec
from yichui.models.sources.mirror import MirrorSource
from yichui.runtime import Runtime


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcesses]:
    procs = ClusterProcesses(tmp_path_factory.mktemp("cluster")).start()
    yield procs
    procs.stop()


def test_registry_on_cluster(cluster: ClusterProcesses, tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data",
        models_root=tmp_path / "models",
        redis_url=cluster.url,
        mirror_dir=tmp_path / "mirror",
        namespace="cl",
    )
    for i in range(12):  # names spread over every node's slots
        make_model(settings.models_path, f"org/m{i}")
    make_model(tmp_path / "mirror", "hub/pulled")
    runtime = Runtime(settings)
    try:
        registry = runtime.registry
        assert registry.store is not None and runtime.redis_error is None
        assert len(registry.listing().models) == 12
        assert registry.listing().cached
        assert registry.status("org/m3").cached
        assert not registry.status("org/none").status.exists
        result = pull_model(
            registry, MirrorSource(tmp_path / "mirror"), "hub/pulled", PullSpec("hub/pulled")
        )
        assert result.action == "installed"
        assert registry.status("hub/pulled").cached
        assert "hub/pulled" in [m["name"] for m in registry.listing().models]
        registry.remove("org/m0")
        assert not registry.status("org/m0").status.exists
        assert len(registry.listing().models) == 12
    finally:
        runtime.close()


def test_tasks_on_cluster(cluster: ClusterProcesses, tmp_path: Path) -> None:
    """Every task key shares the {tasks} slot: scripts, XACK and indexes work on a cluster."""
    settings = load_settings(
        data_dir=tmp_path / "data",
        redis_url=cluster.url,
        namespace="cl",
        task_heartbeat=0.1,
        task_lease=1.0,
        task_backoff=0.01,
    )
    runtime = Runtime(settings)
    try:
        svc = runtime.tasks
        ok = svc.submit("selftest", {"steps": 3, "step_seconds": 0.01})
        retried = svc.submit(
            "selftest", {"steps": 2, "step_seconds": 0, "fail_at": 1, "fail_attempts": 1}
        )
        cancelled = svc.submit("noop", {}, delay=60)
        assert svc.cancel(cancelled["id"])["state"] == "cancelled"
        stats = runtime.worker(burst=True, concurrency=2).run(install_signals=False)
        assert stats["succeeded"] == 2 and stats["retry"] == 1
        assert svc.get(ok["id"])["progress"]["step"] == 3
        assert svc.get(retried["id"])["attempt"] == 2
        assert [t["id"] for t in svc.listing(["cancelled"])] == [cancelled["id"]]
        assert svc.counts()["succeeded"] == 2
        lines = [e.data.get("line") for e in svc.tail(ok["id"], 50) if e.kind == "log"]
        assert "step 3/3" in lines
    finally:
        runtime.close()
