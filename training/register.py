"""Register a trained adapter with a running stanceserve by upload (``POST /v1/adapters``).

Sends the folder's ``adapter_config.json`` and ``adapter_model.safetensors``
with a name, a description and provenance metadata (:func:`provenance`: base model,
method, dataset hash and row count, hyperparameters, metrics summary from
``training_metrics.json``). The server validates it and serves it at once, with no
restart. Adapter metadata is public (``GET /v1/adapters`` needs no key), so the
provenance sent leaves out the recorded command line and every local path; the run
folder keeps them. :func:`admin_key_from` reads the admin key from a key file or the
environment, the forms that keep it off the command line. This module only talks
HTTP (httpx); it does not train or validate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx

from app.redaction import redact_json

logger = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """The server refused the upload or could not be reached; the message carries its error body."""


def admin_key_from(key: str | None, key_file: Path | None) -> str | None:
    """The admin key to send: the first line of ``key_file`` if given, else ``key`` (``--admin-key`` or
    ``$STANCESERVE_ADMIN_KEY``), else None.

    Raises:
        RegistrationError: ``key_file`` cannot be read or is empty.
    """
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise RegistrationError(f"cannot read the admin key file {key_file}: {e.strerror or e}") from None
        value = lines[0].strip() if lines else ""
        if not value:
            raise RegistrationError(f"the admin key file {key_file} is empty")
        return value
    return key or None


#: The ``dataset`` fields of ``training_metrics.json`` that are published (its ``path`` is a local path: not).
_PUBLIC_DATASET = ("sha256", "rows")


def provenance(folder: Path) -> dict[str, Any]:
    """Public metadata for the registry from the folder's ``training_metrics.json`` (empty if none).

    Holds ``training`` (the summary: method, base model, dataset sha256, steps, losses, DPO margins),
    ``hyperparameters``, ``dataset`` (sha256, rows and the file's name only) and ``machine`` (device, dtype).
    Not the recorded command line, nor any local path: adapter metadata is readable without a key.
    """
    path = Path(folder) / "training_metrics.json"
    if not path.exists():
        return {}
    m = json.loads(path.read_text())
    dataset = m.get("dataset", {}) if isinstance(m.get("dataset"), dict) else {}
    public_dataset = {k: dataset[k] for k in _PUBLIC_DATASET if k in dataset}
    if dataset.get("path"):
        public_dataset["file"] = Path(str(dataset["path"])).name
    machine = m.get("machine", {}) if isinstance(m.get("machine"), dict) else {}
    return redact_json({
        "training": m.get("summary", {}),
        "hyperparameters": m.get("hyperparameters", {}),
        "dataset": public_dataset,
        "machine": {k: machine[k] for k in ("device", "dtype") if k in machine},
    })


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
        metadata: defaults to :func:`provenance` of the folder. Sent redacted (:func:`app.redaction.redact_json`,
            ``admin_key`` included), as is ``description``.
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
    known = [admin_key] if admin_key else []
    meta = redact_json(metadata if metadata is not None else provenance(folder), known)
    data = {"name": name, "metadata": json.dumps(meta)}
    if description:
        data["description"] = redact_json(description, known)
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
