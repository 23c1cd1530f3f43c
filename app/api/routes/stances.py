"""Named-blend routes: ``POST /v1/stances`` (admin), ``GET /v1/stances[/{name}]``, ``DELETE /v1/stances/{name}`` (admin).

A named blend is a model name that resolves to a live weighted blend of registered adapters
(``{"name": "friendly-expert", "stances": {"curious-uncertainty": 0.6, "confident-expertise": 0.4}}``);
clients then send ``"model": "friendly-expert"``. These functions only translate HTTP into
:class:`~app.catalog.StanceCatalog` calls (run in a worker thread: registering reads cold adapters
and fsyncs the recipe file); the rules (409 on a missing member or a taken name) live there.
Mutating routes need the admin key, as adapter uploads do (:func:`app.deps.require_admin`).
"""

from __future__ import annotations

from fastapi import APIRouter, Query, status
from starlette.concurrency import run_in_threadpool

from app.api.offload import OffloadedJSONRoute
from app.api.responses import ADMIN_ERRORS
from app.deps import AdminDep, CatalogDep
from app.schemas import NamedBlendInfo, NamedBlendList, NamedBlendRequest

router = APIRouter(prefix="/v1", tags=["stances"], route_class=OffloadedJSONRoute, responses=ADMIN_ERRORS)


@router.get("/stances", response_model=NamedBlendList)
async def list_stances(catalog: CatalogDep) -> NamedBlendList:
    """Every named blend with its recipe, sorted by name."""
    return NamedBlendList(data=[NamedBlendInfo.from_blend(b) for b in catalog.list_blends()])


@router.get("/stances/{name}", response_model=NamedBlendInfo)
async def get_stance(name: str, catalog: CatalogDep) -> NamedBlendInfo:
    """One named blend."""
    return NamedBlendInfo.from_blend(catalog.get_blend(name))


@router.post("/stances", response_model=NamedBlendInfo, status_code=status.HTTP_201_CREATED, dependencies=[AdminDep])
async def create_stance(
    body: NamedBlendRequest,
    catalog: CatalogDep,
    replace: bool = Query(False, description="Replace an existing named blend of that name (new version)."),
) -> NamedBlendInfo:
    """Register ``name`` as the live blend ``stances``; 409 if a member adapter is missing or the name is taken."""
    blend = await run_in_threadpool(
        lambda: catalog.register_blend(body.name, body.stances, description=body.description, replace=replace)
    )
    return NamedBlendInfo.from_blend(blend)


@router.delete("/stances/{name}", response_model=NamedBlendInfo, dependencies=[AdminDep])
async def delete_stance(name: str, catalog: CatalogDep) -> NamedBlendInfo:
    """Forget a named blend (its adapters stay registered)."""
    return NamedBlendInfo.from_blend(await run_in_threadpool(catalog.delete_blend, name))
