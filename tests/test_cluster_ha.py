"""Redis Cluster set-up errors (issue 16, item 2): a cluster URL on a plain server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.redis_proc import RedisProcess


def test_cluster_url_on_a_plain_server(tmp_path: Path) -> None:
    """One line naming the problem and the fix, exit code 2, before anything starts."""
    plain = RedisProcess(tmp_path / "plain").start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("YICHUI_")}
        env["YICHUI_REDIS_URL"] = f"redis+cluster://127.0.0.1:{plain.port}"
        env["YICHUI_DATA_DIR"] = str(tmp_path / "data")
        done = subprocess.run(
            [sys.executable, "-m", "yichui.cli.main", "tasks", "list"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        plain.stop()
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "not a Redis Cluster node" in lines[0]
    assert lines[1].startswith("hint: ") and "redis://host:port" in lines[1]
    assert "Traceback" not in done.stderr and len(lines) == 2
