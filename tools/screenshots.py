"""The dashboard's screenshots (``docs/dashboard.md``, the README), taken by its browser tests.

    .venv/bin/python tools/screenshots.py docs/img     # or: make screenshots

Runs ``tests/test_dashboard.py`` with ``YICHUI_SCREENSHOTS=<dir>``: the tests save
``dashboard-{overview,tasks,task,training,playground,models}.png`` there at the moments they check
(a running task, a loss chart with its points, a cache hit), so a screenshot shows what a test
has just asserted. Exit status: pytest's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: screenshots.py DIR", file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "YICHUI_SCREENSHOTS": str(out)}
    test = ROOT / "tests" / "test_dashboard.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)]
    code = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    for shot in sorted(out.glob("dashboard-*.png")):
        print(shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
