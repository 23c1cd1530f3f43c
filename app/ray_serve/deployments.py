"""The Ray Serve application: ``Ingress`` -> ``StanceReplica`` x N, and the ``MetricsHub``.

:func:`build_app` binds the three deployments for a :class:`~app.config.Settings`;
:func:`app_builder` is the same for ``serve run deploy/ray/serve.yaml`` (its ``args`` are settings fields).

* ``StanceReplica`` (``replicas`` of them, ``ray_replica_cpus``/``ray_replica_gpus`` each): one whole
  stanceserve app from :func:`app.main.create_app` (base model, engine, slot cache, routes), started through its
  own lifespan in the constructor, so Ray only routes to it once the model is loaded. ``serve_request`` runs a
  forwarded request through that app (:func:`app.ray_serve.asgi.call_asgi`) and streams back its head and body
  chunks. The multiplexed loader (``@serve.multiplexed``, up to ``max_loras`` stances per replica) reads the
  stance into the CPU cache; Ray's router then prefers this replica for that routing key.
* ``Ingress`` (one, no CPU reserved): the public HTTP server (FastAPI under ``@serve.ingress``). It bounds the
  body (same limits and 413 as the service), computes the :class:`~app.ray_serve.routing.Route`, calls
  ``StanceReplica`` with ``multiplexed_model_id=<key>`` and relays the answer. A generation or ``GET`` request
  whose replica fails before the first body byte (replica died, unavailable) is sent again, to another
  replica, up to :data:`ATTEMPTS` times; a stream cut after its first byte cannot be replayed without
  repeating text, so it ends there. Uploads and deletes are never replayed. ``GET /metrics`` is the merged
  metrics of every replica (:mod:`app.ray_serve.metrics_merge`).
* ``MetricsHub`` (one, no CPU reserved): keeps each replica's latest metrics snapshot.

Each response carries ``x-stanceserve-replica: <replica id>``, the ``replica`` label of its metrics.
Not here: starting Ray (:mod:`app.ray_serve.cluster`), the engine (unchanged).
"""

# No `from __future__ import annotations`: Ray Serve rebuilds the ingress methods' signatures for FastAPI,
# which then needs real annotations (a string "Request" would be read as a query parameter).
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from app.api.limits import BodySizeLimitMiddleware, route_limits
from app.config import Settings
from app.errors import NotReadyError
from app.ray_serve.asgi import ForwardedRequest, ResponseHead, asgi_lifespan, call_asgi
from app.ray_serve.metrics_merge import MetricsBoard, snapshot
from app.ray_serve.routing import GENERATION_PATHS, Route, route_of
from app.ray_serve.store_sync import StoreSync

logger = logging.getLogger(__name__)

#: Tries of one request on replicas before the ingress answers 503 (the first one included).
ATTEMPTS = 4
#: Seconds between two tries (doubled each time): Ray's router needs a moment to drop a dead replica.
RETRY_BACKOFF_S = 0.2
#: Errors that mean "the replica is gone or unreachable", not "the request failed".
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)
#: Ray Serve's request header for a multiplexed model id; when a client sends it, it replaces the routing key.
ROUTING_HEADER = "serve_multiplexed_model_id"
#: Header saying on which try (1 = the first) a replica answered.
ATTEMPTS_HEADER = "x-stanceserve-attempts"
#: Header naming the replica that answered.
REPLICA_HEADER = "x-stanceserve-replica"
#: Bodies above this many bytes are parsed for their routing key in a worker thread.
_INLINE_PARSE_BYTES = 64 * 1024
#: Hop-by-hop or recomputed headers not relayed from the replica's response.
_DROP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}

ModelFactory = Callable[[Settings], Any]


# --------------------------------------------------------------------------- metrics hub
class MetricsHub:
    """Latest metrics snapshot of each replica (``push``), served merged (``render``)."""

    def __init__(self, settings: Settings) -> None:
        self.board = MetricsBoard(ttl_s=max(10.0, 5 * settings.metrics_push_interval_s))

    def push(self, replica: str, families: list) -> None:
        self.board.put(replica, families)

    def render(self) -> bytes:
        return self.board.render()


# --------------------------------------------------------------------------- engine replica
class ReplicaBase:
    """One stanceserve app (model, engine, slots, routes) as a Ray Serve replica; see the module docstring.

    Args:
        settings: the service settings (``adapters_dir`` must be a folder every replica sees).
        model_factory: ``create_app``'s model factory (default: load ``settings.model``); tests pass tiny models.
        hub: handle of the ``MetricsHub`` deployment.

    Raises (from the constructor, so Ray restarts the replica): RuntimeError when the model fails to load.
    """

    async def __init__(self, settings: Settings, model_factory: ModelFactory | None, hub: DeploymentHandle) -> None:
        from app.main import create_app  # in the replica's process: the driver never loads the model stack

        self.settings = settings
        self.hub = hub
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.app = create_app(settings, model_factory=model_factory)
        self._lifespan = asgi_lifespan(self.app)
        await self._lifespan.__aenter__()
        state = self.app.state.service
        while not state.ready:
            if state.load_error:
                raise RuntimeError(f"replica {self.replica_id}: {state.load_error}")
            await asyncio.sleep(0.05)
        self.sync = StoreSync(state.catalog, settings.store_watch_interval_s)
        self.sync.start()
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())
        logger.info("replica %s ready: %s", self.replica_id, state.engine.model_name)

    async def _push_metrics(self) -> None:
        metrics = self.app.state.service.metrics
        while True:
            try:
                await self.hub.push.remote(self.replica_id, snapshot(metrics.registry))
            except Exception as exc:  # the hub restarting: try again next time
                logger.debug("metrics push failed: %s", exc)
            await asyncio.sleep(self.settings.metrics_push_interval_s)

    async def _load_stance(self, key: str) -> str:
        """The multiplexed "model": ``key``'s adapter checked against the store and read into the CPU cache.

        Never raises: a key that names nothing (a typo, the base model) is still "held", and the request itself
        gets the usual 404/4xx from the app.
        """
        catalog = self.app.state.service.catalog
        try:
            await asyncio.to_thread(self.sync.check, [key])
            await asyncio.to_thread(catalog.resolve, key)
        except Exception as exc:
            logger.debug("stance %s not preloaded: %s", key, exc)
        return key

    async def serve_request(self, req: ForwardedRequest) -> AsyncIterator[ResponseHead | bytes]:
        """Run ``req`` through this replica's app: yield its :class:`ResponseHead`, then its body chunks."""
        key = serve.get_multiplexed_model_id()
        if key:
            await self.stance(key)  # type: ignore[attr-defined]  # the @serve.multiplexed loader, see _replica_class
        if req.adapters:
            await asyncio.to_thread(self.sync.check, req.adapters)
        async for item in call_asgi(self.app, req):
            yield item.with_header(REPLICA_HEADER, self.replica_id) if isinstance(item, ResponseHead) else item

    def info(self) -> dict[str, Any]:
        """This replica's id and the names of its base model (requests for those need no affinity)."""
        engine = self.app.state.service.engine
        return {"replica": self.replica_id, "base_names": sorted(engine.base_names)}

    def check_health(self) -> None:
        """Ray's health probe: fails once the engine's scheduler thread has died."""
        engine = self.app.state.service.engine
        if engine is None or not engine.scheduler.alive:
            raise RuntimeError("the engine is not running")

    async def __del__(self) -> None:
        self.sync.stop()
        self._pusher.cancel()
        await self._lifespan.__aexit__(None, None, None)


def _replica_class(max_stances: int) -> type:
    """``ReplicaBase`` with its ``@serve.multiplexed`` loader holding up to ``max_stances`` routing keys."""

    class StanceReplica(ReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max_stances)
        async def stance(self, key: str) -> str:
            return await self._load_stance(key)

    return StanceReplica


# --------------------------------------------------------------------------- ingress
def _error(exc: Exception) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code)  # type: ignore[attr-defined]


def _ingress_class(settings: Settings) -> type:
    """The ``@serve.ingress`` class over a FastAPI app bounded like the service's (same body limits and 413)."""
    api = FastAPI(title="stanceserve (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_middleware(
        BodySizeLimitMiddleware, default_limit=settings.max_request_bytes, limits=route_limits(settings)
    )

    class Ingress:
        def __init__(self, settings: Settings, replicas: DeploymentHandle, hub: DeploymentHandle) -> None:
            self.settings = settings
            self.replicas = replicas
            self.hub = hub
            self._base_names: frozenset[str] | None = None

        async def _bases(self) -> frozenset[str]:
            """The base model's names (asked of a replica once; none known yet if that fails: asked again)."""
            if self._base_names is None:
                try:
                    info = await self.replicas.info.remote()
                except Exception as exc:  # no replica answers: the request itself will say why
                    logger.info("base model names not known yet: %s", type(exc).__name__)
                    return frozenset()
                self._base_names = frozenset(info["base_names"])
            return self._base_names

        @api.get("/metrics", include_in_schema=False)
        async def metrics(self) -> Response:
            """Every replica's metrics, labelled ``replica``."""
            return Response(await self.hub.render.remote(), media_type=CONTENT_TYPE_LATEST)

        @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
        async def forward(self, request: Request, path: str) -> Response:
            body = await request.body()
            req_path = "/" + path
            route = Route()
            if request.method == "POST" and req_path in GENERATION_PATHS:
                bases = await self._bases()
                if len(body) > _INLINE_PARSE_BYTES:
                    route = await asyncio.to_thread(route_of, req_path, body, bases)
                else:
                    route = route_of(req_path, body, bases)
            req = ForwardedRequest(
                method=request.method, path=req_path, query_string=request.scope.get("query_string", b""),
                headers=tuple(request.headers.raw), body=body,
                client=(request.client.host, request.client.port) if request.client else None,
                adapters=route.adapters,
            )
            pinned = request.headers.get(ROUTING_HEADER)
            if pinned:  # Ray Serve's own header: the client picks the routing key (placement only, never output)
                route = Route(pinned, route.adapters)
            replayable = request.method in ("GET", "HEAD") or req_path in GENERATION_PATHS
            return await self._relay(req, route, replayable)

        async def _relay(self, req: ForwardedRequest, route: Route, replayable: bool) -> Response:
            handle = self.replicas.options(stream=True, multiplexed_model_id=route.key or "")
            delay = RETRY_BACKOFF_S
            for attempt in range(1, ATTEMPTS + 1):
                stream = handle.serve_request.remote(req)
                try:
                    head = await stream.__anext__()
                    first = await anext(stream, None)
                    break
                except REPLICA_LOST as exc:
                    stream.cancel()
                    if not replayable or attempt == ATTEMPTS:
                        logger.warning("%s %s: replica lost (%s), not retried", req.method, req.path, type(exc).__name__)
                        return _error(NotReadyError(f"the replica serving this request failed: {type(exc).__name__}"))
                    logger.info("%s %s: replica lost (%s), try %d of %d", req.method, req.path, type(exc).__name__,
                                attempt + 1, ATTEMPTS)
                    await asyncio.sleep(delay)
                    delay *= 2
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers if k.lower() not in _DROP_HEADERS}
            headers[ATTEMPTS_HEADER] = str(attempt)
            if (head.header("content-type") or "").startswith("text/event-stream"):
                return StreamingResponse(_relay_stream(first, stream), status_code=head.status, headers=headers)
            chunks = [first] if first else []
            async for chunk in stream:
                chunks.append(chunk)
            return Response(b"".join(chunks), status_code=head.status, headers=headers)

    return serve.ingress(api)(Ingress)


async def _relay_stream(first: bytes | None, stream: Any) -> AsyncIterator[bytes]:
    """``first`` then the rest of ``stream``; the replica's generator is cancelled if the client goes away."""
    try:
        if first:
            yield first
        async for chunk in stream:
            yield chunk
    except REPLICA_LOST as exc:  # cut after it started: replaying would repeat text; end it as the app ends errors
        logger.warning("stream cut, its replica was lost: %s", type(exc).__name__)
        err = NotReadyError(f"the replica serving this stream failed: {type(exc).__name__}")
        yield f"data: {json.dumps(err.to_body())}\n\ndata: [DONE]\n\n".encode()
    finally:
        stream.cancel()


# --------------------------------------------------------------------------- the application
def build_app(settings: Settings, model_factory: ModelFactory | None = None) -> Any:
    """The bound Ray Serve application (pass it to ``serve.run``).

    Replicas accept up to ``2 * max_batch_size`` requests in flight each (Ray's ``max_ongoing_requests``:
    past that, the router sends a stance's requests to another replica rather than queue them), and hold up to
    ``max_loras`` routing keys (the slot count) in their multiplexing LRU. A relative ``adapters_dir`` is made
    absolute here (on a cluster it must name the same shared folder on every host).
    """
    # a relative store path means "from where the command ran", not each Ray worker's working folder
    settings = settings.model_copy(update={"adapters_dir": settings.adapters_dir.expanduser().resolve()})
    hub = serve.deployment(MetricsHub, name="MetricsHub", num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(
        settings
    )
    replicas = serve.deployment(
        _replica_class(settings.max_loras),
        name="StanceReplica",
        num_replicas=settings.replicas,
        max_ongoing_requests=2 * settings.max_batch_size,
        ray_actor_options={"num_cpus": settings.ray_replica_cpus, "num_gpus": settings.ray_replica_gpus},
        health_check_period_s=5,
        graceful_shutdown_timeout_s=5,
    ).bind(settings, model_factory, hub)
    ingress = serve.deployment(
        _ingress_class(settings),
        name="Ingress",
        num_replicas=1,
        max_ongoing_requests=settings.replicas * (settings.max_batch_size + settings.max_waiting),
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(settings, replicas, hub)


def app_builder(args: dict[str, Any]) -> Any:
    """``serve run``'s application builder: ``args`` are :class:`Settings` fields (``STANCESERVE_*`` fill the rest)."""
    return build_app(Settings(**(args or {})))

