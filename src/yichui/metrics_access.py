"""Who may read ``/metrics``: with ``metrics_token`` set, a scrape bearing it, from anywhere;
without one, scrapes from loopback only. Both the API's ``/metrics`` and a worker's metrics
port ask :func:`check_access`::

    refusal = check_access(token, client_host, authorization)  # token: metrics_token's value
    if refusal is not None:
        ...  # answer refusal.status (401 or 403) with refusal.message
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


def check_access(
    token: str | None, client_host: str | None, authorization: str | None
) -> Refusal | None:
    """None when this scrape may read the metrics: with ``token`` set, a request bearing it
    (from anywhere); without one, requests from loopback only."""
    if token:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return Refusal(401, "a valid metrics token is needed (Authorization: Bearer …)")
        return None
    if _loopback(client_host):
        return None
    return Refusal(
        403,
        "metrics are readable from loopback only; set metrics_token to scrape from other hosts",
    )


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"
