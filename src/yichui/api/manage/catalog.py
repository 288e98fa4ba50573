"""``/api/catalog``: the models ms-swift knows by name (the snapshot shipped with yichui), for
the dashboard's pull form and for scripts; what ``yichui models catalog`` prints."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from yichui.api.auth import PrincipalDep
from yichui.api.manage.common import Limit, Offset, page
from yichui.models.catalog import snapshot

router = APIRouter(tags=["models"])


@router.get("/catalog")
def catalog(
    principal: PrincipalDep,
    search: Annotated[
        str | None,
        Query(
            max_length=256,
            description="Words that must all be part of the model type, an id or the template.",
        ),
    ] = None,
    kind: Literal["text", "multimodal"] | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> dict[str, Any]:
    """ms-swift's catalog, in its order: each entry's model type, ModelScope and Hugging Face
    ids, kind and template. ``POST /api/models/pull`` takes either id as the name."""
    found = snapshot()
    entries = [e.to_dict() for e in found.search(search, kind=kind)]
    return {**page(entries, limit, offset), "ms_swift": found.ms_swift, "origin": found.origin}
