"""``POST /v1/export-blend`` (admin): a blend downloaded as one plain peft adapter (a zip).

The HTTP face of ``stanceserve export-blend --method cat``, computed from the weights the server already
holds (:mod:`app.registry.export`): exact, no base model copied. The body names the blend as a request's
``stances`` does (``{"stances": {"curious-uncertainty": 0.6, "confident-expertise": 0.4}, "name": "friendly"}``;
a named blend's recipe is its ``stances`` in ``GET /v1/stances/{name}``). Servers that cannot blend (vLLM, llama.cpp) load the result as any
adapter; ``POST /v1/adapters`` takes the zip back as an upload. Needs the admin key, as saving a named
blend does: the answer carries every member's weights.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.concurrency import run_in_threadpool

from app.api.offload import OffloadedJSONRoute
from app.api.responses import ADMIN_ERRORS
from app.catalog import StanceCatalog
from app.config import MAX_BLEND_ADAPTERS
from app.deps import AdminDep, CatalogDep
from app.errors import AdapterNotFoundError
from app.registry.export import export_zip
from app.registry.validation import validate_name
from app.schemas import STANCE_NAME_PATTERN

router = APIRouter(prefix="/v1", tags=["stances"], route_class=OffloadedJSONRoute, responses=ADMIN_ERRORS)


_STANCES = {"type": "object", "additionalProperties": {"type": "number"}, "minProperties": 1,
            "maxProperties": MAX_BLEND_ADAPTERS}


class ExportBlendRequest(BaseModel):
    """``POST /v1/export-blend``: the blend to export, and the name of the download."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    stances: Annotated[dict[str, float], WithJsonSchema(_STANCES)] = Field(
        ..., description='{adapter name: weight}, e.g. {"curious-uncertainty": 0.6, "confident-expertise": 0.4}; '
        "1 to 8 registered adapters, |weight| at most the server's max_blend_weight.")
    name: str = Field("blend", json_schema_extra={"pattern": STANCE_NAME_PATTERN},
                      description="Names the download (<name>.zip) and is recorded in export_blend.json.")


_ZIP = {200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
              "description": "A zip of adapter_config.json, adapter_model.safetensors and export_blend.json."}}


def _export(catalog: StanceCatalog, body: ExportBlendRequest) -> bytes:
    validate_name(body.name)
    stance = catalog.resolve(catalog.engine.model_name, body.stances)
    bases = set()
    for weights, _ in stance.terms:
        try:
            bases.add(catalog.get(weights.id.name).base_model)
        except AdapterNotFoundError:  # deleted a moment ago: the weights in hand are still that version's
            bases.add(None)
    base = bases.pop() if len(bases) == 1 and None not in bases else catalog.engine.model_name
    return export_zip(stance.terms, base_model=base, name=body.name)


@router.post("/export-blend", response_class=Response, responses=_ZIP, dependencies=[AdminDep])
async def export_blend(body: ExportBlendRequest, catalog: CatalogDep) -> Response:
    """The blend as one peft LoRA adapter (exact: factors stacked, rank = sum of the member ranks), as a zip."""
    data = await run_in_threadpool(_export, catalog, body)
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{body.name}.zip"'})
