"""Shared by the hub source tests: a sample repo, SDK isolation, and a fake hub on 127.0.0.1
that speaks just enough of the Hugging Face and ModelScope APIs for a pull."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from yichui.errors import (
    ModelBusyError,
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


@pytest.fixture
def isolated_hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the SDKs away from the real caches, logins and endpoints of whoever runs this."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_TOKEN", "HF_ENDPOINT", "MODELSCOPE_ENDPOINT", "MODELSCOPE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-default-cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
    monkeypatch.delenv("MODELSCOPE_OFFLINE", raising=False)


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


def closed_port() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: "the hub is unreachable"."""
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as server:
        port = server.server_address[1]
    return f"http://127.0.0.1:{port}"


def lose_the_lock(done: int, total: int | None) -> None:
    raise ModelBusyError("lost the lock mid-download", name=REPO)
