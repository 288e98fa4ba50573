"""Checks on a whole pytest run (a plugin; tests/conftest.py loads it).

* In CI (``CI=true``), a skipped test fails the run unless ``tests/allowed_skips.txt`` (the
  ``allowed_skips`` ini option) lists it: a skip there means a dependency or a service went
  missing, and the suite would pass without testing what it claims to.
* A ``subprocess.Popen`` nobody waited for, left at the end, fails the run: it is a process the
  tests leaked (or a zombie), and Python prints "ResourceWarning: subprocess … is still running"
  for it after pytest's summary, where no filter turns it into an error.
"""

from __future__ import annotations

import fnmatch
import gc
import os
import subprocess
from pathlib import Path

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def read_allowed_skips(path: Path) -> list[str]:
    """The node-id patterns of ``path`` (an exact id, or fnmatch's ``*`` and ``?``): one a
    line, then its reason; ``#`` lines are comments."""
    patterns = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, _, reason = line.partition(" ")
        if not reason.strip():
            raise pytest.UsageError(f"{path}:{number}: {pattern!r} needs a reason after it")
        patterns.append(pattern)
    return patterns


class SkipGuard:
    """Collects the skips of the run; at the end, fails it for each one not allow-listed."""

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = allowed
        self.unexpected: dict[str, str] = {}  # node id -> skip reason

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):  # an xfail is no skip
            return
        if any(report.nodeid == p or fnmatch.fnmatchcase(report.nodeid, p) for p in self.allowed):
            return
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        self.unexpected[report.nodeid] = reason.removeprefix("Skipped: ")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)  # a module-level skip

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unexpected and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.unexpected:
            return
        terminalreporter.section("skips not in tests/allowed_skips.txt (CI=true)", red=True)
        for nodeid, reason in self.unexpected.items():
            terminalreporter.line(f"{nodeid}: {reason}")


class LeakGuard:
    """At the end of the run, fails it for every Popen whose process was never waited for."""

    def __init__(self) -> None:
        self.leaked: list[str] = []

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        gc.collect()
        for obj in gc.get_objects():
            if isinstance(obj, subprocess.Popen) and obj.returncode is None:
                state = "running" if obj.poll() is None else "exited, never waited for"
                self.leaked.append(f"pid {obj.pid} ({state}): {obj.args!r}")
        if self.leaked and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.leaked:
            return
        terminalreporter.section("subprocesses left unwaited at the end of the run", red=True)
        for line in self.leaked:
            terminalreporter.line(line)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "allowed_skips",
        "file of the node-id patterns that may skip in CI (relative to the rootdir)",
        default="tests/allowed_skips.txt",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(LeakGuard(), "yichui-leak-guard")
    if in_ci():
        allowed = read_allowed_skips(config.rootpath / str(config.getini("allowed_skips")))
        config.pluginmanager.register(SkipGuard(allowed), "yichui-ci-skips")
