from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yichui.errors import InvalidModelNameError
from yichui.models.names import model_dir, validate_name


@pytest.mark.parametrize(
    "name",
    ["smollm2-135m-instruct", "Qwen/Qwen2.5-7B-Instruct", "org_1/m.v2", "a", "A1/b-c_d.e"],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "../etc",
        "a/../b",
        "a/..",
        "/abs/path",
        "~/x",
        "a\\b",
        "a/b/c",
        "a//b",
        "a/",
        "/a",
        ".hidden",
        "a/.hidden",
        "a\x00b",
        "a\nb",
        "name with space",
        "base@adapter",
        "{tag}",
        "x" * 97,
        "trailing.",
        "a..b",
    ],
)
def test_unsafe_names_rejected(name: str) -> None:
    with pytest.raises(InvalidModelNameError):
        validate_name(name)


@given(st.text(max_size=120))
def test_any_accepted_name_stays_inside_the_root(name: str) -> None:
    root = Path("/models")
    try:
        folder = model_dir(root, name)
    except InvalidModelNameError:
        return
    # pure path arithmetic: accepted names never escape the root or hit a hidden folder
    assert folder.is_relative_to(root)
    rel = folder.relative_to(root).parts
    assert 1 <= len(rel) <= 2
    assert all(p not in ("", ".", "..") and not p.startswith(".") for p in rel)


def test_rejected_before_any_io(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelNameError):
        model_dir(tmp_path / "does-not-exist", "../../etc/passwd")
    assert not (tmp_path / "does-not-exist").exists()
