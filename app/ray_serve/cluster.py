"""Starting Ray and the stanceserve application: ``stanceserve serve --ray`` and the tests' local cluster.

:func:`start_ray` joins ``Settings.ray_address`` (a real cluster: ``ray start --head`` on one GPU host,
``ray start --address=<head>:6379`` on the others) or, without one, starts a one-machine cluster **bound to
loopback only** (Ray's own switch for that, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, makes every Ray process
listen on 127.0.0.1; without it Ray's gRPC servers listen on every interface). :func:`deploy` starts Serve's
HTTP proxy on ``Settings.host``/``port`` and runs :func:`app.ray_serve.deployments.build_app`; :func:`serve_forever`
is the CLI's blocking loop. It does not build models itself (each replica does, in its own process).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from app.config import Settings

logger = logging.getLogger(__name__)

#: Ray's switch that makes a local cluster use 127.0.0.1 (it is off by default on Linux).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: The Serve application's name.
APP_NAME = "stanceserve"


def start_ray(address: str | None = None, *, num_cpus: float | None = None, **init_kwargs: Any) -> None:
    """Connect to the Ray cluster at ``address``, or start a local one on loopback (``num_cpus`` CPUs).

    A no-op when Ray is already initialised in this process. ``init_kwargs`` go to ``ray.init``.
    """
    import ray  # the optional [ray] extra: loaded only when serving with --ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, **init_kwargs)
        return
    os.environ.update(LOOPBACK_ENV)  # inherited by the raylet and every worker it starts
    from ray._private import ray_constants  # [ray] extra

    ray_constants.ENABLE_RAY_CLUSTER = False  # this process may have imported ray before the variable was set
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **init_kwargs)


def deploy(settings: Settings, model_factory: Any = None) -> Any:
    """Start Serve's HTTP proxy on ``settings.host:port`` and run the application; returns its ingress handle.

    Blocks until every replica has loaded the model. Ray must be initialised (:func:`start_ray`).
    """
    from ray import serve  # [ray] extra

    from app.ray_serve.deployments import build_app  # imports ray.serve at its top: [ray] extra

    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(build_app(settings, model_factory), name=APP_NAME, route_prefix="/")


def shutdown() -> None:
    """Stop Serve and disconnect from (or stop the local) Ray."""
    import ray  # the optional [ray] extra: loaded only when serving with --ray
    from ray import serve  # [ray] extra

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(settings: Settings) -> None:
    """``stanceserve serve --ray``: start (or join) Ray, deploy, serve until SIGINT/SIGTERM, then shut down."""
    local_cpus = None
    if not settings.ray_address:  # room for every replica on the local host, even if it oversubscribes its cores
        local_cpus = max(float(os.cpu_count() or 1), settings.replicas * settings.ray_replica_cpus)
    start_ray(settings.ray_address, num_cpus=local_cpus)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(settings)
        logger.info(
            "serving %d replica(s) through Ray Serve on http://%s:%d", settings.replicas, settings.host, settings.port
        )
        stop.wait()
    finally:
        shutdown()
