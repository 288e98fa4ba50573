"""The engine processes ``yichui serve`` starts and keeps up: the ``launch`` tables of its
upstream routes (``swift deploy``, vLLM, any OpenAI-compatible server)::

    supervisor = rt.supervisor
    supervisor.check()      # before anything starts: ConfigError (exit 2) if ms-swift is missing
    supervisor.start()      # one thread per engine
    supervisor.states()     # for /health and the fleet record (`yichui ps`, /api/servers)
    supervisor.stop()       # SIGTERM, stop_timeout, then SIGKILL of each engine's whole tree

Each engine's thread starts it (:func:`yichui.supervise.spawn`: SIGKILLed by the kernel if
serve dies, however it dies, and what it started with it by :mod:`yichui.runtime.reaper`),
polls its ``health_url`` until a 2xx (``ready``) or ``start_timeout`` (killed, counted as a
failure), then watches the process. When it exits it is
started again after a backoff (``restart_backoff``, doubled per failure in a row up to
``restart_backoff_max``, jittered); :data:`CRASH_LOOP_AFTER` failures in a row are a crash loop,
logged as an error and reported as ``crash_loop``, and it keeps retrying at that pace. An
engine that stayed ready :data:`STABLE_AFTER` seconds starts a new count. Its output goes to
``<data_dir>/engines/<host>/<route>.log``.

One engine per route and host: the serve process that holds ``<route>.lock`` (``flock``) next
to the log runs it; another ``yichui serve`` of the same host and data dir routes to it and
waits (``standby``), and takes over when the holder dies (the kernel drops its lock). A hung
engine that still runs is left alone: killing a busy server would lose every request in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import httpx

from yichui.backoff import Backoff
from yichui.config import Settings, UpstreamRoute
from yichui.errors import YichuiError
from yichui.runtime.launch import LaunchPlan, host_port, launch_plan, swift_envs
from yichui.runtime.reaper import GroupReaper
from yichui.supervise import Child, spawn
from yichui.swift_env import SwiftEnv

log = logging.getLogger("yichui.engines")

CRASH_LOOP_AFTER = 3
"""Failed starts in a row (exits, or not ready in time) that make a crash loop."""
STABLE_AFTER = 60.0
"""Seconds ready after which an exit is no longer part of a run of failures."""
POLL = 0.25
"""Seconds between two looks at the process (and at the health check while it starts)."""
HEALTH_TIMEOUT = 2.0
"""Seconds one health check may take."""
STANDBY_POLL = 2.0
"""Seconds between two tries of a standby serve to take an engine's lock."""
LOG_MAX = 64 * 1024**2
"""An engine log past this size at a start is moved to ``<route>.log.1`` (the one before
goes)."""


class EngineState(StrEnum):
    STARTING = "starting"
    """Started; its health check has not answered 2xx yet."""
    READY = "ready"
    BACKOFF = "backoff"
    """Exited or never got ready; started again after a delay."""
    CRASH_LOOP = "crash_loop"
    """:data:`CRASH_LOOP_AFTER` or more failures in a row; still retried, at the backoff."""
    PORT_BUSY = "port_busy"
    """Something else answers on the route's port: not started, tried again later."""
    STANDBY = "standby"
    """Another ``yichui serve`` of this host runs it."""
    STOPPED = "stopped"


def slug(name: str) -> str:
    """A route name as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "_"


class SupervisedEngine:
    """One route's engine and the thread that keeps it up."""

    def __init__(
        self,
        name: str,
        route: UpstreamRoute,
        *,
        folder: Path,
        plan: Callable[[], LaunchPlan],
        reaper: GroupReaper | None = None,
    ) -> None:
        assert route.launch is not None
        self._reaper = reaper
        self.name, self.route, self.launch = name, route, route.launch
        self.log_path = folder / f"{slug(name)}.log"
        self.lock_path = folder / f"{slug(name)}.lock"
        self._plan = plan
        self.state = EngineState.STOPPED
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self.since = time.time()
        self._failures = 0
        self._backoff = Backoff(
            first=self.launch.restart_backoff, cap=self.launch.restart_backoff_max
        )
        self._stopping = threading.Event()
        self._mutex = threading.Lock()
        self._child: Child | None = None
        self._lock_file: IO[bytes] | None = None
        self._thread: threading.Thread | None = None

    def status(self) -> dict[str, Any]:
        """What ``/health`` and the fleet record show."""
        return {
            "route": self.name,
            "url": self.route.origin(),
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "since": round(self.since, 3),
            "last_exit": self.last_exit,
            "log": str(self.log_path),
        }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop restarting, and SIGTERM the engine now."""
        with self._mutex:
            self._stopping.set()
            if self._child is not None:
                self._child.terminate()

    def join(self, timeout: float) -> None:
        """Wait for the thread, which SIGKILLs what is left ``stop_timeout`` after the SIGTERM."""
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------------
    def _set(self, state: EngineState, pid: int | None = None) -> None:
        self.state, self.pid, self.since = state, pid, time.time()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._own():
                    if self.state is not EngineState.STANDBY:
                        log.info("engine %r: run by another yichui serve of this host", self.name)
                        self._set(EngineState.STANDBY)
                    self._stopping.wait(STANDBY_POLL)
                    continue
                failure = self._run_once()
                if failure is None or self._stopping.is_set():
                    break
                self._stopping.wait(self._failed(*failure))
        except Exception:  # a bug: logged, never a silent dead thread
            log.exception("engine %r: supervision failed", self.name)
        finally:
            self._end_child()
            if self._lock_file is not None:
                self._lock_file.close()  # drops the flock
                self._lock_file = None
            self._set(EngineState.STOPPED)

    def _own(self) -> bool:
        """Whether this process runs the engine (it holds the lock, or has just taken it)."""
        if self._lock_file is not None:
            return True
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_path, "ab")  # noqa: SIM115 - held while we run the engine
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        return True

    def _run_once(self) -> tuple[str, bool, EngineState | None] | None:
        """Start the engine and watch it -> None when asked to stop, else (what went wrong,
        whether it had been ready for STABLE_AFTER, the state to report instead of backoff)."""
        host, port = host_port(self.route)
        if _listening(host, port):
            return (
                f"port {port} of {host} is in use by another process",
                False,
                EngineState.PORT_BUSY,
            )
        try:
            plan = self._plan()
            child = self._spawn(plan)
        except (YichuiError, OSError) as exc:
            return f"cannot start it: {exc}", False, None
        self._set(EngineState.STARTING, child.pid)
        started = time.monotonic()
        log.info("engine %r: started (pid %d): %s", self.name, child.pid, plan.shown)
        with httpx.Client(timeout=HEALTH_TIMEOUT, headers=plan.headers) as client:
            while not _answers(client, plan.health_url):
                if self._stopping.is_set():
                    return None
                code = child.poll()
                if code is not None:
                    return _exit(code) + " before it was ready", False, None
                if time.monotonic() - started > self.launch.start_timeout:
                    self._end_child(kill=True)
                    return f"not ready within {self.launch.start_timeout:g} s", False, None
                self._stopping.wait(POLL)
        ready = time.monotonic()
        self._set(EngineState.READY, child.pid)
        log.info(
            "engine %r: ready at %s (pid %d, %.1f s)",
            self.name,
            self.route.origin(),
            child.pid,
            ready - started,
        )
        while not self._stopping.is_set():
            code = child.poll()
            if code is not None:
                return _exit(code), time.monotonic() - ready >= STABLE_AFTER, None
            self._stopping.wait(POLL)
        return None

    def _spawn(self, plan: LaunchPlan) -> Child:
        # an engine may log its arguments, the API key among them: for this user only
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > LOG_MAX:
                self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with open(fd, "ab") as out:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"\n=== {stamp} yichui serve starts: {plan.shown}\n".encode())
            out.flush()
            with self._mutex:
                if self._stopping.is_set():
                    raise OSError("yichui serve is stopping")
                self._child = spawn(
                    plan.argv, env=plan.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
                )
                if self._reaper is not None:
                    self._reaper.watch(self._child.pid)
                return self._child

    def _failed(self, reason: str, stable: bool, state: EngineState | None) -> float:
        """Count a failure -> seconds to wait before the next start."""
        self._end_child()
        if stable:
            self._failures = 0
            self._backoff.reset()
        self._failures += 1
        self.last_exit = reason
        wait = self._backoff.next()
        if state is None:
            looping = self._failures >= CRASH_LOOP_AFTER
            state = EngineState.CRASH_LOOP if looping else EngineState.BACKOFF
        self._set(state)
        if state is EngineState.CRASH_LOOP and self._failures == CRASH_LOOP_AFTER:
            log.error(
                "engine %r is crash-looping: %d failed starts in a row, the last: %s (log: %s); "
                "retrying with backoff up to %g s",
                self.name,
                self._failures,
                reason,
                self.log_path,
                self.launch.restart_backoff_max,
            )
        else:
            log.warning(
                "engine %r: %s (log: %s); starting it again in %.1f s",
                self.name,
                reason,
                self.log_path,
                wait,
            )
        self.restarts += 1
        return wait

    def _end_child(self, *, kill: bool = False) -> None:
        with self._mutex:
            child, self._child = self._child, None
        if child is None:
            return
        if kill:
            child.kill_tree()
        else:
            child.stop(self.launch.stop_timeout)
        with contextlib.suppress(OSError):  # what the engine left of its group when it died
            os.killpg(child.pid, signal.SIGKILL)
        if self._reaper is not None:
            self._reaper.forget(child.pid)
        self.pid = None


class EngineSupervisor:
    """Every engine this process launches (the routes with a ``launch`` table)."""

    def __init__(self, settings: Settings, *, model_path: Callable[[str], str]) -> None:
        self.settings = settings
        self.routes = {n: r for n, r in sorted(settings.upstreams.items()) if r.launch is not None}
        self.folder = settings.data_dir / "engines" / slug(socket.gethostname())
        self._model_path = model_path
        self._swift: dict[str, SwiftEnv] | None = None
        self._reaper: GroupReaper | None = None
        self.engines: dict[str, SupervisedEngine] = {}

    def check(self) -> None:
        """Whatever a start needs that can be checked now (ms-swift's environment)."""
        if self._swift is None:
            self._swift = swift_envs(self.settings)

    def start(self) -> None:
        """Start every engine's thread (none when no route has a launch table)."""
        self.check()
        if self.routes and self._reaper is None:
            self._reaper = GroupReaper()
        for name, route in self.routes.items():
            if name in self.engines:
                continue
            engine = SupervisedEngine(
                name,
                route,
                folder=self.folder,
                plan=self._planner(name, route),
                reaper=self._reaper,
            )
            self.engines[name] = engine
            engine.start()

    def _planner(self, name: str, route: UpstreamRoute) -> Callable[[], LaunchPlan]:
        swift = (self._swift or {}).get(name)
        return lambda: launch_plan(name, route, swift=swift, model_path=self._model_path)

    def states(self) -> list[dict[str, Any]]:
        """Each started engine's status, by route name (none before :meth:`start`)."""
        return [engine.status() for engine in self.engines.values()]

    def health(self) -> dict[str, dict[str, Any]]:
        """Route -> its engine's state, pid and restarts, for ``/health``."""
        return {
            name: {"state": e.state.value, "pid": e.pid, "restarts": e.restarts}
            for name, e in self.engines.items()
        }

    def stop(self) -> None:
        """SIGTERM every engine at once, SIGKILL of each tree ``stop_timeout`` later."""
        engines = list(self.engines.values())
        for engine in engines:
            engine.request_stop()
        deadline = time.monotonic() + max([e.launch.stop_timeout for e in engines], default=0)
        for engine in engines:
            engine.join(max(0.0, deadline - time.monotonic()) + 5.0)
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).is_success
    except httpx.HTTPError:
        return False


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host:port`` (a wildcard: on loopback)."""
    target = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def _exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with code {code}"
