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
