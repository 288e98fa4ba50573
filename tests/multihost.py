"""Several simulated hosts on one machine, for tests/test_multiprocess.py and
tests/test_rolling_upgrade.py.

A host is a set of real processes (``yichui serve``, ``yichui worker``) with a data directory of
its own. What a multi-host deployment shares (docs/deployment.md, "Several API processes and
workers"): the Redis, and one folder standing for the NAS that holds the models root and the
mirror (the model lock is per model name for the whole Redis, so pulls on every host must see
one models root). Hosts share the loopback interface: no network namespaces.

``old_checkout`` puts an older commit of this repository beside the working tree (a git
worktree) so that its code can run against the same Redis as today's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_server import ServerProcess
from tests.suite_checks import in_ci
from tests.worker_proc import FAST, WorkerProcess, worker_env
from yichui.config import load_settings
from yichui.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]


def client_runtime(redis_url: str, data_dir: Path, nas: Path) -> Runtime:
    """The test's own Runtime beside the hosts: their Redis, the NAS's models root, the fast
    task settings of their workers."""
    return Runtime(
        load_settings(
            redis_url=redis_url,
            data_dir=data_dir,
            models_root=nas / "models",
            **{k.removeprefix("YICHUI_").lower(): v for k, v in FAST.items()},
        )
    )


class Host:
    """One simulated host: its own data dir; the shared NAS for models and the mirror::

    host = Host(tmp / "host-a", "a", redis_url, nas)
    host.worker("a1", "-n", "2"); host.server(upstreams={...}).start()
    host.kill()           # every process of the host, SIGKILL, as if it lost power
    """

    def __init__(
        self,
        workdir: Path,
        name: str,
        redis_url: str,
        nas: Path,
        *,
        pythonpath: Path | None = None,
        **env: str,
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.redis_url = redis_url
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.models_root = nas / "models"
        self.mirror_dir = nas / "mirror"
        self.pythonpath = pythonpath
        """``<old checkout>/src`` to run an older yichui with this interpreter; None: today's."""
        self.env = env
        self.workers: list[WorkerProcess] = []
        self.servers: list[ServerProcess] = []

    def _code_env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.pythonpath)} if self.pythonpath else {}

    def worker_env(self) -> dict[str, str]:
        return worker_env(
            self.redis_url,
            self.data_dir,
            YICHUI_MODELS_ROOT=str(self.models_root),
            YICHUI_MIRROR_DIR=str(self.mirror_dir),
            **self.env,
            **self._code_env(),
        )

    def worker(self, name: str, *args: str) -> WorkerProcess:
        """A started ``yichui worker --name NAME ARGS``."""
        w = WorkerProcess(self.worker_env(), name, self.workdir, *args).start()
        self.workers.append(w)
        return w

    def server(self, **settings: Any) -> ServerProcess:
        """A ``yichui serve`` of this host, not started yet (``.start()`` waits for /health)."""
        s = ServerProcess(
            self.workdir,
            redis_url=self.redis_url,
            models_root=str(self.models_root),
            mirror_dir=str(self.mirror_dir),
            cache_timeout=1.0,  # a loaded 2-core box must not turn Redis calls into faults
            **settings,
        )
        s.env.update(self._code_env())
        self.servers.append(s)
        return s

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``yichui ARGS`` run on this host (with its code and settings)."""
        return subprocess.run(
            [sys.executable, "-m", "yichui.cli.main", *args],
            env=self.worker_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def kill(self) -> None:
        """SIGKILL every process of the host (each one's whole session) and reap them."""
        procs = [p.proc for p in [*self.workers, *self.servers] if p.proc is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # each runs in a session of its own
        for proc in procs:
            proc.wait(10)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        for s in self.servers:
            s.stop()


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120
    )


def _unavailable(message: str) -> None:
    """In CI a missing old commit is a failure (CI runs on a full clone); elsewhere a skip."""
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@contextlib.contextmanager
def old_checkout(commit: str, where: Path) -> Iterator[Path]:
    """A detached git worktree of ``commit`` at ``where`` (removed at the end) -> its path."""
    if not (REPO / ".git").exists():
        _unavailable(f"{REPO} is not a git checkout: the rolling-upgrade test needs its history")
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        _unavailable(
            f"commit {commit} is not in {REPO} (a shallow clone?): the rolling-upgrade test "
            "runs it beside today's code; fetch the full history (git fetch --unshallow)"
        )
    added = _git("worktree", "add", "--detach", str(where), commit)
    if added.returncode != 0:
        raise RuntimeError(f"git worktree add failed: {added.stderr.strip()}")
    try:
        yield where
    finally:
        _git("worktree", "remove", "--force", str(where))
