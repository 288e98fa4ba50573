"""redis-py's TLS arguments from the ``redis_ssl_*`` settings, one definition for every client
of a ``rediss`` target: the state and cache clients (``connection``), a cluster's nodes, and
the Sentinels that ``sentinel`` asks and watches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from yichui.config import Settings


def tls_kwargs(settings: Settings) -> dict[str, Any]:
    """redis-py's ``ssl_*`` arguments from the ``redis_ssl_*`` settings (those set): for a
    ``rediss`` target only. A standalone URL's own ``?ssl_ca_certs=…`` options win over them."""
    out: dict[str, Any] = {"ssl_cert_reqs": settings.redis_ssl_cert_reqs}
    for name in ("ca_certs", "certfile", "keyfile"):
        value = getattr(settings, f"redis_ssl_{name}")
        if value is not None:
            out[f"ssl_{name}"] = str(value)
    if settings.redis_ssl_cert_reqs == "none":
        out["ssl_check_hostname"] = False
    return out
