"""FastAPI dependencies: the objects the lifespan built, and the admin check.

Routes declare what they need with the ``Annotated`` aliases below
(``EngineDep``, ``StoreDep``...). Heavy objects are built once in
:func:`app.main.lifespan` and kept on :class:`ServiceState`; nothing here
builds them. While the model is still loading, engine-dependent routes answer
HTTP 503.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.engine.engine import Engine
from app.errors import ForbiddenError, NotReadyError, UnauthorizedError
from app.metrics import Metrics
from app.registry.store import AdapterStore


@dataclass
class ServiceState:
    """Everything the service holds for its lifetime.

    Attributes:
        engine, store: set once the base model has loaded (``None`` before).
        load_error: why loading failed, if it did.
        started_at: ``time.time()`` at start, seconds since the epoch.
    """

    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    store: AdapterStore | None = None
    load_error: str | None = None
    load_seconds: float | None = None
    started_at: float = 0.0

    @property
    def ready(self) -> bool:
        return self.engine is not None


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


def get_engine(state: StateDep) -> Engine:
    """The engine; raises :class:`NotReadyError` (503) while the model loads or if it failed."""
    if state.engine is None:
        raise NotReadyError(f"model failed to load: {state.load_error}" if state.load_error else "model is loading")
    return state.engine


def get_store(state: StateDep) -> AdapterStore:
    if state.store is None:
        raise NotReadyError("model is loading")
    return state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[AdapterStore, Depends(get_store)]


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (the client address) is a loopback address (127.0.0.0/8 or ::1)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def require_admin(request: Request, settings: SettingsDep) -> None:
    """Guard of mutating endpoints.

    With ``admin_key`` set, the request needs ``Authorization: Bearer <key>``; without one,
    only loopback clients may mutate.

    Raises:
        UnauthorizedError: missing or wrong key (401).
        ForbiddenError: no key configured and the client is not on loopback (403).
    """
    key = settings.admin_key.get_secret_value() if settings.admin_key else None
    if key:
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
            raise UnauthorizedError("a valid admin key is required: Authorization: Bearer <STANCESERVE_ADMIN_KEY>")
        return
    client = request.client.host if request.client else None
    if not is_loopback(client):
        raise ForbiddenError(
            "no admin key is configured, so adapters can only be changed from the server's own machine; "
            "set STANCESERVE_ADMIN_KEY to allow remote admin calls"
        )


AdminDep = Depends(require_admin)
