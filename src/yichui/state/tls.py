"""TLS for every client of a ``rediss`` target (the state and cache clients of
``connection``, a cluster's nodes, the Sentinels that ``sentinel`` asks and watches): redis-py's
arguments from the ``redis_ssl_*`` settings, and what a failed handshake means."""

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


def tls_refusal(exc: BaseException, *, tls: bool) -> tuple[str, str] | None:
    """-> (reason, hint) when ``exc`` is a TLS mismatch (a setting, not an outage): a
    certificate not signed by ``redis_ssl_ca_certs``, a handshake with a plain port, a plain
    client on a TLS port. None for any other failure."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    upper = text.upper()
    if "CERTIFICATE_VERIFY_FAILED" in upper or "CERTIFICATE VERIFY FAILED" in upper:
        return (
            f"the server's TLS certificate is not trusted ({text})",
            "set redis_ssl_ca_certs to the CA that signed the server's certificate",
        )
    if tls and ("WRONG_VERSION_NUMBER" in upper or "SSL" in upper):
        return (
            f"the TLS handshake failed ({text})",
            "is it a TLS port? use redis:// for a plain one; check the redis_ssl_* settings",
        )
    if not tls and ("CLOSED BY SERVER" in upper or "RESET BY PEER" in upper):
        return (
            f"the server closed the connection at once ({text})",
            "a TLS port answers a plain client so: use rediss:// (and redis_ssl_ca_certs)",
        )
    return None
