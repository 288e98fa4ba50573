"""The ModelScope source: offline from real SDK cache layouts, online against a fake hub."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from yichui.errors import (
    MissingExtraError,
    ModelBusyError,
    SourceNotFoundError,
    SourceUnavailableError,
)
from yichui.models.sources.base import PullSpec
from yichui.models.sources.modelscope import ModelScopeSource

# The SDK's package by name, not imported: importing modelscope imports torch (seconds).
if importlib.util.find_spec("modelscope") is None:
    pytest.skip("the modelscope SDK (the 'hub' extra) is not installed", allow_module_level=True)

from tests.hub_fixtures import (
    FILES,
    REPO,
    FakeHub,
    closed_port,
    lose_the_lock,
    tree,
)

# modelscope >= 1.38 delegates to modelscope_hub: its cache layout (snapshots/<revision>), its
# probing of older layouts and its HTTP API (what the fake hub speaks). Older SDKs run the rest.
needs_modelscope_hub = pytest.mark.skipif(
    importlib.util.find_spec("modelscope_hub") is None,
    reason="needs modelscope >= 1.38 (modelscope_hub)",
)

# -- ModelScope cache layouts ------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("isolated_hub_env")


def make_ms_cache(cache: Path, repo: str = REPO, revision: str = "master") -> Path:
    """``cache/models/org--name/snapshots/<revision>``: modelscope >= 1.38 (modelscope_hub)."""
    snapshot = cache / "models" / repo.replace("/", "--") / "snapshots" / revision
    for rel, data in FILES.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).write_bytes(data)
    return snapshot


def make_legacy_ms_cache(cache: Path, repo: str, revision: str | None) -> Path:
    """``cache/hub/models/org/na___me``: older SDKs, with their metadata files."""
    owner, name = repo.split("/")
    folder = cache / "hub" / "models" / owner / name.replace(".", "___")
    for rel, data in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / ".msc").write_bytes(b"\x80\x04]\x94.")  # a pickle the SDK kept; never read here
    (folder / ".mdl").write_bytes(b"\x80\x04}\x94.")
    if revision:
        (folder / ".mv").write_text(f"Revision:{revision},CreatedAt:1700000000")
    (folder / "._____temp").mkdir()
    return folder


@pytest.fixture
def ms_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "ms-cache"
    make_ms_cache(cache)
    return cache


@pytest.fixture
def ms(ms_cache: Path) -> ModelScopeSource:
    return ModelScopeSource(cache_dir=ms_cache)


def test_ms_is_offline_when_hf_hub_offline_or_modelscope_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ModelScopeSource().is_offline()  # HF_HUB_OFFLINE=1
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not ModelScopeSource().is_offline()
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "true")
    assert ModelScopeSource().is_offline()
    assert not ModelScopeSource(offline=False).is_offline()


@needs_modelscope_hub
def test_ms_offline_fetch_and_filters(ms: ModelScopeSource, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    assert ms.fetch(PullSpec(REPO), tmp_path / "a", lambda d, t: seen.append((d, t))) == "master"
    assert tree(tmp_path / "a") == FILES
    assert seen[-1][0] == seen[-1][1] == sum(len(d) for d in FILES.values())
    spec = PullSpec(REPO, include=("*.json", "extra/"), exclude=("tokenizer*",))
    assert ms.fetch(spec, tmp_path / "b") == "master"
    assert set(tree(tmp_path / "b")) == {"config.json", "extra/notes.txt"}


@needs_modelscope_hub
def test_ms_offline_plan_writes_nothing(ms: ModelScopeSource, tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    plan = ms.plan(PullSpec(REPO, revision="master"))
    assert (plan.source, plan.revision) == ("modelscope", "master")
    assert {f.path: f.size for f in plan.files} == {r: len(d) for r, d in FILES.items()}
    assert sorted(tmp_path.rglob("*")) == before


@needs_modelscope_hub
def test_ms_offline_revision_not_cached(ms: ModelScopeSource, tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError) as info:
        ms.fetch(PullSpec(REPO, revision="v2"), tmp_path / "dest")
    assert "not in the local ModelScope cache" in info.value.message
    assert "master" in info.value.message  # the SDK lists what is cached
    assert info.value.hint and "MODELSCOPE_OFFLINE" in info.value.hint


@needs_modelscope_hub
@pytest.mark.parametrize("repo", ["acme/unknown", "a/b/c", "noslash"])
def test_ms_offline_unknown_repo(ms: ModelScopeSource, tmp_path: Path, repo: str) -> None:
    with pytest.raises(SourceNotFoundError):
        ms.fetch(PullSpec(repo), tmp_path / "dest")


@needs_modelscope_hub
def test_ms_offline_resumes(ms: ModelScopeSource, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(b"\x01" * 10)
    (dest / "config.json").write_bytes(FILES["config.json"])
    assert ms.fetch(PullSpec(REPO), dest) == "master"
    assert tree(dest) == FILES


@needs_modelscope_hub
def test_ms_offline_legacy_layout(tmp_path: Path) -> None:
    cache = tmp_path / "ms-cache"
    make_legacy_ms_cache(cache, "Qwen/Qwen2.5-0.5B", "v1.0.1")
    source = ModelScopeSource(cache_dir=cache)
    # the SDK's metadata (.msc, .mdl, .mv, the temp folder) stays behind
    assert source.fetch(PullSpec("Qwen/Qwen2.5-0.5B"), tmp_path / "a") == "v1.0.1"
    assert tree(tmp_path / "a") == FILES
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")) == []
    assert source.plan(PullSpec("Qwen/Qwen2.5-0.5B", revision="v1.0.1")).revision == "v1.0.1"
    with pytest.raises(SourceNotFoundError, match=re.escape("at revision v1.0.1, not 'v2'")):
        source.plan(PullSpec("Qwen/Qwen2.5-0.5B", revision="v2"))
    # an old cache without a .mv: the revision is unknown, so only an unpinned pull uses it
    make_legacy_ms_cache(cache, "acme/old", None)
    assert source.fetch(PullSpec("acme/old"), tmp_path / "b") is None
    with pytest.raises(SourceNotFoundError, match="revision unknown"):
        source.fetch(PullSpec("acme/old", revision="master"), tmp_path / "c")


def test_ms_missing_sdk_is_a_missing_extra(
    ms: ModelScopeSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "modelscope_hub.compat.snapshot_download", None)
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", None)
    with pytest.raises(MissingExtraError):
        ms.plan(PullSpec(REPO))


@pytest.fixture
def ms_fast_retries(isolated_hub_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """One attempt per listing page instead of four with back-off (seconds of sleeping)."""
    legacy_api = importlib.import_module("modelscope_hub._legacy_api")
    monkeypatch.setattr(legacy_api, "REPO_TREE_PAGE_MAX_ATTEMPTS", 1)
    download = importlib.import_module("modelscope_hub._download")
    monkeypatch.setattr(download, "DOWNLOAD_RETRY_TIMES", 0)


@needs_modelscope_hub
@pytest.mark.usefixtures("ms_fast_retries")
def test_ms_unreachable_hub_falls_back_to_the_cache(ms_cache: Path, tmp_path: Path) -> None:
    source = ModelScopeSource(cache_dir=ms_cache, endpoint=closed_port(), offline=False)
    assert source.fetch(PullSpec(REPO), tmp_path / "dest") == "master"
    assert tree(tmp_path / "dest") == FILES
    with pytest.raises(SourceUnavailableError, match="cannot reach"):
        source.plan(PullSpec("acme/unknown"))


@needs_modelscope_hub
@pytest.mark.usefixtures("ms_fast_retries")
def test_ms_online_fetch_plan_and_errors(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = ModelScopeSource(
        endpoint=fake_hub.url, download_cache=tmp_path / "data" / "ms-cache", offline=False
    )
    plan = source.plan(PullSpec(REPO))
    assert plan.revision == "master"
    assert {f.path: f.size for f in plan.files} == {r: len(d) for r, d in FILES.items()}

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model.safetensors.incomplete").write_bytes(b"\x01" * 1000)  # resumed
    seen: list[tuple[int, int | None]] = []
    spec = PullSpec(REPO, exclude=("README.md",))
    assert source.fetch(spec, dest, lambda d, t: seen.append((d, t))) == "master"
    assert tree(dest) == {r: d for r, d in FILES.items() if r != "README.md"}
    assert seen[-1] == (plan.size - len(FILES["README.md"]),) * 2
    weights = [r for r in fake_hub.requests if r.startswith("GET") and "model.safetensors" in r]
    assert len(weights) == 1 and weights[0].endswith("[bytes=1000-]")

    with pytest.raises(SourceNotFoundError):
        source.fetch(PullSpec("acme/unknown"), tmp_path / "d2")
    with pytest.raises(SourceNotFoundError):
        source.plan(PullSpec(REPO, revision="v9"))
    fake_hub.fail_downloads = True
    with pytest.raises(SourceUnavailableError, match="failed to download") as info:
        source.fetch(PullSpec(REPO), tmp_path / "d3")
    assert info.value.hint and "resumes" in info.value.hint


@needs_modelscope_hub
@pytest.mark.usefixtures("ms_fast_retries")
def test_ms_online_progress_errors_stop_the_download(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = ModelScopeSource(endpoint=fake_hub.url, offline=False)
    with pytest.raises(ModelBusyError):
        source.fetch(PullSpec(REPO), tmp_path / "dest", lose_the_lock)
