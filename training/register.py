"""Register a trained adapter with a running stanceserve by upload (``POST /v1/adapters``).

Sends the folder's ``adapter_config.json`` and ``adapter_model.safetensors``
with a name, a description and provenance metadata (base model, method,
dataset hash, metrics summary from ``training_metrics.json``). The server
validates it and serves it at once, with no restart. This module only talks
HTTP (httpx); it does not train or validate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """The server refused the upload or could not be reached; the message carries its error body."""


def provenance(folder: Path) -> dict[str, Any]:
    """Metadata for the registry from the folder's ``training_metrics.json`` (empty if none)."""
    path = Path(folder) / "training_metrics.json"
    if not path.exists():
        return {}
    m = json.loads(path.read_text())
    return {
        "training": m.get("summary", {}),
        "hyperparameters": m.get("hyperparameters", {}),
        "dataset": m.get("dataset", {}),
        "command": m.get("command"),
    }


def register_adapter(
    url: str,
    name: str,
    folder: Path,
    *,
    admin_key: str | None = None,
    description: str | None = None,
    metadata: dict[str, Any] | None = None,
    replace: bool = False,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Upload ``folder`` to the server at ``url`` as adapter ``name``.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000``.
        admin_key: sent as ``Authorization: Bearer``; not needed from loopback when the server has none.
        metadata: defaults to :func:`provenance` of the folder.
        replace: upload as a new version of an existing name (``?replace=true``).

    Returns:
        The server's adapter record (``GET /v1/adapters/{name}`` shape).

    Raises:
        RegistrationError: connection failure or a non-2xx answer (its JSON error message included).
    """
    folder = Path(folder)
    files = []
    for fname in ("adapter_config.json", "adapter_model.safetensors"):
        p = folder / fname
        if not p.exists():
            raise RegistrationError(f"{p} is missing: not a peft adapter folder")
        files.append(("files", (fname, p.read_bytes(), "application/octet-stream")))
    data = {"name": name, "metadata": json.dumps(metadata if metadata is not None else provenance(folder))}
    if description:
        data["description"] = description
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    endpoint = f"{url.rstrip('/')}/v1/adapters" + ("?replace=true" if replace else "")
    try:
        r = httpx.post(endpoint, data=data, files=files, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise RegistrationError(f"cannot reach {url}: {e}") from e
    if r.status_code >= 300:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text[:500]
        raise RegistrationError(f"server refused the adapter (HTTP {r.status_code}): {msg}")
    logger.info("registered %s at %s", name, url)
    return r.json()
