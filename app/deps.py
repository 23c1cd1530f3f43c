"""FastAPI dependencies: the objects the lifespan built, and the admin check.

Routes declare what they need with the ``Annotated`` aliases below
(``EngineDep``, ``CatalogDep``...). Heavy objects are built once in
:func:`app.main.lifespan` and kept on :class:`ServiceState`; nothing here
builds them. While the model is still loading, engine-dependent routes answer
HTTP 503.

The admin check (:func:`require_admin`) takes the bearer key through FastAPI's
``HTTPBearer`` (so OpenAPI shows the scheme). With no key configured it allows
loopback clients only, and does not trust proxy headers unless the TCP peer is
listed in ``Settings.trusted_proxies``.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.catalog import StanceCatalog
from app.config import Settings
from app.engine import Engine
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
    catalog: StanceCatalog | None = None
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


def get_catalog(state: StateDep) -> StanceCatalog:
    """The stance catalog; raises :class:`NotReadyError` (503) while the model loads."""
    if state.catalog is None:
        get_engine(state)  # the same 503 message
        raise NotReadyError("model is loading")
    return state.catalog


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]
CatalogDep = Annotated[StanceCatalog, Depends(get_catalog)]


#: Headers a reverse proxy sets to pass on the client address. Any of them from an untrusted peer means the
#: request was relayed, so the TCP peer is not the client.
FORWARDING_HEADERS = {"forwarded": "Forwarded", "x-forwarded-for": "X-Forwarded-For", "x-real-ip": "X-Real-IP"}

#: The admin key as an OpenAPI security scheme (``Authorization: Bearer <key>``). ``auto_error=False``: a missing
#: or non-bearer header yields ``None`` and :func:`require_admin` decides (no key configured -> loopback rule).
admin_bearer = HTTPBearer(
    scheme_name="AdminKey",
    description="The admin key (STANCESERVE_ADMIN_KEY) as a bearer token; mutating adapter routes need it when set.",
    auto_error=False,
)

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_ip(text: str | None) -> _IP | None:
    """One address as proxies write it (bare, quoted, ``v4:port``, ``[v6]:port``), or ``None`` if it is not an IP.

    IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) are returned as IPv4. ``unknown`` and obfuscated
    identifiers (``_hidden``) of RFC 7239 give ``None``.
    """
    if not text:
        return None
    t = text.strip().strip('"').strip()
    if t.startswith("["):
        end = t.find("]")
        t = t[1:end] if end > 0 else ""
    elif t.count(":") == 1:
        t = t.partition(":")[0]
    try:
        addr = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a client address) is a loopback address (127.0.0.0/8, ::1, ::ffff:127.x) or ``localhost``."""
    addr = _parse_ip(host)
    if addr is None:
        return host == "localhost"
    return addr.is_loopback


@functools.lru_cache(maxsize=8)
def _networks(entries: tuple[str, ...]) -> tuple[_Network, ...]:
    """``trusted_proxies`` parsed; entries that do not parse are skipped (trusting fewer proxies fails closed)."""
    out = []
    for e in entries:
        try:
            out.append(ipaddress.ip_network(e.strip(), strict=False))
        except ValueError:
            continue
    return tuple(out)


def _in_networks(addr: _IP | None, networks: tuple[_Network, ...]) -> bool:
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


def _forwarded_for(values: list[str]) -> list[str | None]:
    """The ``for=`` of each hop of ``Forwarded`` headers (RFC 7239), in order; ``None`` for a hop without one."""
    hops: list[str | None] = []
    for value in values:
        for element in value.split(","):
            found = None
            for pair in element.split(";"):
                k, sep, v = pair.strip().partition("=")
                if sep and k.strip().lower() == "for":
                    found = v.strip()
            hops.append(found)
    return hops


def _client_of_chain(hops: list[str | None], networks: tuple[_Network, ...]) -> _IP | None:
    """The client of a proxy chain (leftmost hop first): the rightmost hop that is not a trusted proxy.

    Hops left of it were written by the client itself and are ignored. If every hop is a trusted proxy, the
    leftmost one is the client. ``None`` when that hop is not an IP address (``unknown``, obfuscated, garbage).
    """
    addrs = [_parse_ip(h) for h in hops]
    for addr in reversed(addrs):
        if not _in_networks(addr, networks):
            return addr
    return addrs[0] if addrs else None


def admin_refusal(request: Request, trusted_proxies: list[str] | tuple[str, ...] = ()) -> str | None:
    """Why a request may not use the admin routes when no admin key is configured, or ``None`` if it may.

    Allowed: a loopback TCP peer that sends none of :data:`FORWARDING_HEADERS`; or a peer in
    ``trusted_proxies`` whose ``X-Forwarded-For`` and/or ``Forwarded: for=`` name a loopback client (every one
    of these two headers present must; ``X-Real-IP`` is not used to grant access). Anything else is refused,
    notably a loopback peer that relays for someone (a reverse proxy on the same host that is not trusted).

    Args:
        request: the incoming request (its TCP peer and headers are read).
        trusted_proxies: IPs or CIDRs of trusted reverse proxies (``Settings.trusted_proxies``).
    """
    host = request.client.host if request.client else None
    shown = host or "(unknown)"
    relayed = [h for h in FORWARDING_HEADERS if h in request.headers]
    networks = _networks(tuple(trusted_proxies))
    if not _in_networks(_parse_ip(host), networks):
        if relayed:
            names = ", ".join(FORWARDING_HEADERS[h] for h in relayed)
            return (
                f"the request came through a proxy ({names} header) at {shown}, which is not in trusted_proxies, "
                "so the client's address is unknown"
            )
        if not is_loopback(host):
            return f"the client {shown} is not on loopback"
        return None
    xff = request.headers.getlist("x-forwarded-for")
    fwd = request.headers.getlist("forwarded")
    if not xff and not fwd:
        if relayed:
            return (
                f"the trusted proxy {shown} sent no X-Forwarded-For or Forwarded header, so the client's address "
                "is unknown"
            )
        return None if is_loopback(host) else f"the client {shown} is not on loopback"
    claims = []
    if xff:
        claims.append(("X-Forwarded-For", _client_of_chain([h for v in xff for h in v.split(",")], networks)))
    if fwd:
        claims.append(("Forwarded", _client_of_chain(_forwarded_for(fwd), networks)))
    for header, client in claims:
        if client is None:
            return f"the {header} header from the trusted proxy {shown} gives no usable client address"
        if not client.is_loopback:
            return f"the client {client} (from {header} via the trusted proxy {shown}) is not on loopback"
    return None


def require_admin(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)],
) -> None:
    """Guard of mutating endpoints.

    With ``admin_key`` set, the request needs ``Authorization: Bearer <key>`` (compared in constant time),
    from any address. Without one, only clients on the server's own machine may mutate, as decided by
    :func:`admin_refusal` (a loopback peer with no proxy headers, or a loopback client named by a trusted
    proxy, see ``Settings.trusted_proxies``).

    Raises:
        UnauthorizedError: a key is configured and the bearer token is missing or wrong (401).
        ForbiddenError: no key is configured and the client is not on loopback, or the request was relayed by a
            proxy that is not trusted (403); the message says which.
    """
    key = settings.admin_key.get_secret_value() if settings.admin_key else None
    if key:
        given = credentials.credentials.strip() if credentials is not None else ""
        if not given or not secrets.compare_digest(given.encode(), key.encode()):
            raise UnauthorizedError("a valid admin key is required: Authorization: Bearer <STANCESERVE_ADMIN_KEY>")
        return
    reason = admin_refusal(request, settings.trusted_proxies)
    if reason is not None:
        raise ForbiddenError(
            f"{reason}; with no admin key configured, adapters can only be changed from the server's own machine. "
            "Set STANCESERVE_ADMIN_KEY to allow remote admin calls, or list a reverse proxy in "
            "STANCESERVE_TRUSTED_PROXIES"
        )


AdminDep = Depends(require_admin)
