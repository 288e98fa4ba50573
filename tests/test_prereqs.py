"""tools/prereqs.py: `make` says in one line what the machine lacks (Redis >= 7, python3-venv)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "prereqs.py"


def load_prereqs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prereqs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_redis_with(tmp_path: Path, output: str | None) -> subprocess.CompletedProcess[str]:
    """Run ``prereqs.py redis`` with PATH holding only a fake redis-server (or nothing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if output is not None:
        fake = bin_dir / "redis-server"
        fake.write_text(f"#!/bin/sh\necho '{output}'\n")
        fake.chmod(0o755)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "redis"],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_redis_version_parsing() -> None:
    parse = load_prereqs().redis_version
    assert parse("Redis server v=7.2.4 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64") == (7, 2, 4)
    assert parse("Redis server v=6.2.14 sha=00000000:0 malloc=libc bits=64") == (6, 2, 14)
    assert parse("Redis server v=8.0 sha=0") == (8, 0)
    assert parse("Redis server version 2.8.4 (00000000:0)") == (2, 8, 4)
    assert parse("redis-server: command not understood") is None


@pytest.mark.parametrize(
    ("output", "ok", "says"),
    [
        ("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64", True, ""),
        ("Redis server v=10.1.0 sha=00000000:0", True, ""),  # compared as numbers, not text
        ("Redis server v=6.2.14 sha=00000000:0 malloc=libc bits=64", False, "is 6.2.14"),
        ("something else", False, "cannot read the version"),
        (None, False, "found none"),
    ],
)
def test_redis_check(tmp_path: Path, output: str | None, ok: bool, says: str) -> None:
    proc = check_redis_with(tmp_path, output)
    if ok:
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    else:
        assert proc.returncode == 1
        assert proc.stderr.startswith("error: make test needs redis-server >= 7")
        assert says in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_venv_check_names_python3_venv(monkeypatch: pytest.MonkeyPatch) -> None:
    prereqs = load_prereqs()
    assert prereqs.check_venv() is None  # this interpreter made .venv
    real = importlib.util.find_spec
    monkeypatch.setattr(
        prereqs.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ensurepip" else real(name, *a),
    )
    problem = prereqs.check_venv()
    assert problem and "install python3-venv" in problem and "\n" not in problem


def test_make_checks_before_installing_or_testing() -> None:
    for target in ("test", "pytest", "quick"):
        # not the make running this suite's MAKEFLAGS/MAKELEVEL ("Entering directory" lines)
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        dry = subprocess.run(
            ["make", "-n", "--no-print-directory", target],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.splitlines()[0].endswith("tools/prereqs.py redis"), dry.stdout
