"""Adapter routes: list, show, upload, delete, and vLLM's load/unload endpoints.

Uploads are validated against the base model by the store before anything is
written; the adapter is servable as soon as the response returns, with no
restart. Mutating routes need the admin key (see :func:`app.deps.require_admin`).
The blocking work (hashing, parsing safetensors, writing) runs in a worker
thread so the event loop keeps streaming other requests.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.deps import AdminDep, EngineDep, MetricsDep, SettingsDep, StoreDep
from app.engine.engine import Engine
from app.errors import AdapterTooLargeError, AdapterValidationError
from app.metrics import Metrics
from app.registry.adapter import AdapterRecord, AdapterWeights
from app.registry.store import AdapterStore
from app.registry.upload import stage_upload
from app.schemas import AdapterInfo, AdapterList, LoadLoRARequest, UnloadLoRARequest

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["adapters"])

#: Form fields that are not files (everything else that is a file is part of the upload).
_TEXT_FIELDS = {"name", "description", "metadata"}


def _info(rec: AdapterRecord) -> AdapterInfo:
    return AdapterInfo(**rec.to_public())


def _registered(engine: Engine, store: AdapterStore, metrics: Metrics, weights: AdapterWeights, name: str) -> None:
    engine.forget_adapter(name)  # older versions no running request holds
    engine.preload(weights)
    metrics.adapters_registered.set(len(store))


@router.get("/adapters", response_model=AdapterList)
async def list_adapters(store: StoreDep) -> AdapterList:
    """Every registered adapter, sorted by name."""
    return AdapterList(data=[_info(r) for r in store.list()])


@router.get("/adapters/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, store: StoreDep) -> AdapterInfo:
    """One adapter: rank, alpha, target modules, size, sha256, created time, description, metadata."""
    return _info(store.get(name))


@router.post("/adapters", response_model=AdapterInfo, status_code=status.HTTP_201_CREATED, dependencies=[AdminDep])
async def upload_adapter(
    request: Request,
    engine: EngineDep,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    replace: bool = Query(False, description="Replace an existing adapter of that name (new version)."),
) -> AdapterInfo:
    """Register a peft LoRA adapter from a multipart upload.

    Form: ``name`` (required), ``description``, ``metadata`` (a JSON object), and either the
    files ``adapter_config.json`` + ``adapter_model.safetensors`` or one ``.zip``/``.tar.gz``
    of such a folder (file field names are free).
    """
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_adapter_bytes + 1024 * 1024:
        raise AdapterTooLargeError(
            f"upload of {int(length)} bytes exceeds the limit of {settings.max_adapter_bytes} bytes", param="files"
        )
    form = await request.form(max_files=8, max_fields=16)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise AdapterValidationError("form field 'name' is required", param="name")
        description = form.get("description")
        description = description if isinstance(description, str) and description else None
        metadata = None
        raw_meta = form.get("metadata")
        if isinstance(raw_meta, str) and raw_meta:
            try:
                metadata = json.loads(raw_meta)
            except json.JSONDecodeError as e:
                raise AdapterValidationError(f"metadata is not valid JSON: {e}", param="metadata") from e
            if not isinstance(metadata, dict):
                raise AdapterValidationError("metadata must be a JSON object", param="metadata")
        files = [
            (v.filename or k, v.file) for k, v in form.multi_items() if isinstance(v, UploadFile) and k not in _TEXT_FIELDS
        ]
        if not files:
            raise AdapterValidationError(
                "no files: send adapter_config.json and adapter_model.safetensors, or one .zip/.tar.gz", param="files"
            )

        def work() -> tuple[AdapterRecord, AdapterWeights]:
            tmp = Path(tempfile.mkdtemp(prefix="stanceserve-upload-"))
            try:
                staged = stage_upload(files, tmp / "adapter", max_bytes=settings.max_adapter_bytes)
                return store.add(name, staged, description=description, metadata=metadata, replace=replace)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        rec, weights = await run_in_threadpool(work)
    finally:
        await form.close()
    _registered(engine, store, metrics, weights, rec.name)
    logger.info("registered adapter %s (rank %d, %d bytes)", rec.key, rec.rank, rec.size_bytes)
    return _info(rec)


@router.delete("/adapters/{name}", response_model=AdapterInfo, dependencies=[AdminDep])
async def delete_adapter(name: str, engine: EngineDep, store: StoreDep, metrics: MetricsDep) -> AdapterInfo:
    """Unregister an adapter; requests already running on it finish normally."""
    rec = await run_in_threadpool(store.delete, name)
    engine.forget_adapter(name)
    metrics.adapters_registered.set(len(store))
    return _info(rec)


@router.post("/load_lora_adapter", response_class=PlainTextResponse, dependencies=[AdminDep])
async def load_lora_adapter(
    body: LoadLoRARequest, engine: EngineDep, store: StoreDep, metrics: MetricsDep
) -> PlainTextResponse:
    """vLLM-compatible: register the adapter folder ``lora_path`` on the server's disk as ``lora_name``."""
    rec, weights = await run_in_threadpool(store.register_path, body.lora_name, Path(body.lora_path))
    _registered(engine, store, metrics, weights, rec.name)
    return PlainTextResponse(f"Success: LoRA adapter '{rec.name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse, dependencies=[AdminDep])
async def unload_lora_adapter(
    body: UnloadLoRARequest, engine: EngineDep, store: StoreDep, metrics: MetricsDep
) -> PlainTextResponse:
    """vLLM-compatible: unregister ``lora_name``."""
    await run_in_threadpool(store.delete, body.lora_name)
    engine.forget_adapter(body.lora_name)
    metrics.adapters_registered.set(len(store))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
