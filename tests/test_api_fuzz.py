"""OpenAPI-driven fuzzing of the API (schemathesis): no input may cause a 5xx."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from tests.api_server import ServerProcess
from tests.fake_upstream import fake_upstream
from tests.redis_proc import RedisProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server(
    redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with fake_upstream() as upstream:
        proc = ServerProcess(
            tmp_path_factory.mktemp("fuzz"),
            redis_url=redis_server.url,
            upstreams={"echo": {"url": upstream.url, "accepts_images": True}},
            max_body_bytes=100_000,
        ).start()
        yield proc
        proc.stop()


def test_no_input_causes_a_server_error(fuzz_server: ServerProcess) -> None:
    """Every operation of /openapi.json, with inputs generated from its schema (valid and
    not): the answer is never a 5xx, and every error has OpenAI's shape."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "GET /v1/models",
    }
    # streams never end by themselves: a client reading one waits for events, not an answer
    streams = {"GET /api/events", "GET /api/tasks/{task_id}/logs/stream"}
    operations = [op for op in operations if op.label not in streams]
    assert any(op.label == "POST /api/tasks" for op in operations)
    calls: Counter[int] = Counter()
    for operation, mode in itertools.product(operations, list(GenerationMode)):
        # the OpenAI routes take the most varied input; the management routes' is plainer
        examples = 60 if operation.label.startswith(("POST /v1", "GET /v1")) else 12

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call(timeout=30)
            calls[response.status_code] += 1
            assert response.status_code < 500, (case.method, case.path, response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (an operation without inputs)
            assert mode == GenerationMode.NEGATIVE
    assert sum(calls.values()) >= 100 and any(code >= 400 for code in calls), calls
    assert calls[200] > 0, calls  # some inputs were valid enough to be answered
