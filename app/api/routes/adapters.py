"""Adapter routes: list, show, upload, delete, and vLLM's load/unload endpoints.

These functions only translate HTTP into :class:`~app.catalog.StanceCatalog`
calls and back. Uploads are streamed into the store's own staging folder
(bounded by the body-size limit as they arrive), validated against the base
model, and servable as soon as the response returns, with no restart. Every
catalog call can block (hashing, parsing safetensors, waiting for the engine
to drop a slot), so each runs in a worker thread. Mutating routes need the
admin key (see :func:`app.deps.require_admin`).

What unauthenticated clients may read: ``GET /v1/adapters`` and ``GET /v1/adapters/{name}`` need no key and
show every adapter's public record: name, version, rank, alpha, target modules, size, sha256, created time,
base model, description and metadata (the provenance the uploader chose to publish; ``stanceserve train
--register`` sends the method, base model, dataset hash and row count, hyperparameters and final training
metrics, never the command line or local paths). Never shown: the server's folder of the adapter, and any
secret: metadata and descriptions are stored with secret option values and the server's admin key replaced
by ``***`` (:meth:`app.catalog.StanceCatalog.register_upload`), and are redacted again when served (records
stored before that rule existed included).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.offload import OffloadedJSONRoute
from app.api.responses import ADMIN_ERRORS, TEXT_RESPONSE
from app.config import Settings
from app.deps import AdminDep, CatalogDep, SettingsDep
from app.errors import AdapterInUseError, AdapterNotFoundError, AdapterValidationError, StanceServeError
from app.redaction import redact_json
from app.registry.adapter import AdapterRecord
from app.registry.jsonread import parse_metadata
from app.schemas import STANCE_NAME_PATTERN, AdapterInfo, AdapterList, LoadLoRARequest, UnloadLoRARequest

router = APIRouter(prefix="/v1", tags=["adapters"], route_class=OffloadedJSONRoute, responses=ADMIN_ERRORS)

#: Most files one upload may carry (the form parser refuses more with HTTP 400).
_MAX_FILES = 8

#: Form fields that are not files (everything else that is a file is part of the upload).
_TEXT_FIELDS = {"name", "description", "metadata"}

#: The multipart body of ``POST /v1/adapters``, for the OpenAPI schema (the route parses the form itself,
#: so it can bound it while it streams in).
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "files"],
                    "properties": {
                        "name": {"type": "string", "pattern": STANCE_NAME_PATTERN,
                                 "description": "The stance name clients will use as `model`."},
                        "description": {"type": "string", "description": "Free text."},
                        "metadata": {"type": "object", "description": "A JSON object (training provenance...)."},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "maxItems": _MAX_FILES,
                            "description": "adapter_config.json + adapter_model.safetensors, or one .zip/.tar.gz "
                            "of such a folder.",
                        },
                    },
                },
                # the metadata part is JSON text (a part without a filename, read as a string)
                "encoding": {"metadata": {"contentType": "application/json"}},
            }
        },
    }
}


def _secrets(settings: Settings) -> list[str]:
    """The secret values the server knows, which no stored or served text may contain: its admin key."""
    return [settings.admin_key.get_secret_value()] if settings.admin_key else []


def _public(rec: AdapterRecord, settings: Settings) -> AdapterInfo:
    """The public view of ``rec``, its description and metadata redacted (see the module docstring)."""
    info = AdapterInfo.from_record(rec)
    secrets = _secrets(settings)
    return info.model_copy(update={
        "metadata": redact_json(info.metadata, secrets),
        "description": redact_json(info.description, secrets) if info.description is not None else None,
    })


@router.get("/adapters", response_model=AdapterList)
async def list_adapters(catalog: CatalogDep, settings: SettingsDep) -> AdapterList:
    """Every registered adapter, sorted by name (public fields: see the module docstring)."""
    return AdapterList(data=[_public(r, settings) for r in catalog.list()])


@router.get("/adapters/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, catalog: CatalogDep, settings: SettingsDep) -> AdapterInfo:
    """One adapter: rank, alpha, target modules, size, sha256, created time, description, metadata."""
    try:
        return _public(catalog.get(name), settings)
    except AdapterNotFoundError as e:
        e.param = "name"
        raise


@router.post(
    "/adapters",
    response_model=AdapterInfo,
    status_code=status.HTTP_201_CREATED,
    dependencies=[AdminDep],
    openapi_extra=_UPLOAD_BODY,
)
async def upload_adapter(
    request: Request,
    catalog: CatalogDep,
    settings: SettingsDep,
    replace: bool = Query(False, description="Replace an existing adapter of that name (new version)."),
) -> AdapterInfo:
    """Register a peft LoRA adapter from a multipart upload.

    Form: ``name`` (required), ``description``, ``metadata`` (a JSON object), and either the
    files ``adapter_config.json`` + ``adapter_model.safetensors`` or one ``.zip``/``.tar.gz``
    of such a folder (file field names are free).
    """
    form = await request.form(max_files=_MAX_FILES, max_fields=16)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise AdapterValidationError("form field 'name' is required", param="name")
        description = form.get("description")
        description = description if isinstance(description, str) and description else None
        raw_meta = form.get("metadata")
        metadata = await run_in_threadpool(
            parse_metadata, raw_meta if isinstance(raw_meta, str) else None, max_depth=settings.max_json_depth
        )
        files = [
            (v.filename or k, v.file) for k, v in form.multi_items() if isinstance(v, UploadFile) and k not in _TEXT_FIELDS
        ]
        if not files:
            raise AdapterValidationError(
                "no files: send adapter_config.json and adapter_model.safetensors, or one .zip/.tar.gz", param="files"
            )
        rec = await run_in_threadpool(
            lambda: catalog.register_upload(
                name, files, description=description, metadata=metadata, replace=replace,
                max_bytes=settings.max_adapter_bytes, secrets=_secrets(settings),
            )
        )
    finally:
        await form.close()
    return _public(rec, settings)


@router.delete("/adapters/{name}", response_model=AdapterInfo, dependencies=[AdminDep])
async def delete_adapter(name: str, catalog: CatalogDep, settings: SettingsDep) -> AdapterInfo:
    """Unregister an adapter; requests already running on it finish normally."""
    try:
        return _public(await run_in_threadpool(catalog.delete, name), settings)
    except AdapterNotFoundError as e:
        e.param = "name"
        raise


#: The store's ``param`` names -> the fields of vLLM's ``load_lora_adapter`` request.
_LOAD_PARAMS = {"path": "lora_path", "name": "lora_name", "adapter_config.json": "lora_path",
                "adapter_model.safetensors": "lora_path"}


@router.post("/load_lora_adapter", response_class=Response, responses=TEXT_RESPONSE, dependencies=[AdminDep])
async def load_lora_adapter(body: LoadLoRARequest, catalog: CatalogDep) -> PlainTextResponse:
    """vLLM-compatible: register the adapter folder ``lora_path`` on the server's disk as ``lora_name``.

    Errors name the request's fields: ``param`` is ``lora_path`` for the folder (or one of its files) and
    ``lora_name`` for the name.
    """
    try:
        rec = await run_in_threadpool(catalog.register_path, body.lora_name, Path(body.lora_path))
    except StanceServeError as e:
        e.param = _LOAD_PARAMS.get(e.param, e.param) if e.param is not None else None
        raise
    return PlainTextResponse(f"Success: LoRA adapter '{rec.name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=Response, responses=TEXT_RESPONSE, dependencies=[AdminDep])
async def unload_lora_adapter(body: UnloadLoRARequest, catalog: CatalogDep) -> PlainTextResponse:
    """vLLM-compatible: unregister ``lora_name``."""
    try:
        await run_in_threadpool(catalog.delete, body.lora_name)
    except (AdapterNotFoundError, AdapterInUseError) as e:
        e.param = "lora_name"
        raise
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
