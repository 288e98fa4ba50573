"""The Hugging Face source: offline from a real SDK cache layout, online against a fake hub."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from yichui.config import load_settings
from yichui.errors import (
    MissingExtraError,
    ModelBusyError,
    SourceNotFoundError,
    SourceUnavailableError,
)
from yichui.models.sources.base import PullSpec
from yichui.models.sources.huggingface import HuggingFaceSource
from yichui.models.sources.modelscope import ModelScopeSource

pytest.importorskip("huggingface_hub")

from tests.hub_fixtures import (
    COMMIT,
    COMMIT2,
    FILES,
    REPO,
    FakeHub,
    closed_port,
    lose_the_lock,
    tree,
)

# -- Hugging Face cache layout -----------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("isolated_hub_env")


def make_hf_cache(
    cache: Path,
    repo: str = REPO,
    commit: str = COMMIT,
    files: dict[str, bytes] = FILES,
    refs: tuple[str, ...] = ("main",),
) -> Path:
    """``cache/models--org--name`` as huggingface_hub writes it: blobs, symlinks, refs."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = storage / "snapshots" / commit
    for rel, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)  # no newline, as the SDK writes it
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hf-cache"
    make_hf_cache(cache)
    return cache


@pytest.fixture
def hf(hf_cache: Path, tmp_path: Path) -> HuggingFaceSource:
    return HuggingFaceSource(cache_dir=hf_cache, download_cache=tmp_path / "data" / "hf-cache")


def test_hf_offline_fetch_links_every_file_and_returns_the_commit(
    hf: HuggingFaceSource, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    seen: list[tuple[int, int | None]] = []
    revision = hf.fetch(PullSpec(REPO), dest, lambda done, total: seen.append((done, total)))
    assert revision == COMMIT
    assert tree(dest) == FILES
    total = sum(len(b) for b in FILES.values())
    assert seen[-1] == (total, total)
    # hard-linked to the cache blob: no second copy of the weights
    weights = dest / "model.safetensors"
    assert not weights.is_symlink()
    assert hf.cache_dir is not None
    assert os.path.samefile(weights, next(hf.cache_dir.rglob("model.safetensors")))
    assert not any(p.name.startswith(".") for p in dest.iterdir())


def test_hf_offline_include_and_exclude(hf: HuggingFaceSource, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    spec = PullSpec(REPO, include=("*.json", "*.safetensors", "extra/"), exclude=("tok*",))
    assert hf.fetch(spec, dest) == COMMIT
    assert set(tree(dest)) == {"config.json", "model.safetensors", "extra/notes.txt"}


def test_hf_offline_revision_by_commit_and_by_tag(hf_cache: Path, tmp_path: Path) -> None:
    make_hf_cache(hf_cache, commit=COMMIT2, files={"config.json": b"{}"}, refs=("v2",))
    source = HuggingFaceSource(cache_dir=hf_cache)
    assert source.fetch(PullSpec(REPO, revision="v2"), tmp_path / "a") == COMMIT2
    assert tree(tmp_path / "a") == {"config.json": b"{}"}
    assert source.fetch(PullSpec(REPO, revision=COMMIT), tmp_path / "b") == COMMIT
    assert tree(tmp_path / "b") == FILES


def test_hf_offline_uncached_revision_is_not_found_with_a_hint(hf: HuggingFaceSource) -> None:
    with pytest.raises(SourceNotFoundError) as info:
        hf.plan(PullSpec(REPO, revision="v9"))
    err = info.value
    assert err.name == REPO and err.source == "huggingface"
    assert "offline" in err.message and "not in the local Hugging Face cache" in err.message
    assert "main (" + COMMIT[:12] in err.message  # what is cached instead
    assert err.hint and "HF_HUB_OFFLINE" in err.hint


@pytest.mark.parametrize("repo", ["acme/unknown", "nobody/tiny-llm", "a/b/c", "bad name"])
def test_hf_offline_unknown_or_invalid_repo_is_a_yichui_error(
    hf: HuggingFaceSource, tmp_path: Path, repo: str
) -> None:
    with pytest.raises(SourceNotFoundError) as info:
        hf.fetch(PullSpec(repo), tmp_path / "dest")
    assert info.value.name == repo
    assert info.value.__cause__ is not None  # the SDK's error, kept for debugging only
    assert not (tmp_path / "dest").exists()


def test_hf_offline_plan_lists_the_files_and_writes_nothing(
    hf: HuggingFaceSource, hf_cache: Path, tmp_path: Path
) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    plan = hf.plan(PullSpec(REPO, exclude=("README.md",)))
    assert plan.source == "huggingface" and plan.repo == REPO and plan.revision == COMMIT
    assert {f.path: f.size for f in plan.files} == {
        rel: len(data) for rel, data in FILES.items() if rel != "README.md"
    }
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_hf_offline_plan_with_no_matching_file_is_not_found(hf: HuggingFaceSource) -> None:
    with pytest.raises(SourceNotFoundError, match="no file matching"):
        hf.plan(PullSpec(REPO, include=("*.gguf",)))


def test_hf_offline_fetch_resumes_a_partial_destination(
    hf: HuggingFaceSource, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "config.json").write_bytes(FILES["config.json"])  # done before
    (dest / "model.safetensors").write_bytes(b"\x01" * 100)  # cut short
    (dest / "tokenizer.json.part").write_bytes(b'{"ver')  # an interrupted copy
    (dest / "README.md").write_bytes(b"# TINY\n")  # same size, other content
    assert hf.fetch(PullSpec(REPO), dest) == COMMIT
    assert tree(dest) == FILES
    assert not list(dest.rglob("*.part"))


def test_hf_offline_copies_when_it_cannot_link(
    hf: HuggingFaceSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model.safetensors.part").write_bytes(b"\x01" * 1000)  # resumed, not restarted
    assert hf.fetch(PullSpec(REPO), dest) == COMMIT
    assert tree(dest) == FILES
    assert (dest / "model.safetensors").stat().st_nlink == 1


def test_hf_offline_incomplete_snapshot_is_reported(hf_cache: Path, tmp_path: Path) -> None:
    # The SDK keeps the commit's file list next to the snapshot; with it, it can tell that a
    # file never made it into the cache.
    storage = hf_cache / ("models--" + REPO.replace("/", "--"))
    listing = {rel: {"size": len(data), "blob_id": "0" * 40} for rel, data in FILES.items()}
    listing["model-00002.safetensors"] = {"size": 10, "blob_id": "1" * 40}
    (storage / "trees").mkdir()
    (storage / "trees" / f"{COMMIT}.json").write_text(
        json.dumps({"format_version": 1, "files": listing})
    )
    with pytest.raises(SourceNotFoundError, match="incomplete"):
        HuggingFaceSource(cache_dir=hf_cache).fetch(PullSpec(REPO), tmp_path / "dest")
    # what was asked for is complete though
    source = HuggingFaceSource(cache_dir=hf_cache)
    assert source.fetch(PullSpec(REPO, include=("*.json",)), tmp_path / "d2") == COMMIT


def test_hf_progress_errors_propagate(hf: HuggingFaceSource, tmp_path: Path) -> None:
    def lost(done: int, total: int | None) -> None:
        raise ModelBusyError("lost the lock", name=REPO)

    with pytest.raises(ModelBusyError):
        hf.fetch(PullSpec(REPO), tmp_path / "dest", lost)


def test_hf_missing_sdk_is_a_missing_extra(
    hf: HuggingFaceSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingExtraError) as info:
        hf.fetch(PullSpec(REPO), tmp_path / "dest")
    assert info.value.extra == "hub"


def test_hf_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("YICHUI_"):
            monkeypatch.delenv(key)
    settings = load_settings(
        data_dir=tmp_path / "data", hf_endpoint="https://hf-mirror.example/", hf_token="hf_x"
    )
    source = HuggingFaceSource.from_settings(settings)
    assert source.name == "huggingface"
    assert source.endpoint == "https://hf-mirror.example"
    assert source.token == "hf_x"
    assert source.download_cache == tmp_path / "data" / "hf-cache"
    ms = ModelScopeSource.from_settings(
        load_settings(data_dir=tmp_path / "d", modelscope_token="t")
    )
    assert (ms.name, ms.token, ms.download_cache) == (
        "modelscope",
        "t",
        tmp_path / "d" / "ms-cache",
    )


@pytest.fixture
def hf_online(isolated_hub_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift HF_HUB_OFFLINE for one test (the SDK read it at import, so patch that too).

    Depends on ``isolated_hub_env`` so that it runs after it, not before."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.mark.usefixtures("hf_online")
def test_hf_online_fetch_plan_and_resume(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = HuggingFaceSource(
        endpoint=fake_hub.url, token="hf_test", download_cache=tmp_path / "data" / "hf-cache"
    )
    plan = source.plan(PullSpec(REPO, exclude=("README.md",)))
    assert plan.revision == COMMIT
    assert {f.path for f in plan.files} == set(FILES) - {"README.md"}
    assert plan.size == sum(len(d) for r, d in FILES.items() if r != "README.md")

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "config.json").write_bytes(b"stale")
    seen: list[tuple[int, int | None]] = []
    spec = PullSpec(REPO, revision="main", include=("*.json", "*.safetensors"))
    assert source.fetch(spec, dest, lambda d, t: seen.append((d, t))) == COMMIT
    assert tree(dest) == {r: d for r, d in FILES.items() if r.endswith((".json", ".safetensors"))}
    assert seen and seen[-1][1] == sum(len(FILES[r]) for r in tree(dest))
    downloads = [r for r in fake_hub.requests if r.startswith("GET /acme")]
    assert len(downloads) == 3  # config.json was stale: fetched again
    # a second pull finds everything in place: no file is downloaded again
    assert source.fetch(spec, dest) == COMMIT
    assert [r for r in fake_hub.requests if r.startswith("GET /acme")] == downloads
    # the user's own HF cache was neither read nor written
    assert not (tmp_path / "hf-cache").exists()


@pytest.mark.usefixtures("hf_online")
@pytest.mark.parametrize(
    ("repo", "revision", "words"),
    [("acme/unknown", None, "does not exist"), (REPO, "v9", "no revision 'v9'")],
)
def test_hf_online_unknown_repo_or_revision(
    fake_hub: FakeHub, tmp_path: Path, repo: str, revision: str | None, words: str
) -> None:
    source = HuggingFaceSource(endpoint=fake_hub.url)
    with pytest.raises(SourceNotFoundError, match=words):
        source.fetch(PullSpec(repo, revision=revision), tmp_path / "dest")


@pytest.mark.usefixtures("hf_online")
def test_hf_online_server_errors_are_unavailable(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.fail_downloads = True
    source = HuggingFaceSource(endpoint=fake_hub.url)
    with pytest.raises(SourceUnavailableError):
        source.fetch(PullSpec(REPO, include=("config.json",)), tmp_path / "dest")


@pytest.mark.usefixtures("hf_online")
def test_hf_unreachable_hub_falls_back_to_the_cache(hf_cache: Path, tmp_path: Path) -> None:
    source = HuggingFaceSource(endpoint=closed_port(), cache_dir=hf_cache)
    assert source.fetch(PullSpec(REPO), tmp_path / "dest") == COMMIT
    assert tree(tmp_path / "dest") == FILES
    assert source.plan(PullSpec(REPO)).revision == COMMIT
    with pytest.raises(SourceUnavailableError) as info:
        source.fetch(PullSpec("acme/unknown"), tmp_path / "d2")
    assert "cannot reach" in info.value.message and "not in the local" in info.value.message


@pytest.mark.usefixtures("hf_online")
def test_hf_online_progress_errors_stop_the_download(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = HuggingFaceSource(endpoint=fake_hub.url)
    with pytest.raises(ModelBusyError):
        source.fetch(PullSpec(REPO), tmp_path / "dest", lose_the_lock)
