"""Every exception yichui raises on purpose, in one tree, with the HTTP status the API answers
it with (``status``) and the exit code the CLI ends with (``exit_code``)::

    YichuiError                                       500
    ├── ConfigError (ValueError)                      500  bad settings or config file
    ├── MissingExtraError (ImportError)               501  an optional extra (ml, hub) is missing
    ├── RequestError                                  400  a request the API refuses (``param``,
    │   │                                                  ``code``; any 4xx as ``status``)
    │   ├── AuthenticationError                       401  no API key, or an unknown one
    │   ├── PermissionDeniedError                     403  the key's role may not do this
    │   └── NotFoundError (LookupError)               404  an unknown task, key, server, run
    ├── ClientError                                   502  `yichui chat`: the server failed us
    ├── StateError                                    503  the state layer (Redis)
    │   ├── RedisUnavailableError (ConnectionError)   503
    │   ├── RedisSetupError                           503  it answers but cannot be used as set
    │   │                                                  up (password, ACL, TLS, eviction):
    │   │                                                  exit code 2, a setting to fix
    │   ├── RedisFullError                            503  Redis is out of memory (maxmemory)
    │   ├── NotDurableError                           503  a write not replicated / synced in time
    │   └── EmbeddedRedisError                        503  the private redis-server failed
    ├── ModelError                                    500  anything about one model (``name``)
    │   ├── InvalidModelNameError (ValueError)        400
    │   ├── ModelNotFoundError (LookupError)          404
    │   ├── ModelKindError (ValueError)               400  base@adapter with the parts swapped
    │   ├── ModelBusyError (TimeoutError)             409  another process holds its lock
    │   ├── SourceError                               502  a hub, mirror or file we pull from
    │   │   ├── SourceNotFoundError (LookupError)     404
    │   │   └── SourceUnavailableError (ConnectionError) 503
    │   ├── DownloadError (OSError)                   500  disk full, permission denied
    │   └── ModelLoadError                            500  a model's files cannot be loaded
    ├── TaskError                                     500  the task engine (``task_id``)
    │   ├── UnknownTaskTypeError (ValueError)         400
    │   ├── InvalidTaskArgsError (ValueError)         400  arguments that do not fit the type
    │   ├── TaskNotFoundError (LookupError)           404  never queued, or expired
    │   ├── TaskConflictError (ValueError)            409  an id reused with other arguments
    │   ├── TaskStateError                            409  not allowed in the task's state
    │   └── TaskFailedError                           500  raised by task code to fail on purpose
    ├── TrainingError                                 400  fine-tuning, merging, evaluation
    │   └── DatasetError (ValueError)                 400  a JSONL dataset missing or malformed
    ├── SwiftMissingError                             501  ms-swift (or EvalScope) is not there
    └── InferenceError                                500  running a model
        ├── UpstreamError                         502/504  an upstream failed (``status`` and
        │                                                  ``body`` per instance; its 4xx as is)
        ├── CoalescedError                        (its)    the computation we waited for failed
        ├── EngineBusyError                           503  a local model's queue is full, or the
        │                                                  request waited too long (Retry-After)
        ├── ImagesNotAcceptedError (ValueError)       400  image parts for a text-only model
        └── ChatTemplateError (ValueError)            400  the chat template refused the messages

Each error carries structured fields and an optional ``hint`` telling the user what to do
next; the CLI and the API translate them once, at their edge (the API by looking up
``status``, ``code`` and ``param``: no ``isinstance`` chain). An exception that is not in this
tree is a bug: the API answers it with a generic 500 and logs it. ``retryable`` tells the task
engine whether running the same task again could succeed: bad input never will.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class YichuiError(Exception):
    """Root of every error yichui raises on purpose."""

    exit_code: int = 1
    status: int = 500
    """The HTTP status the API answers with."""
    code: str | None = None
    """OpenAI's machine-readable ``error.code`` (``model_not_found``, …)."""
    param: str | None = None
    """The request field at fault (``messages.0.content.1.image_url.url``), where known."""
    body: dict[str, Any] | None = None
    """An OpenAI error body the API answers with as it is (an upstream's own 4xx)."""
    retryable: bool = True
    """Whether a task that failed with this error is worth another attempt."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    @property
    def api_message(self) -> str:
        """The message an API client reads (the same as the CLI's, unless a class words it
        the way OpenAI's API does)."""
        return self.message

    def __str__(self) -> str:
        return self.message


class ConfigError(YichuiError, ValueError):
    """The settings or the config file are invalid."""

    exit_code = 2
    retryable = False


class MissingExtraError(YichuiError, ImportError):
    """An optional dependency group is needed but not installed."""

    status = 501

    def __init__(self, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the optional '{extra}' extra",
            hint=f"install it with: pip install 'yichui[{extra}]'",
        )
        self.extra = extra


class RequestError(YichuiError):
    """A request the API refuses, with its 4xx ``status``, the ``param`` at fault and a
    ``code``::

        raise RequestError("image data URL is not valid base64", param="messages.0.content.1")
    """

    exit_code = 2
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.param = param
        self.code = code


class AuthenticationError(RequestError):
    """No API key, or one nobody issued."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=401, code="invalid_api_key")


class PermissionDeniedError(RequestError):
    """An authenticated caller whose role (or tenant) may not do what it asked."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, status=403, code="permission_denied", hint=hint)


class NotFoundError(RequestError, LookupError):
    """Something a request names that does not exist (an API key, a training run, …)."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, status=404, code="not_found", hint=hint)


class ClientError(YichuiError):
    """A yichui server could not be reached or refused a request of the CLI."""

    status = 502


class StateError(YichuiError):
    """The state layer (Redis) failed."""

    status = 503


class RedisUnavailableError(StateError, ConnectionError):
    """Redis could not be reached (or timed out)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"Redis at {url} is unreachable: {reason}",
            hint="check YICHUI_REDIS_URL, or unset it to use the embedded Redis",
        )
        self.url = url
        self.reason = reason


class RedisSetupError(StateError):
    """A Redis that answers but cannot be used as configured: a wrong password or an unknown
    ACL user, a user without a command yichui needs, a TLS mismatch, or a state instance that
    may evict keys. Fixed in the settings or the server's configuration, never by retrying."""

    exit_code = 2
    retryable = False

    def __init__(self, url: str, problem: str, *, hint: str) -> None:
        super().__init__(f"Redis at {url}: {problem}", hint=hint)
        self.url = url
        self.problem = problem


class RedisFullError(StateError):
    """Redis refused a write because it reached ``maxmemory`` (``OOM command not allowed``)."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"Redis is out of memory (maxmemory reached): {what} refused",
            hint="free memory or raise maxmemory on the state instance (docs/deployment.md)",
        )


class NotDurableError(StateError):
    """A write Redis took but could not make as durable as ``task_durability`` asks within its
    timeout (too few replicas acknowledged it, or its AOF was not synced): it may still be
    lost on a failover."""

    def __init__(self, what: str, wanted: str, got: str) -> None:
        super().__init__(
            f"{what}: wanted {wanted}, got {got} in time",
            hint="check the replicas (INFO replication), or lower task_durability_replicas; "
            "submitting again with the same task id is safe",
        )
        self.wanted = wanted
        self.got = got


class EmbeddedRedisError(StateError):
    """The private redis-server under the data directory could not be started or stopped."""


class ModelError(YichuiError):
    """Something about one model."""

    def __init__(self, message: str, *, name: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.name = name


class InvalidModelNameError(ModelError, ValueError):
    """A model name that is malformed or unsafe to map onto the disk."""

    exit_code = 2
    status = 400
    retryable = False

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"invalid model name {name!r}: {reason}", name=name)
        self.reason = reason


class ModelNotFoundError(ModelError, LookupError):
    """No such model in the models root."""

    status = 404
    code = "model_not_found"
    param = "model"
    retryable = False

    def __init__(self, name: str) -> None:
        super().__init__(
            f"model {name!r} not found",
            name=name,
            hint="see `yichui models list`, or fetch it with `yichui models pull`",
        )

    @property
    def api_message(self) -> str:
        return f"The model '{self.name}' does not exist"


class ModelKindError(ModelError, ValueError):
    """A model used as what it is not: an adapter as a base model, or a full model after the
    ``@`` of ``base@adapter``."""

    exit_code = 2
    status = 400
    retryable = False


class ModelBusyError(ModelError, TimeoutError):
    """Another process kept the model's lock past our wait."""

    status = 409


class SourceError(ModelError):
    """A model source (hub, mirror folder, GGUF file) failed."""

    status = 502

    def __init__(self, message: str, *, name: str, source: str, hint: str | None = None) -> None:
        super().__init__(message, name=name, hint=hint)
        self.source = source


class SourceNotFoundError(SourceError, LookupError):
    """The source has no such repository, revision or file."""

    status = 404
    retryable = False


class SourceUnavailableError(SourceError, ConnectionError):
    """The source cannot be reached (offline, network down, SDK missing)."""

    status = 503


class DownloadError(ModelError, OSError):
    """A pull failed while writing: disk full, permission denied, interrupted."""


class TaskError(YichuiError):
    """Something about one task."""

    def __init__(self, message: str, *, task_id: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.task_id = task_id


class UnknownTaskTypeError(TaskError, ValueError):
    """No task type of that name is registered."""

    exit_code = 2
    status = 400
    retryable = False

    def __init__(self, type_: str, known: list[str]) -> None:
        super().__init__(
            f"unknown task type {type_!r}", hint=f"known types: {', '.join(sorted(known))}"
        )
        self.type = type_


class InvalidTaskArgsError(TaskError, ValueError):
    """The arguments do not fit the task type (checked before anything is queued)."""

    exit_code = 2
    status = 400
    retryable = False


class TaskNotFoundError(TaskError, LookupError):
    """No such task: never queued, or finished longer ago than ``task_ttl``."""

    status = 404

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"task {task_id!r} not found",
            task_id=task_id,
            hint="finished tasks are kept for task_ttl (2 h by default); see `yichui tasks list`",
        )


class TaskConflictError(TaskError, ValueError):
    """A client-supplied id is already taken by a task of another type or arguments."""

    exit_code = 2
    status = 409
    retryable = False


class TaskStateError(TaskError):
    """The operation is not allowed in the task's current state."""

    status = 409


class TaskFailedError(TaskError):
    """Raised by task code to fail with a message; ``retryable=False`` skips the retries."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class TrainingError(YichuiError):
    """Fine-tuning, merging or evaluation cannot go on (QLoRA without a GPU, a bad adapter)."""

    status = 400
    retryable = False


class DatasetError(TrainingError, ValueError):
    """A dataset file is missing, empty, not JSONL, or has a record of the wrong shape.

    ``line`` is the 1-based line of the first bad record (None for the file as a whole)."""

    exit_code = 2

    def __init__(self, problem: str, *, path: object, line: int | None = None) -> None:
        where = f"dataset {str(path)!r}" + (f", line {line}" if line is not None else "")
        super().__init__(f"{where}: {problem}", hint=_DATASET_HINT)
        self.path = str(path)
        self.line = line
        self.problem = problem


_DATASET_HINT = "see docs/training.md#datasets for the record shapes"


class SwiftMissingError(YichuiError):
    """The ms-swift environment (``swift_python``) is missing, broken or lacks a package."""

    status = 501
    retryable = False


class InferenceError(YichuiError):
    """Running a model failed."""


class UpstreamError(InferenceError):
    """An upstream did not give a whole, well-formed answer.

    ``status`` is the HTTP status to answer with: 502 (unreachable or a bad reply), 504 (timed
    out) or the upstream's own 4xx. ``body`` is the upstream's OpenAI error body (``{"error":
    {...}}``), set only when that 4xx is passed through: the API answers with it as is.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        body: dict[str, Any] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.body = body
        self.retryable = status >= 500


class CoalescedError(InferenceError):
    """The computation this request waited for (another request's, in this process or
    another) failed. ``error`` is what it failed with: its ``status``, the OpenAI error ``body``
    and a ``message``; the waiter answers with that same status and body."""

    def __init__(self, error: Mapping[str, Any] | None) -> None:
        self.error: dict[str, Any] = dict(error or {})
        super().__init__(str(self.error.get("message") or "the computation failed"))
        self.status = int(self.error.get("status") or 502)
        self.param = self.error.get("param")
        self.code = self.error.get("code")
        self.retryable = self.status >= 500
        body = self.error.get("body")
        self.body = body if isinstance(body, dict) and "error" in body else None


class EngineBusyError(InferenceError):
    """A local model cannot take the request now: its queue holds ``batch_queue_max``
    requests already, or the request waited ``batch_queue_timeout`` seconds without starting.
    Answered 503 with ``Retry-After: retry_after`` (seconds); nothing was computed."""

    status = 503
    code = "engine_busy"
    retryable = True

    def __init__(self, model: str, reason: str, *, retry_after: int) -> None:
        super().__init__(
            f"model {model!r} is busy: {reason}",
            hint="retry after a moment, or raise batch_queue_max / batch_queue_timeout",
        )
        self.model = model
        self.retry_after = retry_after


class ImagesNotAcceptedError(InferenceError, ValueError):
    """The request has image parts but the route's model does not take images."""

    exit_code = 2
    status = 400
    param = "messages"
    retryable = False

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} does not accept images",
            hint=f"set upstreams.{model}.accepts_images = true if the upstream model does",
        )
        self.model = model


class ModelLoadError(ModelError):
    """A model's files could not be loaded (broken config, missing weights, out of memory):
    answered 500 with its message, rather than a bare "internal error"."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"cannot load model {name!r}: {reason}",
            name=name,
            hint=f"check its files with `yichui models verify {name}`",
        )
        self.reason = reason


class ChatTemplateError(InferenceError, ValueError):
    """The model's chat template refused the messages (roles out of order, say): a bad
    request, answered 400."""

    exit_code = 2
    status = 400
    param = "messages"
    retryable = False

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"the chat template of model {model!r} refused the messages: {reason}")
        self.model = model


def describe_error(exc: BaseException) -> dict[str, Any]:
    """``exc`` as the API answers it, for passing it on (to requests that waited for the same
    answer, maybe in another process): ``status``, ``message``, ``param``, ``code`` and, where
    the error is answered with a body as it is, ``body``. An error that is not ours is
    described without its text (it may hold anything)."""
    if not isinstance(exc, YichuiError):
        return {"status": 500, "message": "internal error"}
    out: dict[str, Any] = {"status": exc.status, "message": exc.api_message}
    if exc.param is not None:
        out["param"] = exc.param
    if exc.code is not None:
        out["code"] = exc.code
    if exc.body is not None:
        out["body"] = exc.body
    return out


# -- the error body of the HTTP API (and of a worker's metrics port) ------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }
