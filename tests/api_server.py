"""A real ``yichui serve`` process for API tests, driven with the official ``openai`` client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.redis_proc import end_process, free_port


class ServerProcess:
    """``python -m yichui.cli.main serve`` on a free port with ``env`` settings::

    server = ServerProcess(tmp_path, redis_url=..., upstreams={...}).start()
    client = server.openai()
    """

    def __init__(
        self, workdir: Path, *, redis_url: str, args: tuple[str, ...] = (), **settings: Any
    ) -> None:
        self.workdir = workdir
        self.args = args
        self.port = free_port()
        self.log = workdir / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
        env.update(
            YICHUI_REDIS_URL=redis_url,
            YICHUI_DATA_DIR=str(workdir / "data"),
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        for key, value in settings.items():
            text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
            env[f"YICHUI_{key.upper()}"] = text
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[Any] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "yichui.cli.main",
                    "serve",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                    *self.args,
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"yichui serve exited:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"yichui serve did not start:\n{self.output()}")

    def openai(self, api_key: str = "none", **kwargs: Any) -> Any:
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)
        self._clients.append(client)  # closed by stop(): no socket left for the gc to find
        return client

    def forget_cached(self, redis_url: str) -> None:
        """Clear every server's near cache (what `yichui cache clear` publishes), for tests
        that flush Redis between them while the server keeps running."""
        import redis

        with redis.Redis.from_url(redis_url) as client:
            client.publish("response_events", b'{"clear": ""}')
        time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        end_process(self.proc, signal.SIGTERM)
        self.proc = None
