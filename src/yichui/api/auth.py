"""API keys -> tenants. Keys are configured as SHA-256 digests, never in clear."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from yichui.api.errors import APIError

LOCAL_TENANT = "local"
"""The one tenant of local mode (no API keys configured)."""


def hash_key(key: str) -> str:
    """The digest to put in ``api_keys`` for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def tenant_for(keys: dict[str, str], header: str) -> str | None:
    """The tenant an ``Authorization`` header belongs to; None when it names none."""
    if not keys:
        return LOCAL_TENANT
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    digest = hash_key(key.strip())
    for known, tenant in keys.items():
        if hmac.compare_digest(known, digest):
            return tenant
    return None


async def tenant_of(request: Request) -> str:
    keys: dict[str, str] = request.app.state.settings.api_keys
    if not keys:
        return LOCAL_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
        )
    digest = hash_key(key.strip())
    for known, tenant in keys.items():
        if hmac.compare_digest(known, digest):
            return tenant
    raise APIError(401, "invalid API key", code="invalid_api_key")


TenantDep = Annotated[str, Depends(tenant_of)]
