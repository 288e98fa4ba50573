"""Helpers of the training tests: a tiny model in the test's models root, datasets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_model import build_tiny_model
from yichui.runtime import Runtime
from yichui.training.service import TrainingService

BASE = "tiny"


def qa_records(n: int = 16) -> list[dict[str, Any]]:
    return [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(n)]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def trt(make_rt: Callable[..., Runtime]) -> Runtime:
    """A runtime with fast leases and the tiny model ``tiny`` in its models root."""
    rt = make_rt()
    build_tiny_model(rt.settings.models_path / BASE)
    return rt


@pytest.fixture
def training(trt: Runtime) -> TrainingService:
    return trt.training


@pytest.fixture
def qa_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", qa_records())


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2-135M-Instruct, converted from its GGUF once per test session."""
    from yichui.models.importer import bundled_gguf, convert_gguf

    folder = tmp_path_factory.mktemp("smollm2")
    convert_gguf(bundled_gguf(), folder)
    return folder
