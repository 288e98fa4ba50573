"""Real ``yichui worker`` processes for fault tests (SIGKILL, SIGSTOP, SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.redis_proc import end_process

FAST = {
    "YICHUI_TASK_LEASE": "1.5",
    "YICHUI_TASK_HEARTBEAT": "0.25",
    "YICHUI_TASK_BACKOFF": "0.05",
    "YICHUI_TASK_BACKOFF_MAX": "0.2",
    "YICHUI_TASK_PROGRESS_INTERVAL": "0.05",
}
"""Short leases and heartbeats so recovery happens within seconds."""


def worker_env(redis_url: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
    env.update(FAST)
    env.update(
        {
            "YICHUI_REDIS_URL": redis_url,
            "YICHUI_DATA_DIR": str(data_dir),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


class WorkerProcess:
    """``python -m yichui.cli.main worker --name NAME`` with its output in ``log``::

    w = WorkerProcess(env, "A", tmp_path).start()
    w.signal(signal.SIGKILL)
    """

    def __init__(self, env: dict[str, str], name: str, workdir: Path, *args: str) -> None:
        self.env = env
        self.name = name
        self.args = args
        self.log = workdir / f"worker-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "yichui.cli.main",
                    "worker",
                    "--name",
                    self.name,
                    *self.args,
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGKILL late
        end_process(self.proc, signal.SIGKILL)
        self.proc = None
