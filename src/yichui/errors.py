"""Every exception yichui raises on purpose, in one tree.

::

    YichuiError
    ├── ConfigError (ValueError)              bad settings or config file
    ├── MissingExtraError (ImportError)       an optional extra (ml, hub) is not installed
    ├── StateError                            the state layer (Redis)
    │   ├── RedisUnavailableError (ConnectionError)
    │   └── EmbeddedRedisError                the private redis-server could not start/stop
    ├── ModelError                            anything about one model (has ``name``)
    │   ├── InvalidModelNameError (ValueError)
    │   ├── ModelNotFoundError (LookupError)
    │   ├── ModelBusyError (TimeoutError)     another process holds the model's lock too long
    │   ├── SourceError                       a hub, mirror or file we pull from
    │   │   ├── SourceNotFoundError (LookupError)
    │   │   └── SourceUnavailableError (ConnectionError)
    │   ├── DownloadError (OSError)           disk full, permission denied, interrupted
    │   └── ModelLoadError                    a model's files cannot be loaded (API: 500)
    ├── TaskError                             the task engine (has ``task_id``)
    │   ├── UnknownTaskTypeError (ValueError)
    │   ├── InvalidTaskArgsError (ValueError) arguments that do not fit the task type
    │   ├── TaskNotFoundError (LookupError)   no such task (never queued, or expired)
    │   ├── TaskConflictError (ValueError)    an id reused with other arguments
    │   ├── TaskStateError                    not allowed in the task's state (retry a running one)
    │   └── TaskFailedError                   raised by task code to fail on purpose
    ├── TrainingError                         fine-tuning, merging, evaluation
    │   └── DatasetError (ValueError)         a JSONL dataset that is missing or malformed
    └── InferenceError                        running a model
        ├── UpstreamError                     an upstream server failed (has ``status``, ``body``)
        ├── ImagesNotAcceptedError (ValueError)  image parts for a text-only model
        └── ChatTemplateError (ValueError)    the chat template refused the messages (API: 400)

Each error carries structured fields and an optional ``hint`` telling the user what to do
next; the CLI and the API translate them once, at their edge. ``retryable`` tells the task
engine whether running the same task again could succeed: bad input never will.
"""

from __future__ import annotations

from typing import Any


class YichuiError(Exception):
    """Root of every error yichui raises on purpose."""

    exit_code: int = 1
    retryable: bool = True
    """Whether a task that failed with this error is worth another attempt."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(YichuiError, ValueError):
    """The settings or the config file are invalid."""

    exit_code = 2
    retryable = False


class MissingExtraError(YichuiError, ImportError):
    """An optional dependency group is needed but not installed."""

    def __init__(self, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the optional '{extra}' extra",
            hint=f"install it with: pip install 'yichui[{extra}]'",
        )
        self.extra = extra


class StateError(YichuiError):
    """The state layer (Redis) failed."""


class RedisUnavailableError(StateError, ConnectionError):
    """Redis could not be reached (or timed out)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"Redis at {url} is unreachable: {reason}",
            hint="check YICHUI_REDIS_URL, or unset it to use the embedded Redis",
        )
        self.url = url
        self.reason = reason


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
    retryable = False

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"invalid model name {name!r}: {reason}", name=name)
        self.reason = reason


class ModelNotFoundError(ModelError, LookupError):
    """No such model in the models root."""

    retryable = False

    def __init__(self, name: str) -> None:
        super().__init__(
            f"model {name!r} not found",
            name=name,
            hint="see `yichui models list`, or fetch it with `yichui models pull`",
        )


class ModelBusyError(ModelError, TimeoutError):
    """Another process kept the model's lock past our wait."""


class SourceError(ModelError):
    """A model source (hub, mirror folder, GGUF file) failed."""

    def __init__(self, message: str, *, name: str, source: str, hint: str | None = None) -> None:
        super().__init__(message, name=name, hint=hint)
        self.source = source


class SourceNotFoundError(SourceError, LookupError):
    """The source has no such repository, revision or file."""

    retryable = False


class SourceUnavailableError(SourceError, ConnectionError):
    """The source cannot be reached (offline, network down, SDK missing)."""


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
    retryable = False

    def __init__(self, type_: str, known: list[str]) -> None:
        super().__init__(
            f"unknown task type {type_!r}", hint=f"known types: {', '.join(sorted(known))}"
        )
        self.type = type_


class InvalidTaskArgsError(TaskError, ValueError):
    """The arguments do not fit the task type (checked before anything is queued)."""

    exit_code = 2
    retryable = False


class TaskNotFoundError(TaskError, LookupError):
    """No such task: never queued, or finished longer ago than ``task_ttl``."""

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"task {task_id!r} not found",
            task_id=task_id,
            hint="finished tasks are kept for task_ttl (2 h by default); see `yichui tasks list`",
        )


class TaskConflictError(TaskError, ValueError):
    """A client-supplied id is already taken by a task of another type or arguments."""

    exit_code = 2
    retryable = False


class TaskStateError(TaskError):
    """The operation is not allowed in the task's current state."""


class TaskFailedError(TaskError):
    """Raised by task code to fail with a message; ``retryable=False`` skips the retries."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class TrainingError(YichuiError):
    """Fine-tuning, merging or evaluation cannot go on (QLoRA without a GPU, a bad adapter)."""

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


class ImagesNotAcceptedError(InferenceError, ValueError):
    """The request has image parts but the route's model does not take images."""

    exit_code = 2
    retryable = False

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} does not accept images",
            hint=f"set upstreams.{model}.accepts_images = true if the upstream model does",
        )
        self.model = model


class ModelLoadError(ModelError):
    """A model's files could not be loaded (broken config, missing weights, out of memory)."""

    status = 500
    """What the API answers with (its message, rather than a bare "internal error")."""

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
    retryable = False

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"the chat template of model {model!r} refused the messages: {reason}")
        self.model = model
