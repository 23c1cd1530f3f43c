"""The routing key of a request: which stance a replica should already hold to serve it (no Ray imports).

Ray Serve's model multiplexing routes a request with ``multiplexed_model_id=<key>`` to a replica that has
loaded ``<key>`` (it falls back to the least-loaded replicas when none has, or when those are full). The key:

* a single adapter (``"model": "calm"``): its name;
* a weighted blend (``"stances": {...}``): its heaviest member (largest ``|weight|``; ties: the smallest name),
  so blends that share a dominant adapter land where that adapter already sits in a slot;
* any other ``model`` string (a named blend, an unknown name): that string;
* the base model, a body that is not JSON, and every other route: no key (any replica).

It does not validate anything: the replica answers malformed requests with the usual 4xx.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

#: Routes that generate (routed by stance; retried on another replica when theirs dies before answering).
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(frozen=True)
class Route:
    """Where a request goes.

    Attributes:
        key: the multiplexed model id (``None``: any replica).
        adapters: every name the request references (``model`` unless it is the base model, and the blend's
            members), which the replica checks against the shared store before serving.
    """

    key: str | None = None
    adapters: tuple[str, ...] = ()


def heaviest(stances: dict) -> str | None:
    """The member of a blend ``{name: weight}`` with the largest ``|weight|`` (ties: smallest name), or ``None``.

    Terms that are not ``str: finite number`` are ignored (the replica refuses them with a 4xx anyway).
    """
    terms = [
        (n, float(w)) for n, w in stances.items()
        if isinstance(n, str) and isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
    ]
    return min(terms, key=lambda t: (-abs(t[1]), t[0]))[0] if terms else None


def route_of(path: str, body: bytes, base_names: frozenset[str] | set[str]) -> Route:
    """The :class:`Route` of a request to ``path`` with JSON ``body`` (bytes); ``base_names``: the base model's names.

    Blocking for large bodies (``json.loads``): call it off the event loop above a few KiB.
    """
    if path not in GENERATION_PATHS:
        return Route()
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return Route()
    if not isinstance(obj, dict):
        return Route()
    model, stances = obj.get("model"), obj.get("stances")
    names: list[str] = []
    if isinstance(model, str) and model and model not in base_names:
        names.append(model)
    if isinstance(stances, dict) and stances:
        names.extend(n for n in stances if isinstance(n, str) and n not in names)
        return Route(heaviest(stances), tuple(names))
    return Route(names[0] if names else None, tuple(names))
