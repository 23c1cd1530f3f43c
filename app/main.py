"""The FastAPI application: :func:`create_app` and its lifespan.

The lifespan builds the heavy objects once: it starts loading the base model
in a background thread (so ``/health`` answers at once and ``/ready`` turns 200
when loading ends), then opens the adapter store (seeding a new default one with
the shipped adapters, :mod:`app.registry.seed`, and registering every adapter on
disk again), builds the engine and starts its scheduler thread. Shutdown stops
the engine. Routes live in :mod:`app.api.routes`; errors map to HTTP in
:mod:`app.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from fastapi import FastAPI

from app.api.docs import install_offline_docs
from app.api.error_metrics import WARM_UP_EXTENSION, ErrorMetricsMiddleware
from app.api.limits import BodySizeLimitMiddleware, route_limits
from app.api.routes import adapters, blend_export, health, openai, playground, stances
from app.catalog import StanceCatalog
from app.config import Settings
from app.deps import ServiceState
from app.engine import Engine, EngineConfig
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.model_loader import cpu_has_native_bf16, load_base_model
from app.registry.seed import empty_store_warning, seed_store
from app.registry.store import AdapterStore
from app.registry.validation import linear_shapes

logger = logging.getLogger(__name__)

ModelFactory = Callable[[Settings], Any]


def build_engine(state: ServiceState, loaded: Any) -> None:
    """Open the store and start the engine around an already loaded model (``LoadedModel``)."""

    s = state.settings
    if s.seeds_store():
        seed_store(s.adapters_dir)
    store = AdapterStore(
        s.adapters_dir,
        linear_shapes(loaded.model),
        max_rank=s.max_lora_rank,
        max_bytes=s.max_adapter_bytes,
        reserved_names={loaded.name},
        max_json_depth=s.max_json_depth,
    )
    records = store.scan()
    if not records:
        logger.warning(empty_store_warning(s.adapters_dir))
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        loaded.name,
        loaded.eos_token_ids,
        config=EngineConfig.from_settings(s),
        store=store,
        aliases=(s.model, loaded.source),
    )
    if state.metrics is not None:
        state.metrics.attach(engine)
    engine.start()
    state.store = store
    state.catalog = StanceCatalog(store, engine, state.metrics)
    state.engine = engine
    if state.metrics is not None:
        state.metrics.model_info.info({"model": loaded.name, **engine.served,
                                       "cpu_native_bf16": str(cpu_has_native_bf16()).lower()})
    logger.info(
        "ready: model %s on %s (%s), %d adapters registered from %s: %s",
        loaded.name, loaded.device, loaded.dtype, len(records), s.adapters_dir,
        ", ".join(r.name for r in records) or "none",
    )


def _load(state: ServiceState, factory: ModelFactory) -> None:
    t0 = time.perf_counter()
    try:
        if state.settings.torch_threads:
            torch.set_num_threads(state.settings.torch_threads)
        loaded = factory(state.settings)
        build_engine(state, loaded)
        state.load_seconds = time.perf_counter() - t0
        logger.info("start-up took %.1f s", state.load_seconds)
    except Exception as e:
        logger.exception("model loading failed")
        state.load_error = f"{type(e).__name__}: {e}"


async def _warm_routes(app: FastAPI) -> None:
    """Send one in-process request that walks every router, before the server takes traffic.

    FastAPI builds a router's route state (its pydantic fields) lazily, on the event loop, at the first
    request that reaches it: 20-200 ms during which ``/health`` and every stream stall. An unknown path
    visits every router, so it builds them all now.
    """
    scope = {
        "type": "http", "http_version": "1.1", "method": "GET", "scheme": "http", "path": "/-/warm-up",
        "raw_path": b"/-/warm-up", "root_path": "", "query_string": b"", "headers": [],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
        "extensions": {WARM_UP_EXTENSION: {}},  # not a client's request: its 404 is not counted as an error
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app(scope, receive, send)


def create_app(settings: Settings | None = None, *, model_factory: ModelFactory | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: configuration (default: from the environment).
        model_factory: returns a ``LoadedModel`` for the settings (default:
            :func:`app.model_loader.load_base_model`); tests pass tiny models here.
    """
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings=settings, metrics=Metrics(), started_at=time.time())
        app.state.service = state
        if settings.admin_key:
            logger.info("admin endpoints require the admin key (Authorization: Bearer ...)")
        else:
            logger.warning(
                "no STANCESERVE_ADMIN_KEY set: adapter upload/delete are allowed from loopback clients only"
            )
        factory = model_factory
        if factory is None:
            factory = load_base_model
        loader = threading.Thread(target=_load, args=(state, factory), name="stanceserve-load", daemon=True)
        loader.start()
        await _warm_routes(app)
        try:
            yield
        finally:
            loader.join(timeout=0.1)
            if state.engine is not None:
                state.engine.stop()

    app = FastAPI(
        title="stanceserve",
        version="0.1.0",
        description="One resident base model; every request picks a LoRA stance or a weighted blend.",
        lifespan=lifespan,
        docs_url=None,  # served from the package, not a CDN: app.api.docs
        redoc_url=None,
    )
    install_offline_docs(app)
    install_error_handlers(app)
    # last added = outermost: bodies are bounded before anything reads them
    app.add_middleware(BodySizeLimitMiddleware, default_limit=settings.max_request_bytes, limits=route_limits(settings))
    app.add_middleware(ErrorMetricsMiddleware)  # outermost: it counts the 413s above too
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(adapters.router)
    app.include_router(stances.router)
    app.include_router(blend_export.router)
    app.include_router(playground.router)
    return app
