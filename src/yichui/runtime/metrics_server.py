"""A task worker's own ``/metrics`` port (``yichui worker --metrics-port``)::

    server = MetricsServer(rt, host="127.0.0.1", port=9101).start()    # a daemon thread
    ...
    server.stop()

Same rules as the API's ``/metrics`` (:mod:`yichui.api.metrics`): the token, else loopback
only; the deployment's figures read from Redis during the scrape, each call bounded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson

from yichui.errors import ConfigError, error_body
from yichui.metrics import CONTENT_TYPE
from yichui.metrics_access import check_access

if TYPE_CHECKING:
    from yichui.runtime import Runtime

_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold up the worker's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the worker's log


class MetricsServer:
    def __init__(self, rt: Runtime, *, host: str, port: int) -> None:
        self.rt = rt
        self.host = host
        self.port = port
        self.probe = rt.probe()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        try:
            server = make_server(
                self.host, self.port, self._app, server_class=_Server, handler_class=_Quiet
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}",
                hint="choose another --metrics-port (or worker_metrics_port)",
            ) from None
        self._server = server
        self.port = server.server_port  # the real one when 0 was asked for
        self._thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.probe.close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            return _error(start_response, 404, "only /metrics is served here")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _error(start_response, 405, "use GET")
        token = self.rt.settings.metrics_token
        refusal = check_access(
            token.get_secret_value() if token else None,
            environ.get("REMOTE_ADDR"),
            environ.get("HTTP_AUTHORIZATION"),
        )
        if refusal is not None:
            return _error(start_response, refusal.status, refusal.message)
        body = self.rt.metrics.exposition(self.probe.read())
        start_response("200 OK", [("Content-Type", CONTENT_TYPE)])
        return [body]


def _error(start_response: Callable[..., Any], status: int, message: str) -> list[bytes]:
    """The API's error body (:func:`yichui.errors.error_body`)."""
    body = error_body(status, message)
    headers = [("Content-Type", "application/json")]
    if status == 401:
        headers.append(("WWW-Authenticate", "Bearer"))
    start_response(f"{status} {_REASONS[status]}", headers)
    return [orjson.dumps(body)]
