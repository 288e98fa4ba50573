"""The Hugging Face and ModelScope sources, against real SDK cache layouts and a fake hub.

Offline tests build the caches the SDKs read (``models--org--name/{blobs,snapshots,refs}``
for Hugging Face, ``models/org--name/snapshots/<rev>`` and the older ``hub/models/org/name``
for ModelScope) under tmp_path. Online tests point the SDKs at a small HTTP server on
127.0.0.1 that speaks just enough of each hub's API. Nothing reaches the internet.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

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
needs_modelscope = pytest.mark.skipif(
    importlib.util.find_spec("modelscope_hub") is None, reason="modelscope_hub is not installed"
)

REPO = "acme/tiny-llm"
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"\x01" * 4096,
    "tokenizer.json": b'{"version": "1.0"}',
    "README.md": b"# tiny\n",
    "extra/notes.txt": b"notes",
}
COMMIT = hashlib.sha1(b"commit one").hexdigest()
COMMIT2 = hashlib.sha1(b"commit two").hexdigest()


def tree(folder: Path) -> dict[str, bytes]:
    """Visible files under ``folder`` and their bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


# -- Hugging Face cache layout -----------------------------------------------------------------


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


@pytest.fixture(autouse=True)
def _isolated_hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the SDKs away from the real caches, logins and endpoints of whoever runs this."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_TOKEN", "HF_ENDPOINT", "MODELSCOPE_ENDPOINT", "MODELSCOPE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-default-cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
    monkeypatch.delenv("MODELSCOPE_OFFLINE", raising=False)


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


# -- a fake hub on 127.0.0.1 -------------------------------------------------------------------


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    refs: dict[str, str] = field(default_factory=dict)


class FakeHub(ThreadingHTTPServer):
    """Serves the few endpoints of the Hugging Face and ModelScope APIs that a pull uses."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[str] = []
        self.fail_downloads = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _send(
        self,
        status: int,
        data: bytes = b"",
        headers: dict[str, str] | None = None,
        body: bool = True,
    ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(
            status,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        ranged = f" [{self.headers['Range']}]" if self.headers.get("Range") else ""
        self.server.requests.append(f"{self.command} {self.path}{ranged}")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
            return self._hf_info(m[1], m[2] or "main")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)/?", path):
            return self._hf_tree(m[1], m[2])
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._hf_file(m[1], m[2], m[3], body)
        if m := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo/files", path):
            return self._ms_files(m[1], query.get("Revision", ["master"])[0])
        if m := re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)/repo", path):
            return self._ms_file(m[1], query["Revision"][0], query["FilePath"][0], body)
        self._json(404, {"error": "no route"})

    def _repo(self, repo: str, revision: str) -> tuple[FakeRepo | None, str | None]:
        found = self.server.repos.get(repo)
        if found is None:
            return None, None
        commit = found.refs.get(revision) or (revision if revision in found.refs.values() else None)
        return found, commit

    def _hf_info(self, repo: str, revision: str) -> None:
        found, commit = self._repo(repo, revision)
        if found is None:
            return self._json(
                404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            )
        if commit is None:
            return self._json(404, {"error": "Invalid rev"}, {"X-Error-Code": "RevisionNotFound"})
        self._json(200, {"id": repo, "sha": commit, "siblings": []})

    def _hf_tree(self, repo: str, revision: str) -> None:
        found, commit = self._repo(repo, revision)
        if found is None or commit is None:
            return self._json(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})
        entries = [
            {"type": "file", "path": rel, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for rel, data in found.files.items()
        ]
        self._json(200, entries)

    def _hf_file(self, repo: str, revision: str, rel: str, body: bool) -> None:
        found, commit = self._repo(repo, revision)
        if found is None or commit is None or rel not in found.files:
            return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        data = found.files[rel]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        self._serve(data, headers, body)

    def _ms_files(self, repo: str, revision: str) -> None:
        found = self.server.repos.get(repo)
        if found is None or revision not in found.refs:
            return self._json(404, {"Code": 10010205001, "Message": f"{repo} not found"})
        files = [
            {"Path": rel, "Name": rel.rsplit("/", 1)[-1], "Size": len(data), "Type": "blob"}
            for rel, data in found.files.items()
        ]
        self._json(200, {"Code": 200, "Data": {"Files": files}, "Success": True})

    def _ms_file(self, repo: str, revision: str, rel: str, body: bool) -> None:
        found = self.server.repos.get(repo)
        if found is None or revision not in found.refs or rel not in found.files:
            return self._json(404, {"Code": 10010205001, "Message": "file not found"})
        self._serve(found.files[rel], {}, body)

    def _serve(self, data: bytes, headers: dict[str, str], body: bool) -> None:
        if self.server.fail_downloads and self.command == "GET":
            return self._send(503, b"down for maintenance", {"Retry-After": "0"})
        start = 0
        if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = int(m[1])
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, data[start:], {"Accept-Ranges": "bytes", **headers}, body)


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    hub.repos[REPO] = FakeRepo(dict(FILES), {"main": COMMIT, "master": COMMIT, "v2": COMMIT2})
    yield hub
    hub.shutdown()
    hub.server_close()


@pytest.fixture
def hf_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lift HF_HUB_OFFLINE for one test (the SDK read it at import, so patch that too)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def _closed_port() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: "the hub is unreachable"."""
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as server:
        port = server.server_address[1]
    return f"http://127.0.0.1:{port}"


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
    source = HuggingFaceSource(endpoint=_closed_port(), cache_dir=hf_cache)
    assert source.fetch(PullSpec(REPO), tmp_path / "dest") == COMMIT
    assert tree(tmp_path / "dest") == FILES
    assert source.plan(PullSpec(REPO)).revision == COMMIT
    with pytest.raises(SourceUnavailableError) as info:
        source.fetch(PullSpec("acme/unknown"), tmp_path / "d2")
    assert "cannot reach" in info.value.message and "not in the local" in info.value.message


# -- ModelScope cache layouts ------------------------------------------------------------------


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


@needs_modelscope
def test_ms_is_offline_when_hf_hub_offline_or_modelscope_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ModelScopeSource().is_offline()  # HF_HUB_OFFLINE=1
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not ModelScopeSource().is_offline()
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "true")
    assert ModelScopeSource().is_offline()
    assert not ModelScopeSource(offline=False).is_offline()


@needs_modelscope
def test_ms_offline_fetch_and_filters(ms: ModelScopeSource, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    assert ms.fetch(PullSpec(REPO), tmp_path / "a", lambda d, t: seen.append((d, t))) == "master"
    assert tree(tmp_path / "a") == FILES
    assert seen[-1][0] == seen[-1][1] == sum(len(d) for d in FILES.values())
    spec = PullSpec(REPO, include=("*.json", "extra/"), exclude=("tokenizer*",))
    assert ms.fetch(spec, tmp_path / "b") == "master"
    assert set(tree(tmp_path / "b")) == {"config.json", "extra/notes.txt"}


@needs_modelscope
def test_ms_offline_plan_writes_nothing(ms: ModelScopeSource, tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    plan = ms.plan(PullSpec(REPO, revision="master"))
    assert (plan.source, plan.revision) == ("modelscope", "master")
    assert {f.path: f.size for f in plan.files} == {r: len(d) for r, d in FILES.items()}
    assert sorted(tmp_path.rglob("*")) == before


@needs_modelscope
def test_ms_offline_revision_not_cached(ms: ModelScopeSource, tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError) as info:
        ms.fetch(PullSpec(REPO, revision="v2"), tmp_path / "dest")
    assert "not in the local ModelScope cache" in info.value.message
    assert "master" in info.value.message  # the SDK lists what is cached
    assert info.value.hint and "MODELSCOPE_OFFLINE" in info.value.hint


@needs_modelscope
@pytest.mark.parametrize("repo", ["acme/unknown", "a/b/c", "noslash"])
def test_ms_offline_unknown_repo(ms: ModelScopeSource, tmp_path: Path, repo: str) -> None:
    with pytest.raises(SourceNotFoundError):
        ms.fetch(PullSpec(repo), tmp_path / "dest")


@needs_modelscope
def test_ms_offline_resumes(ms: ModelScopeSource, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(b"\x01" * 10)
    (dest / "config.json").write_bytes(FILES["config.json"])
    assert ms.fetch(PullSpec(REPO), dest) == "master"
    assert tree(dest) == FILES


@needs_modelscope
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


@needs_modelscope
def test_ms_missing_sdk_is_a_missing_extra(
    ms: ModelScopeSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "modelscope_hub.compat.snapshot_download", None)
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", None)
    with pytest.raises(MissingExtraError):
        ms.plan(PullSpec(REPO))


@pytest.fixture
def ms_fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """One attempt per listing page instead of four with back-off (seconds of sleeping)."""
    legacy_api = pytest.importorskip("modelscope_hub._legacy_api")
    monkeypatch.setattr(legacy_api, "REPO_TREE_PAGE_MAX_ATTEMPTS", 1)
    download = pytest.importorskip("modelscope_hub._download")
    monkeypatch.setattr(download, "DOWNLOAD_RETRY_TIMES", 0)


@needs_modelscope
@pytest.mark.usefixtures("ms_fast_retries")
def test_ms_unreachable_hub_falls_back_to_the_cache(ms_cache: Path, tmp_path: Path) -> None:
    source = ModelScopeSource(cache_dir=ms_cache, endpoint=_closed_port(), offline=False)
    assert source.fetch(PullSpec(REPO), tmp_path / "dest") == "master"
    assert tree(tmp_path / "dest") == FILES
    with pytest.raises(SourceUnavailableError, match="cannot reach"):
        source.plan(PullSpec("acme/unknown"))


@needs_modelscope
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


def _lose_the_lock(done: int, total: int | None) -> None:
    raise ModelBusyError("lost the lock mid-download", name=REPO)


@needs_modelscope
@pytest.mark.usefixtures("ms_fast_retries")
def test_ms_online_progress_errors_stop_the_download(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = ModelScopeSource(endpoint=fake_hub.url, offline=False)
    with pytest.raises(ModelBusyError):
        source.fetch(PullSpec(REPO), tmp_path / "dest", _lose_the_lock)


@pytest.mark.usefixtures("hf_online")
def test_hf_online_progress_errors_stop_the_download(fake_hub: FakeHub, tmp_path: Path) -> None:
    source = HuggingFaceSource(endpoint=fake_hub.url)
    with pytest.raises(ModelBusyError):
        source.fetch(PullSpec(REPO), tmp_path / "dest", _lose_the_lock)
