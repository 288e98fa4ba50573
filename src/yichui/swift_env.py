"""The ms-swift environment: which interpreter runs ms-swift (and EvalScope), and what it has.

ms-swift pins older transformers and huggingface_hub than yichui needs, so it usually lives in
an environment of its own (``make swift``: ``.venv-swift``) that the ``swift_python`` setting
names. Everything yichui reads from or runs with ms-swift goes through that interpreter: its
training (``python -m swift.cli.sft``), its server (``swift.cli.deploy``), its model registry
(:mod:`yichui.models.catalog`), EvalScope. Nothing of ms-swift is imported here.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yichui.config import Settings
from yichui.errors import SwiftMissingError

TESTED = {"ms-swift": ("4.6.0",), "evalscope": ("1.14.1",)}
"""The versions yichui's tests ran against (``make swift`` installs these)."""

INSTALL_HINT = (
    "run `make swift` (ms-swift 4.6.0 and EvalScope in .venv-swift, found beside .venv), or "
    "set YICHUI_SWIFT_PYTHON to the python of an environment that has them"
)

PROBE_TIMEOUT = 60.0

_PROBE = """
import importlib.metadata as m, json, sys
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
print(json.dumps({"python": sys.version.split()[0], "ms-swift": version("ms-swift"),
                  "evalscope": version("evalscope")}))
"""


@dataclass(frozen=True)
class SwiftEnv:
    python: Path
    """The interpreter."""
    python_version: str
    versions: dict[str, str | None]
    """``ms-swift`` and ``evalscope``: their installed versions (None: not installed)."""

    @property
    def swift_version(self) -> str | None:
        return self.versions.get("ms-swift")

    def untested(self) -> list[str]:
        """``name version`` of each installed package whose version the tests did not run."""
        return [
            f"{name} {v}"
            for name, v in self.versions.items()
            if v is not None and v not in TESTED.get(name, ())
        ]

    def module(self, name: str, *args: str) -> list[str]:
        """The command that runs ``python -m name args`` in this environment."""
        return [str(self.python), "-m", name, *args]

    def run_json(self, code: str, *args: str, timeout: float = 300.0) -> Any:
        """Run ``code`` (Python) there; -> the JSON object its last stdout line holds."""
        try:
            done = subprocess.run(
                [str(self.python), "-c", code, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SwiftMissingError(f"{self.python} did not answer within {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise SwiftMissingError(
                f"{self.python} failed: {_last_line(done.stderr) or f'exit {done.returncode}'}"
            )
        lines = done.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError) as exc:
            raise SwiftMissingError(f"{self.python} printed no JSON") from exc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


SIBLING = ".venv-swift"
"""Where ``make swift`` puts the environment: beside yichui's own ``.venv``."""


def find_python(settings: Settings) -> Path:
    """The interpreter of the ms-swift environment: the setting, else ``.venv-swift`` beside
    the environment yichui runs in (``make swift``), else the one a ``swift`` on PATH runs
    with, else this one (which may have ms-swift installed beside yichui)."""
    if settings.swift_python is not None:
        path = settings.swift_python.expanduser()
        if not path.exists():
            raise SwiftMissingError(f"swift_python {path} does not exist", hint=INSTALL_HINT)
        return path
    beside = Path(sys.prefix).parent / SIBLING / "bin" / "python"
    if beside.exists():
        return beside
    exe = shutil.which("swift")
    if exe is not None:
        shebang = _shebang(Path(exe))
        if shebang is not None and shebang.exists():
            return shebang
    return Path(sys.executable)


def _shebang(script: Path) -> Path | None:
    try:
        with open(script, "rb") as fh:
            first = fh.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode("utf-8", "replace").split()
    if not parts or Path(parts[0]).name == "env":  # `#!/usr/bin/env python`: not ours to guess
        return None
    return Path(parts[0])


@functools.lru_cache(maxsize=8)
def probe(python: Path) -> SwiftEnv:
    """What the interpreter has (run once per interpreter and process)."""
    try:
        done = subprocess.run(
            [str(python), "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SwiftMissingError(f"cannot run {python}: {exc}", hint=INSTALL_HINT) from exc
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        why = _last_line(done.stderr) or f"exit {done.returncode}"
        raise SwiftMissingError(f"{python} is no working Python: {why}", hint=INSTALL_HINT) from exc
    return SwiftEnv(
        python=python,
        python_version=str(found.pop("python")),
        versions={k: (str(v) if v else None) for k, v in found.items()},
    )


def swift_env(settings: Settings, *, needs: str = "ms-swift") -> SwiftEnv:
    """The ms-swift environment, which must have ``needs`` (``ms-swift`` or ``evalscope``)."""
    env = probe(find_python(settings))
    if env.versions.get(needs) is None:
        raise SwiftMissingError(f"{needs} is not installed in {env.python}", hint=INSTALL_HINT)
    return env
