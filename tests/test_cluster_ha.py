"""Redis Cluster set-up errors (issue 16, item 2): a cluster URL on a plain server."""

from __future__ import annotations

from pathlib import Path

from tests.redis_proc import RedisProcess
from tests.test_cli import run
from yichui.config import load_settings


def test_cluster_url_on_a_plain_server(tmp_path: Path) -> None:
    """One line naming the problem and the fix, exit code 2, before anything starts."""
    plain = RedisProcess(tmp_path / "plain").start()
    try:
        url = f"redis+cluster://127.0.0.1:{plain.port}"
        done = run(load_settings(data_dir=tmp_path / "data"), "tasks", "list", redis_url=url)
    finally:
        plain.stop()
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "not a Redis Cluster node" in lines[0]
    assert lines[1].startswith("hint: ") and "redis://host:port" in lines[1]
    assert "Traceback" not in done.stderr and len(lines) == 2
