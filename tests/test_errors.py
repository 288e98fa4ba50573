"""The one table of errors: every class of yichui's tree carries its HTTP status, and the API's
translation is a lookup (no guessing by type)."""

from __future__ import annotations

import inspect

import pytest

from yichui import errors
from yichui.api.errors import translate

TREE = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.YichuiError)
]


def test_every_error_is_in_the_drawn_tree_with_a_status() -> None:
    drawn = errors.__doc__ or ""
    for cls in TREE:
        assert cls.__name__ in drawn, f"{cls.__name__} is missing from the tree in errors.py"
        assert 400 <= cls.status < 600, cls


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.ModelNotFoundError("m"), 404, "model_not_found"),
        (errors.TaskNotFoundError("t1"), 404, None),
        (errors.InvalidModelNameError("../x", "unsafe"), 400, None),
        (errors.ModelKindError("an adapter, not a base", name="a"), 400, None),
        (errors.TaskConflictError("taken", task_id="t"), 409, None),
        (errors.RequestError("bad max-age", param="cache-control"), 400, None),
        (errors.AuthenticationError("invalid API key"), 401, "invalid_api_key"),
        (errors.RedisUnavailableError("redis://h", "refused"), 503, None),
        (errors.MissingExtraError("ml", "local inference"), 501, None),
        (errors.ModelLoadError("m", "no weights"), 500, None),
        (errors.UpstreamError("timed out", status=504), 504, None),
    ],
)
def test_the_status_is_the_classs(error: errors.YichuiError, status: int, code: str | None) -> None:
    got, body = translate(error)
    assert got == status
    assert body["error"]["code"] == code
    assert body["error"]["message"] == error.api_message


def test_a_foreign_exception_is_a_500_without_its_text() -> None:
    for exc in (ValueError("a torch bug"), KeyError("secret"), RuntimeError("x")):
        assert translate(exc) == (
            500,
            {
                "error": {
                    "message": "internal error",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
        )


def test_coalesced_errors_answer_as_the_leader_did() -> None:
    leader = errors.ModelNotFoundError("m")
    waiter = errors.CoalescedError(errors.describe_error(leader))
    assert translate(waiter) == translate(leader)
    passed = errors.UpstreamError("no", status=422, body={"error": {"message": "upstream's"}})
    assert translate(errors.CoalescedError(errors.describe_error(passed))) == translate(passed)
    assert translate(errors.CoalescedError(errors.describe_error(ValueError("secret"))))[0] == 500
