"""Operational routes: ``/health`` (process up), ``/ready`` (model loaded), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.responses import OPS_ERRORS, TEXT_RESPONSE, errors
from app.deps import MetricsDep, StateDep
from app.errors import NotReadyError

router = APIRouter(tags=["ops"], responses=OPS_ERRORS)


@router.get("/health")
async def health(state: StateDep) -> dict[str, str]:
    """200 while the process runs, even before the model has loaded.

    Once the model is loaded the body also says what is served: ``device`` (``cpu``, ``cuda:0``...) and
    ``dtype`` (``float32``, ``bfloat16``, ``float16``; ``--dtype auto`` picks bfloat16 on CPUs with native bf16).
    """
    if state.engine is None:
        return {"status": "ok"}
    return {"status": "ok", "model": state.engine.model_name, **state.engine.served}


@router.get("/ready", responses=errors(503))
async def ready(state: StateDep) -> JSONResponse:
    """200 once the base model is loaded and the engine runs; 503 ``not_ready`` before (or if loading failed)."""
    if state.engine is None:
        if state.load_error:
            raise NotReadyError(f"model failed to load: {state.load_error}")
        raise NotReadyError("model is loading")
    return JSONResponse(
        {
            "status": "ready",
            "model": state.engine.model_name,
            **state.engine.served,
            "load_seconds": state.load_seconds,
            "adapters": len(state.store) if state.store is not None else 0,
        }
    )


@router.get("/metrics", response_class=Response, responses=TEXT_RESPONSE)
async def metrics(m: MetricsDep) -> Response:
    """Prometheus text exposition."""
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
