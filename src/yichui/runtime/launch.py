"""The command that starts the engine behind an upstream route (its ``launch`` table)::

    swift = swift_envs(settings)      # once, at start: ConfigError if ms-swift is missing
    plan = launch_plan("smol", route, swift=swift.get("smol"), model_path=resolve)
    plan.argv, plan.env, plan.health_url, plan.shown

``swift_deploy`` runs ``swift deploy`` in the ``swift_python`` environment with the route's
host, port, served model name and API key. ms-swift 4.6 moves ``swift deploy`` to the next
free port when its own cannot be bound without ``SO_REUSEADDR``, which the ``TIME_WAIT`` of a
crashed engine's connections is enough for: restarted, the engine would listen where the route
does not point. So it runs through :data:`SWIFT_DEPLOY`, which keeps the port it is given (a
port really in use then fails the start, and says so in the engine's log).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from yichui.config import EngineLaunch, Settings, UpstreamRoute
from yichui.errors import ConfigError, SwiftMissingError, YichuiError
from yichui.models.registry import ModelRegistry
from yichui.swift_env import INSTALL_HINT, SwiftEnv, swift_env

log = logging.getLogger("yichui.engines")

SWIFT_DEPLOY = """\
import sys
try:
    import swift.arguments.deploy_args as deploy_args
    # keep the port: a crashed engine's TIME_WAIT must not move it (yichui.runtime.launch)
    deploy_args.find_free_port = lambda start_port=None, retry=100: start_port
except (ImportError, AttributeError):
    pass
from swift.pipelines import deploy_main
deploy_main(sys.argv[1:])
"""
"""``python -c SWIFT_DEPLOY ARGS`` is ``swift deploy ARGS`` that keeps its port."""

PLACEHOLDERS = ("{host}", "{port}", "{model}", "{api_key}")
"""What a ``command`` may name of its route."""


@dataclass(frozen=True)
class LaunchPlan:
    """One start of an engine."""

    argv: list[str]
    env: dict[str, str]
    """The whole environment."""
    health_url: str
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with each health check (the route's API key)."""
    shown: str = ""
    """The command for logs, the API key masked."""


def host_port(route: UpstreamRoute) -> tuple[str, int]:
    """Where the route's engine listens."""
    url = httpx.URL(route.url)
    return url.host or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)


def swift_envs(settings: Settings) -> dict[str, SwiftEnv]:
    """The ms-swift environment of every ``swift_deploy`` launch, by route name: a missing or
    broken one is a :class:`ConfigError` (``yichui serve`` refuses to start, exit 2)."""
    found: dict[str, SwiftEnv] = {}
    for name, route in sorted(settings.upstreams.items()):
        if route.launch is None or route.launch.swift_deploy is None:
            continue
        try:
            env = swift_env(settings)
        except SwiftMissingError as exc:
            raise ConfigError(
                f"upstreams.{name}.launch.swift_deploy needs ms-swift: {exc}",
                hint=exc.hint or INSTALL_HINT,
            ) from exc
        for package in env.untested():
            log.warning("engine %r: %s is untested with yichui", name, package)
        found[name] = env
    return found


def launch_plan(
    name: str,
    route: UpstreamRoute,
    *,
    swift: SwiftEnv | None,
    model_path: Callable[[str], str],
) -> LaunchPlan:
    """The command, environment and health check of the engine behind ``route``."""
    launch = route.launch
    if launch is None:
        raise ConfigError(f"upstreams.{name} has no launch table")
    host, port = host_port(route)
    served = route.model or name
    key = route.api_key.get_secret_value() if route.api_key is not None else ""
    if launch.swift_deploy is not None:
        if swift is None:
            raise ConfigError(f"upstreams.{name}.launch.swift_deploy: no ms-swift environment")
        spec = launch.swift_deploy
        argv = [str(swift.python), "-c", SWIFT_DEPLOY, "--model", model_path(spec.model)]
        argv += ["--host", host, "--port", str(port), "--served_model_name", served]
        if key:
            argv += ["--api_key", key]
        for arg, value in spec.arguments().items():
            values = value if isinstance(value, list) else [value]
            argv += [f"--{arg}", *(_arg(v) for v in values)]
        shown = " ".join(["swift deploy", *argv[3:]])
    else:
        assert launch.command is not None
        route_values = {"{host}": host, "{port}": str(port), "{model}": served, "{api_key}": key}
        argv = [_fill(part, route_values) for part in launch.command]
        shown = " ".join(argv)
    if key:
        shown = shown.replace(key, "***")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **launch.env}
    return LaunchPlan(argv, env, health_url(route, launch), headers, shown)


def health_url(route: UpstreamRoute, launch: EngineLaunch) -> str:
    """What answers 2xx once the engine is ready (``launch.health_url``, default
    ``<url>/models``)."""
    given = launch.health_url
    if given is None:
        return route.url.rstrip("/") + "/models"
    return route.origin() + given if given.startswith("/") else given


def model_path(registry: ModelRegistry, value: str) -> str:
    """A ``swift_deploy`` model: a yichui model's folder, else a folder, else ``value`` as it
    is (a hub id: ms-swift downloads it)."""
    try:
        status = registry.status(value).status
    except YichuiError:  # not a model name (a path, a hub id), or the registry failed
        status = None
    if status is not None and status.exists and status.path:
        return str(status.path)
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.resolve())
    log.info("swift_deploy model %r is no yichui model nor folder: passed on as a hub id", value)
    return value


def _arg(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _fill(part: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        part = part.replace(placeholder, value)
    return part
