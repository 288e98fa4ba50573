"""tests/suite_checks.py on tiny runs of its own: CI skips against the allow-list, leaked Popens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

TESTS = """
import pytest

def test_runs():
    pass

def test_gpu():
    pytest.skip("no GPU here")

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    if n == 2:
        pytest.skip("two is not supported")

@pytest.mark.xfail(reason="known")
def test_known_bug():
    assert False
"""


IN_PROCESS = ("-p", "tests.suite_checks", "-p", "no:yichui-leak-guard")
"""The skip checks run in this process (a subprocess costs seconds); the leak guard, which
looks at every Popen of the process, is left out there: this run's are not theirs."""


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester whose runs load the plugin with the allow-list ``skips.txt``."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("CI", raising=False)
    pytester.makeini(
        "[pytest]\nallowed_skips = skips.txt\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_tiny=TESTS)
    return pytester


def run_in_ci(run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, skips: str) -> Any:
    """The tiny suite with ``CI=true`` and ``skips`` as the allow-list."""
    monkeypatch.setenv("CI", "true")
    run.path.joinpath("skips.txt").write_text(skips)
    return run.runpytest_inprocess(*IN_PROCESS)


def test_outside_ci_skips_pass(run: pytest.Pytester) -> None:
    result = run.runpytest_inprocess(*IN_PROCESS)
    result.assert_outcomes(passed=2, skipped=2, xfailed=1)
    assert result.ret == 0


def test_in_ci_a_skip_not_allowed_fails_the_run(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_in_ci(
        run, monkeypatch, "# comment\n\ntest_tiny.py::test_param[[]2]  two is out of scope\n"
    )
    result.assert_outcomes(passed=2, skipped=2, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*skips not in tests/allowed_skips.txt*", "test_tiny.py::test_gpu: no GPU here"]
    )
    assert "test_param" not in result.stdout.str().split("skips not in")[1]  # allowed
    assert "test_known_bug" not in result.stdout.str().split("skips not in")[1]  # an xfail


def test_in_ci_allowed_skips_pass(run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_in_ci(
        run,
        monkeypatch,
        "test_tiny.py::test_gpu  needs a CUDA GPU\ntest_tiny.py::test_param[2]  out of scope\n",
    )
    result.assert_outcomes(passed=2, skipped=2, xfailed=1)
    assert result.ret == 0


def test_in_ci_a_module_skip_counts_and_reasons_are_required(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    run.makepyfile(
        test_other="import pytest\npytest.skip('no SDK', allow_module_level=True)\n",
    )
    run.path.joinpath("skips.txt").write_text("test_tiny.py::*  all of it\n")
    result = run.runpytest_inprocess(*IN_PROCESS)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["test_other.py: no SDK"])

    run.path.joinpath("skips.txt").write_text("test_tiny.py::test_gpu\n")
    result = run.runpytest_inprocess(*IN_PROCESS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*skips.txt:1: 'test_tiny.py::test_gpu' needs a reason*"])


def test_a_popen_never_waited_for_fails_the_run(run: pytest.Pytester) -> None:
    run.makepyfile(
        test_leak="""
import subprocess, sys
KEPT = []

def test_leaks():
    KEPT.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"]))

def test_reaped():
    subprocess.Popen([sys.executable, "-c", "pass"]).wait()
"""
    )
    # in a fresh process: the guard looks at every Popen of its process
    result = run.runpytest_subprocess("-p", "tests.suite_checks", "test_leak.py")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*subprocesses left unwaited*", "pid * (running): *time.sleep(3)*"]
    )
