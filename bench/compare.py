"""The hit path before and after a change: ``bench/cache.py`` run from an older commit and from
the working tree, alternately, in one session (these machines are shared and noisy).

For each configuration (the near cache on, and off with ``cache_near_ttl=0``) it runs the two
trees ``--runs`` times each, old first and new first in turn, and compares the medians of
``hit_rps`` (closed-loop hit throughput) and ``health_rps``. The old tree is a ``git worktree``
of ``--old`` (default ``HEAD~1``), run with its own ``src`` first on ``PYTHONPATH`` and this
venv::

    .venv/bin/python bench/compare.py --old 168edd6 [--runs 3] [--seconds 3]

The last line is one JSON object with every figure; ``hit_ratio_near_on`` and
``hit_ratio_near_off`` are new/old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICK = [
    "--rounds", "3", "--duration", "2", "--rate", "40", "--burst", "5",
    "--burst-rounds", "1", "--misses", "1", "--delay", "0.1",
]  # fmt: skip
"""Everything but the closed-loop hit window kept short: only hit_rps is compared."""


def run_bench(tree: Path, seconds: float, extra: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree}"}
    cmd = [sys.executable, str(tree / "bench" / "cache.py"), "--seconds", str(seconds)]
    out = subprocess.run(
        [*cmd, *QUICK, *extra], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"bench/cache.py failed in {tree}:\n{out.stdout[-2000:]}{out.stderr}")
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--old", default="HEAD~1", help="the commit to compare against")
    parser.add_argument("--runs", type=int, default=3, help="runs of each tree per config")
    parser.add_argument("--seconds", type=float, default=3.0, help="closed-loop window (s)")
    parser.add_argument(
        "--only", choices=("near_on", "near_off"), help="one configuration instead of both"
    )
    args = parser.parse_args()
    figures: dict[str, Any] = {"old": args.old}
    with tempfile.TemporaryDirectory(prefix="yichui-old-") as tmp:
        old = Path(tmp) / "old"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old), args.old],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            configs = (("near_on", []), ("near_off", ["--set", "cache_near_ttl=0"]))
            for label, extra in configs:
                if args.only and label != args.only:
                    continue
                got: dict[str, list[float]] = {"old": [], "new": []}
                health: dict[str, list[float]] = {"old": [], "new": []}
                for i in range(args.runs):
                    order = [("old", old), ("new", ROOT)]
                    for side, tree in order if i % 2 == 0 else order[::-1]:
                        f = run_bench(tree, args.seconds, extra)
                        got[side].append(f["hit_rps"])
                        health[side].append(f["health_rps"])
                        print(f"{label} {side}: hit {f['hit_rps']:.0f}/s", flush=True)
                for side in ("old", "new"):
                    figures[f"hit_rps_{label}_{side}"] = statistics.median(got[side])
                    figures[f"hit_rps_{label}_{side}_runs"] = got[side]
                    figures[f"health_rps_{label}_{side}"] = statistics.median(health[side])
                ratio = figures[f"hit_rps_{label}_new"] / figures[f"hit_rps_{label}_old"]
                figures[f"hit_ratio_{label}"] = round(ratio, 3)
                print(f"{label}: new/old hit throughput {ratio:.3f}", flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False
            )
    print(json.dumps(figures, separators=(", ", ": ")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
