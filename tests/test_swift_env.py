"""The ms-swift environment: found through ``swift_python``, probed, reported by ``doctor``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_cli import run
from yichui.config import Settings
from yichui.errors import SwiftMissingError
from yichui.swift_env import TESTED, probe, swift_env


def test_the_real_environment_is_probed_through_its_interpreter(
    settings: Settings, swift_python: Path
) -> None:
    env = swift_env(settings.model_copy(update={"swift_python": swift_python}))
    assert env.python == swift_python
    assert env.swift_version in TESTED["ms-swift"]
    assert env.versions["evalscope"] in TESTED["evalscope"]
    assert env.untested() == []
    assert swift_env(settings.model_copy(update={"swift_python": swift_python}), needs="evalscope")


def test_without_ms_swift_one_clear_error_says_how_to_install_it(settings: Settings) -> None:
    here = settings.model_copy(update={"swift_python": Path(sys.executable)})  # no ms-swift
    with pytest.raises(SwiftMissingError, match="ms-swift is not installed in") as err:
        swift_env(here)
    assert err.value.hint and "make swift" in err.value.hint
    gone = settings.model_copy(update={"swift_python": Path("/nonexistent/python")})
    with pytest.raises(SwiftMissingError, match="does not exist"):
        swift_env(gone)


def test_a_broken_interpreter_is_named(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no python here' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(SwiftMissingError, match="no working Python: no python here"):
        probe(fake)


def test_doctor_reports_the_environment_and_warns_without_failing(
    settings: Settings, swift_python: Path
) -> None:
    proc = run(settings, "doctor", "--json", YICHUI_SWIFT_PYTHON=str(swift_python))
    report = json.loads(proc.stdout)
    check = next(c for c in report["checks"] if c["name"] == "ms-swift")
    assert check["ok"] is True and "ms-swift 4.6.0" in check["detail"], check
    assert str(swift_python) in check["detail"]
    proc = run(settings, "doctor", "--json", YICHUI_SWIFT_PYTHON=sys.executable)
    report = json.loads(proc.stdout)
    check = next(c for c in report["checks"] if c["name"] == "ms-swift")
    assert check["ok"] is False and check["required"] is False
    assert "make swift" in check["detail"] and report["ok"] is True


def test_an_untested_version_is_named() -> None:
    from yichui.swift_env import SwiftEnv

    env = SwiftEnv(Path("/x/python"), "3.11.7", {"ms-swift": "9.0.0", "evalscope": None})
    assert env.untested() == ["ms-swift 9.0.0"]


def test_make_swifts_environment_is_found_beside_yichuis(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from yichui.swift_env import find_python

    beside = tmp_path / ".venv-swift" / "bin" / "python"
    beside.parent.mkdir(parents=True)
    beside.write_text("")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / ".venv"))
    assert settings.swift_python is None
    assert find_python(settings) == beside  # make swift, then nothing to set
    named = settings.model_copy(update={"swift_python": Path(sys.executable)})
    assert find_python(named) == Path(sys.executable)  # the setting comes first
