"""The small JSON files beside a stored adapter: ``stance.json`` and ``training_metrics.json``.

``stance.json`` is written by :class:`app.registry.store.AdapterStore` (``{version,
created, description, metadata, sha256, size}``); ``training_metrics.json`` is written by a
training run (:mod:`training`) and only its ``summary`` object is used. Both may have been
edited or planted by hand, so both are read with a size limit (:data:`MAX_SIDE_JSON_BYTES`)
and a nesting-depth limit checked before parsing
(:func:`app.registry.jsonread.loads_limited`). Both are optional: a missing or bad one is
logged and ignored, never fatal.

:func:`check_description_metadata` checks, before an adapter is stored, that what goes
into its ``stance.json`` will pass those limits when it is read back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from app.errors import AdapterValidationError
from app.registry.files import read_prefix
from app.registry.jsonread import MAX_JSON_DEPTH, json_depth, loads_limited

logger = logging.getLogger(__name__)

STANCE_FILE = "stance.json"
TRAINING_METRICS_FILE = "training_metrics.json"
#: Largest ``stance.json`` / ``training_metrics.json`` read, in bytes.
MAX_SIDE_JSON_BYTES = 1024 * 1024
#: Bytes of a ``stance.json`` kept for its fields other than description and metadata.
_STANCE_OVERHEAD = 4096


def read_json_object(path: Path, max_depth: int) -> dict[str, Any] | None:
    """The JSON object in the file ``path``, or None.

    None (with a warning logged) when the file is missing, unreadable, larger than
    :data:`MAX_SIDE_JSON_BYTES`, nested deeper than ``max_depth``, not valid JSON, or
    holds something other than an object. Never raises for the file's content.
    """
    try:
        if not path.is_file():
            return None
        raw = read_prefix(path, MAX_SIDE_JSON_BYTES)
        obj = loads_limited(raw, max_depth=max_depth, param=path.name, max_bytes=MAX_SIDE_JSON_BYTES)
    except OSError as exc:
        logger.warning("%s is unreadable; ignored: %s", path, exc)
        return None
    except AdapterValidationError as exc:
        logger.warning("%s ignored: %s", path, exc.message)
        return None
    return obj if isinstance(obj, dict) else None


def stance_version(folder: Path, max_depth: int) -> int:
    """The ``version`` in ``folder/stance.json`` (an integer >= 1); 1 if missing or unreadable."""
    stance = read_json_object(Path(folder) / STANCE_FILE, max_depth) or {}
    version = stance.get("version", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 1 else 1


def disk_stamp(folder: Path, max_depth: int) -> tuple[int, float, str | None] | None:
    """``(version, created, sha256)`` of the stored adapter in ``folder`` as on disk now; ``None`` if it has none.

    From ``stance.json``; a folder without one (copied in by hand) is ``(1, mtime of the safetensors, None)``,
    as :meth:`app.registry.store.AdapterStore.scan` records it. Every version the store writes gets a new
    ``created``, so the stamp changes on every replace, even with the same content. Reads about 300 bytes.
    """
    stance = read_json_object(Path(folder) / STANCE_FILE, max_depth)
    if stance is None:
        try:
            return 1, (Path(folder) / "adapter_model.safetensors").stat().st_mtime, None
        except OSError:
            return None
    version, created, sha256 = stance.get("version"), stance.get("created"), stance.get("sha256")
    if not (isinstance(version, int) and isinstance(created, (int, float)) and isinstance(sha256, str)):
        return None
    return version, float(created), sha256


def stamp_matches(stamp: tuple[int, float, str | None], record: Any) -> bool:
    """Whether a :func:`disk_stamp` describes ``record`` (an ``AdapterRecord``); no sha256 matches on the rest."""
    return stamp[:2] == (record.version, record.created) and stamp[2] in (None, record.sha256)


def training_metadata(folder: Path, *, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """``{"training": <summary>}`` from ``folder/training_metrics.json`` if it has a ``summary`` object, else ``{}``.

    A missing file, or one over :data:`MAX_SIDE_JSON_BYTES`, nested deeper than
    ``max_depth`` or not valid JSON, gives ``{}`` (logged). The result is nested at most
    ``max_depth`` levels.
    """
    metrics = read_json_object(Path(folder) / TRAINING_METRICS_FILE, max_depth)
    summary = (metrics or {}).get("summary")
    return {"training": summary} if isinstance(summary, dict) else {}


def check_description_metadata(description: Any, metadata: Any, *, max_depth: int) -> dict[str, Any]:
    """Check an adapter's description and metadata before they are written to ``stance.json``.

    Args:
        description: free text, or None.
        metadata: a JSON-able dict, or None (taken as ``{}``).
        max_depth: deepest nesting of arrays/objects allowed in ``metadata`` (``stance.json``,
            which wraps it, is then at most ``max_depth + 1`` deep).

    Returns:
        A deep copy of ``metadata`` as JSON gives it back (tuples become lists, keys strings),
        so the record equals what a later scan reads.

    Raises:
        AdapterValidationError: a description that is not a string (``param="description"``);
            metadata that is not a dict, not JSON-able (NaN, objects), nested deeper than
            ``max_depth`` (``param="metadata"``); or both together over
            :data:`MAX_SIDE_JSON_BYTES` minus 4 KiB of JSON (``param`` = the larger).
    """
    if description is not None and not isinstance(description, str):
        raise AdapterValidationError("description must be a string", param="description")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise AdapterValidationError(f"metadata must be a JSON object, got {type(metadata).__name__}", param="metadata")
    try:
        text = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise AdapterValidationError(f"metadata must be a JSON object ({exc})", param="metadata") from None
    if json_depth(text, stop_above=max_depth) > max_depth:
        raise AdapterValidationError(
            f"metadata: JSON nested deeper than {max_depth} levels of arrays/objects", param="metadata"
        )
    sizes = {  # as stance.json writes them (indented)
        "metadata": len(json.dumps(metadata, indent=2).encode("utf-8")),
        "description": len(json.dumps(description).encode("utf-8")),
    }
    limit = MAX_SIDE_JSON_BYTES - _STANCE_OVERHEAD
    if sum(sizes.values()) > limit:
        param = max(sizes, key=sizes.__getitem__)
        raise AdapterValidationError(
            f"{param}: description and metadata together are larger than {limit} bytes of JSON", param=param
        )
    return json.loads(text)
