"""Who asks, for every route: the services' one :class:`~yichui.access.Authenticator`.

A request names its caller one of two ways:

- ``Authorization: Bearer <key>`` (API clients, the CLI): checked in memory, no Redis call;
- the dashboard's session cookie (``yichui_session``, HttpOnly, SameSite=Strict), made by
  ``POST /api/session`` from a key; every request but GET/HEAD then also carries the session's
  ``X-CSRF-Token``.

With ``auth = "local"`` a request with neither is the local admin. A request that changes
something without an ``Authorization`` header is refused when the browser says it comes from
another site (``Origin`` / ``Sec-Fetch-Site``): no other page can act through a user's cookie
or a local server.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from yichui.access import LOCAL, Principal, require_admin
from yichui.api.deps import services_of
from yichui.errors import AuthenticationError, PermissionDeniedError, StateError
from yichui.runtime.serving import ServingServices

SESSION_COOKIE = "yichui_session"
CSRF_HEADER = "x-csrf-token"
_SAFE = ("GET", "HEAD", "OPTIONS")


async def authenticate(request: Request, services: ServingServices) -> Principal:
    """The request's caller; 401 without a key (or session), or with one nobody issued."""
    header = request.headers.get("authorization")
    auth = services.auth
    if header:
        return auth.require(header)
    changes = request.method not in _SAFE
    if changes:
        same_site(request)
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        try:
            session = await services.sessions.get(session_id)
        except Exception as exc:  # Redis unreachable, a session never seen here: fail closed
            raise StateError(
                "Redis is unreachable: the session cannot be checked; try again shortly"
            ) from exc
        if session is not None:
            principal = LOCAL if session.digest is None else auth.by_digest(session.digest)
            if principal is not None:
                if changes and not hmac.compare_digest(
                    request.headers.get(CSRF_HEADER, ""), session.csrf
                ):
                    raise PermissionDeniedError(
                        "missing or wrong CSRF token: send the session's X-CSRF-Token"
                    )
                return principal
        if not auth.local:
            raise AuthenticationError("the session has ended: sign in with an API key again")
    if auth.local:
        return LOCAL
    raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")


def same_site(request: Request) -> None:
    """403 for a browser request another site made (a form post, a fetch from its page)."""
    if request.headers.get("sec-fetch-site", "") == "cross-site":
        raise PermissionDeniedError("cross-site requests are refused")
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if origin.split("://", 1)[-1] != host:
            raise PermissionDeniedError("cross-site requests are refused")


async def principal_of(request: Request) -> Principal:
    return await authenticate(request, services_of(request))


async def admin_of(request: Request) -> Principal:
    principal = await authenticate(request, services_of(request))
    require_admin(principal, f"{request.method} {request.url.path}")
    return principal


async def tenant_of(request: Request) -> str:
    return (await authenticate(request, services_of(request))).tenant


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks (``principal``, authenticated) and the services that answer: what a route on
    the hit path needs, as one dependency (FastAPI's solving costs the hit path ~30 µs for
    each)."""

    principal: Principal
    services: ServingServices

    @property
    def tenant(self) -> str:
        return self.principal.tenant


async def caller_of(request: Request) -> Caller:
    services = services_of(request)
    return Caller(await authenticate(request, services), services)


PrincipalDep = Annotated[Principal, Depends(principal_of)]
"""Any authenticated caller (``user`` or ``admin``)."""
AdminDep = Annotated[Principal, Depends(admin_of)]
"""An admin caller; 403 for a user key."""
TenantDep = Annotated[str, Depends(tenant_of)]
CallerDep = Annotated[Caller, Depends(caller_of)]
