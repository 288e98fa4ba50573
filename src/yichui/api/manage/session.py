"""``/api/session``: the dashboard's sign-in. A key is sent once; the page then holds an
HttpOnly, SameSite=Strict cookie (``EventSource`` cannot send headers, and a key never goes in
a URL) and a CSRF token it sends back in ``X-CSRF-Token`` on every action."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from yichui.access import LOCAL, Principal, Session, hash_key
from yichui.api.auth import SESSION_COOKIE, same_site
from yichui.api.deps import services_of
from yichui.errors import AuthenticationError

router = APIRouter(tags=["session"])


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(default=None, max_length=512, description="An API key (keys mode).")


def _body(request: Request, principal: Principal, session: Session) -> dict[str, Any]:
    return {
        "auth": services_of(request).auth.mode,
        "principal": principal.to_dict(),
        "csrf": session.csrf,
    }


def _set_cookie(request: Request, response: Response, session: Session) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        max_age=services_of(request).settings.session_ttl,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


async def _current(request: Request) -> tuple[Principal, Session] | None:
    services = services_of(request)
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        return None
    session = await services.sessions.get(session_id)
    if session is None:
        return None
    principal = LOCAL if session.digest is None else services.auth.by_digest(session.digest)
    if principal is None or (session.digest is None and not services.auth.local):
        return None
    return principal, session


@router.get("/session")
async def get_session(request: Request, response: Response) -> dict[str, Any]:
    """The signed-in caller and the session's CSRF token; 401 when not signed in (keys mode).
    In local mode a session is made when there is none."""
    found = await _current(request)
    if found is None:
        services = services_of(request)
        if not services.auth.local:
            raise AuthenticationError("not signed in: POST /api/session with an API key")
        session = await services.sessions.create(None)
        _set_cookie(request, response, session)
        return _body(request, LOCAL, session)
    return _body(request, *found)


@router.post("/session")
async def sign_in(body: SignIn, request: Request, response: Response) -> dict[str, Any]:
    """Sign in with an API key (keys mode; none in local mode): sets the session cookie."""
    same_site(request)
    services = services_of(request)
    if services.auth.local:
        principal, digest = LOCAL, None
    else:
        if not body.key:
            raise AuthenticationError("missing API key")
        digest = hash_key(body.key.strip())
        found = services.auth.by_digest(digest)
        if found is None:
            raise AuthenticationError("invalid API key")
        principal = found
    session = await services.sessions.create(digest)
    _set_cookie(request, response, session)
    return _body(request, principal, session)


@router.delete("/session", status_code=204)
async def sign_out(request: Request) -> Response:
    """End the session (the cookie is cleared)."""
    same_site(request)
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        await services_of(request).sessions.delete(session_id)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
