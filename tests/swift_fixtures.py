"""The real ms-swift environment (``make swift``: ``.venv-swift``) for the tests that run it.

Found from ``YICHUI_SWIFT_PYTHON`` (read at import, before the ``settings`` fixture clears the
``YICHUI_`` variables) or the repo's ``.venv-swift``. Missing: those tests skip, except under
CI, where ``make test`` builds it and a missing one is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_FROM_ENV = os.environ.get("YICHUI_SWIFT_PYTHON")


def find_swift_python() -> Path | None:
    for candidate in (_FROM_ENV, ROOT / ".venv-swift" / "bin" / "python"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def swift_python() -> Path:
    """The interpreter of the ms-swift environment."""
    found = find_swift_python()
    if found is None:
        message = "no ms-swift environment: run `make swift`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found
