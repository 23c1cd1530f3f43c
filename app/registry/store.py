"""The adapter store's public API: add, replace, delete, list and load adapters, and its in-memory index.

One folder per adapter under ``root`` (``Settings.adapters_dir``): its peft config,
safetensors and ``stance.json``. The folder layout and the renames that make every write
atomic (a new version is written and fsynced in a hidden ``.tmp-`` folder, then swapped in;
a delete renames the folder away first; an interrupted swap is rolled back by
:meth:`AdapterStore.scan`) are :mod:`app.registry.layout`.

Uploads are staged in ``root/.upload-<hex>/`` (:meth:`AdapterStore.staging`), on the
store's own filesystem, never in the system temp folder; one left by a killed upload is
removed by the next :meth:`AdapterStore.scan`. ``stance.json`` and
``training_metrics.json`` are read through :func:`app.registry.jsonread.loads_limited`
(size and nesting depth checked before parsing).

The store does not put weights on a device or cache them (that is :mod:`app.engine`), and
does not parse uploads (:mod:`app.registry.upload`). One process owns a root; the store
is thread-safe within it (one lock).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from app.errors import AdapterExistsError, AdapterNotFoundError, AdapterTooLargeError, AdapterValidationError
from app.registry.adapter import AdapterRecord, AdapterWeights
from app.registry.files import copy_hashed, fsync_dir, remove_path, write_file
from app.registry.jsonread import MAX_JSON_DEPTH
from app.registry.layout import TMP, UPLOAD, hidden_path, move_aside, occupied, recover, swap_in
from app.registry.peft_reader import PeftAdapter, read_peft_adapter
from app.registry.sidefiles import (
    STANCE_FILE,
    check_description_metadata,
    disk_stamp,
    read_json_object,
    stamp_matches,
    stance_version,
    training_metadata,
)
from app.registry.validation import (
    CONFIG_FILE,
    MODEL_FILE,
    NAME_RE,
    check_adapter,
    to_adapter_weights,
    validate_name,
)

logger = logging.getLogger(__name__)


class AdapterStore:
    """The registered adapters: folders under ``root`` plus an index of their records.

    Args:
        root: the store folder (created if missing).
        base_shapes: :func:`app.registry.validation.linear_shapes` of the base model.
        max_rank: largest LoRA rank accepted (``Settings.max_lora_rank``).
        max_bytes: largest ``adapter_model.safetensors`` + config, in bytes
            (``Settings.max_adapter_bytes``).
        reserved_names: names no adapter may take (the base model's served name).
        max_json_depth: deepest nesting of arrays/objects accepted in JSON read from
            outside (``adapter_config.json``, ``training_metrics.json``, metadata);
            ``stance.json``, which wraps the metadata, may be one level deeper.
            ValueError if below 1.

    Version numbers (the API's counter) only grow within one process, also across delete
    and re-add. Identity is content (:attr:`AdapterRecord.id`: name and content digest), so
    re-adding the same files gives the same :class:`~app.registry.adapter.AdapterVersion`.
    Records are immutable and shared: :meth:`get` and :meth:`list` return the index's own objects.
    """

    def __init__(
        self,
        root: Path,
        base_shapes: dict[str, tuple[int, int]],
        *,
        max_rank: int,
        max_bytes: int,
        reserved_names: Iterable[str] = frozenset(),
        max_json_depth: int = MAX_JSON_DEPTH,
    ) -> None:
        if max_json_depth < 1:
            raise ValueError(f"max_json_depth must be at least 1, got {max_json_depth}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_shapes = dict(base_shapes)
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.reserved_names = frozenset(reserved_names)
        self.max_json_depth = max_json_depth
        self._lock = threading.RLock()
        self._index: dict[str, AdapterRecord] = {}
        self._last_version: dict[str, int] = {}
        self._inflight: set[str] = set()  # .tmp- and .upload- folders being written

    # ------------------------------------------------------------------ reads

    def get(self, name: str) -> AdapterRecord:
        """The record of ``name``. Raises AdapterNotFoundError."""
        with self._lock:
            record = self._index.get(name)
            if record is None:
                raise AdapterNotFoundError(name)
            return record

    def list(self) -> list[AdapterRecord]:
        """All records, sorted by name."""
        with self._lock:
            return [self._index[n] for n in sorted(self._index)]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def load_weights(self, record: AdapterRecord, dtype: torch.dtype = torch.float32) -> AdapterWeights:
        """Read the weights of ``record`` from ``record.path``; their id is ``record.id``.

        Raises:
            AdapterNotFoundError: the folder is gone, or holds other content than ``record``
                (it was replaced or deleted meanwhile); get the new record.
            AdapterValidationError: the files on disk no longer validate.
        """
        folder = Path(record.path)
        if not folder.is_dir():
            raise AdapterNotFoundError(record.name)
        try:
            weights, _ = self._load(folder, record.name, dtype)
        except AdapterValidationError:
            if not folder.is_dir() or self._version_of(folder) != record.version:
                raise AdapterNotFoundError(record.name) from None
            raise
        # The digest covers both files as read: equal means exactly this record's content, even if a
        # swap happened during the read; anything else is another version.
        if weights.id != record.id:
            raise AdapterNotFoundError(record.name)
        return weights

    # ----------------------------------------------------------------- writes

    def add(
        self,
        name: str,
        staged_dir: Path,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> tuple[AdapterRecord, AdapterWeights]:
        """Validate the adapter in ``staged_dir`` and store it as ``name``.

        ``staged_dir`` is only read (e.g. the output of
        :func:`app.registry.upload.stage_upload`); its config and safetensors are copied.
        The new version is ``old version + 1`` on replace, else 1 (or one past a version of
        ``name`` deleted earlier in this process).

        Returns:
            ``(record, weights)``: the new record and its weights (fp32, CPU, id
            ``record.id``), so the caller need not read them again.

        Raises:
            AdapterValidationError: bad or reserved ``name`` (``param="name"``), metadata
                that is not a JSON object or is nested deeper than ``max_json_depth``
                (``param="metadata"``), a description that is not a string, description
                and metadata together over 1 MiB of JSON, or an invalid adapter (see
                :func:`app.registry.validation.load_adapter_weights`).
            AdapterTooLargeError: the files exceed ``max_bytes``.
            AdapterExistsError: ``name`` is taken (registered or a folder on disk) and
                ``replace`` is false.

        On any error the store folder and the index are as before.
        """
        validate_name(name)
        if name in self.reserved_names:
            raise AdapterValidationError(f"adapter name {name!r} is reserved (it names the base model)", param="name")
        metadata = check_description_metadata(description, metadata, max_depth=self.max_json_depth)
        with self._lock:
            if not replace and self._taken(name):
                raise AdapterExistsError(name)

        staged = Path(staged_dir)
        model_src = staged / MODEL_FILE
        try:
            size = sum((staged / f).stat().st_size for f in (CONFIG_FILE, MODEL_FILE))
        except OSError:
            size = 0  # a missing file: read_peft_adapter names it
        if size > self.max_bytes:
            raise AdapterTooLargeError(
                f"{MODEL_FILE}: adapter is {size} bytes, more than the {self.max_bytes}-byte limit (max_adapter_bytes)",
                param=MODEL_FILE,
            )
        weights, adapter = self._load(staged, name)
        config = adapter.config

        tmp = hidden_path(self.root, TMP, name)
        with self._lock:
            self._inflight.add(tmp.name)
        old_dir: Path | None = None
        try:
            tmp.mkdir()
            write_file(tmp / CONFIG_FILE, json.dumps(config, indent=2).encode("utf-8"))
            sha256, size = copy_hashed(model_src, tmp / MODEL_FILE)
            if sha256 != adapter.sha256 or size != adapter.size_bytes:
                raise AdapterValidationError(f"{MODEL_FILE}: changed while it was being added; retry", param=MODEL_FILE)
            with self._lock:
                if not replace and self._taken(name):
                    raise AdapterExistsError(name)
                previous = self._index.get(name)
                version = max(previous.version if previous else 0, self._last_version.get(name, 0)) + 1
                created = time.time()
                stance = {
                    "version": version,
                    "created": created,
                    "description": description,
                    "metadata": metadata,
                    "sha256": sha256,
                    "size": size,
                }
                write_file(tmp / STANCE_FILE, json.dumps(stance, indent=2).encode("utf-8"))
                fsync_dir(tmp)
                old_dir = swap_in(self.root, name, tmp)
                record = self._make_record(name, version, created, description, metadata, adapter, weights)
                self._index[name] = record
                self._last_version[name] = version
        except BaseException:
            remove_path(tmp)
            raise
        finally:
            with self._lock:
                self._inflight.discard(tmp.name)
        if old_dir is not None:
            remove_path(old_dir)
        logger.info("adapter %s (version %d) stored (rank %d, %d bytes)", record.id, version, record.rank, size)
        return record, weights

    def register_path(
        self,
        name: str,
        path: Path,
        *,
        replace: bool = False,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[AdapterRecord, AdapterWeights]:
        """Validate the adapter folder ``path`` on the server's disk and copy it into the store as ``name``.

        The vLLM ``load_lora_adapter`` case. ``path`` is left as it is. Without
        ``metadata``, the ``summary`` of a ``training_metrics.json`` beside the adapter is
        kept as ``{"training": summary}``. Same result and errors as :meth:`add`, plus
        AdapterValidationError (``param="path"``) if ``path`` is not a folder.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise AdapterValidationError(f"adapter path {str(path)!r} is not a folder on the server", param="path")
        if metadata is None:
            metadata = training_metadata(folder, max_depth=self.max_json_depth)
        return self.add(name, folder, description=description, metadata=metadata, replace=replace)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh empty folder ``root/.upload-<hex>/`` to stage an upload in; removed on exit, always.

        On the store's own filesystem (so nothing is left in the system temp folder, and
        the data is copied within one disk). Use::

            with store.staging() as tmp:
                staged = stage_upload(files, tmp / "adapter", max_bytes=...)
                store.add(name, staged, ...)

        The folder is never listed or registered; :meth:`scan` leaves it alone while it is
        in use and removes one left behind by a killed process.

        Raises:
            OSError: the folder cannot be created (disk full, read-only root).
        """
        folder = hidden_path(self.root, UPLOAD)
        with self._lock:
            self._inflight.add(folder.name)
        try:
            folder.mkdir()
            yield folder
        finally:
            remove_path(folder)
            with self._lock:
                self._inflight.discard(folder.name)

    def delete(self, name: str) -> AdapterRecord:
        """Unregister ``name`` and remove its folder (renamed away first, so never half-deleted under its name).

        Raises:
            AdapterNotFoundError: ``name`` is not registered.
        """
        with self._lock:
            record = self._index.get(name)
            if record is None:
                raise AdapterNotFoundError(name)
            tomb = move_aside(self.root, name)
            del self._index[name]
            self._last_version[name] = max(self._last_version.get(name, 0), record.version)
        if tomb is not None:
            remove_path(tomb)
        logger.info("adapter %s (version %d) deleted", record.id, record.version)
        return record

    # ------------------------------------------------------------------ scan

    def scan(self) -> list[AdapterRecord]:
        """(Re)build the index from the folders under ``root``; return the records sorted by name.

        First rolls back interrupted replaces and removes stale hidden folders
        (:func:`app.registry.layout.recover`: ``.old-<name>-*`` whose ``<name>`` is missing
        is renamed back, the highest ``stance.json`` version winning; ``.tmp-``, ``.del-``,
        ``.upload-`` (killed uploads, see :meth:`staging`) and leftover ``.old-`` folders
        are removed, except those in use by this process). Other dot-entries are ignored.
        Every other folder is read once (:func:`~app.registry.peft_reader.read_peft_adapter`) and
        validated (:func:`~app.registry.validation.check_adapter`); invalid ones,
        bad names and reserved names are logged and skipped, never fatal. A
        folder without ``stance.json`` is version 1, created at the safetensors' mtime,
        with metadata from ``training_metrics.json`` (see :func:`training_metadata`).
        """
        with self._lock:
            recover(self.root, self._version_of, self._inflight)
            index: dict[str, AdapterRecord] = {}
            for entry in sorted(self.root.iterdir()):
                name = entry.name
                if name.startswith(".") or not entry.is_dir():
                    continue
                if NAME_RE.fullmatch(name) is None:
                    logger.warning("skipping %s: not a valid adapter name", entry)
                    continue
                if name in self.reserved_names:
                    logger.warning("skipping %s: the name is reserved for the base model", entry)
                    continue
                try:
                    index[name] = self._read_record(name, entry)
                except AdapterValidationError as exc:
                    logger.warning("skipping invalid adapter %s: %s", entry, exc.message)
                except Exception as exc:  # one bad folder must not stop start-up
                    logger.warning("skipping unreadable adapter %s: %s: %s", entry, type(exc).__name__, exc)
            self._index = index
            for name, record in index.items():
                self._last_version[name] = max(self._last_version.get(name, 0), record.version)
            logger.info("adapter store %s: %d adapters registered", self.root, len(index))
            return [index[n] for n in sorted(index)]

    def reload(self, name: str) -> tuple[AdapterRecord | None, bool]:
        """Bring the index entry of ``name`` in step with ``root/name``, which another process may have changed.

        For a root shared by several processes: compares the folder's stamp (:func:`disk_stamp`) with the
        record and re-reads the adapter only when they differ. Unlike :meth:`scan` it recovers and removes
        nothing (other processes' ``.tmp-``/``.upload-`` folders are theirs). A folder swapped during the read
        is read again (3 tries), so a record never pairs one version's stamp with another version's weights.

        Returns:
            ``(record, changed)``: the current record (``None``, and unregistered, when no valid adapter of that
            name is on disk now) and whether the index changed.
        """
        if NAME_RE.fullmatch(name) is None or name in self.reserved_names:
            return None, False
        folder, depth = self.root / name, self.max_json_depth + 1
        with self._lock:
            current = self._index.get(name)
        for _ in range(3):
            before = disk_stamp(folder, depth)
            if before is None or (current is not None and stamp_matches(before, current)):
                break
            try:
                record = self._read_record(name, folder)
            except Exception as exc:  # gone or half-swapped meanwhile: look again
                logger.info("re-reading adapter %s: %s: %s", folder, type(exc).__name__, exc)
                continue
            if disk_stamp(folder, depth) == before and stamp_matches(before, record):
                with self._lock:
                    self._index[name] = record
                    self._last_version[name] = max(self._last_version.get(name, 0), record.version)
                return record, True
        else:
            logger.warning("adapter %s kept changing while it was read; keeping the indexed record", folder)
            return current, False
        if before is not None:
            return current, False
        with self._lock:
            removed = self._index.pop(name, None)
        return None, removed is not None

    # -------------------------------------------------------------- internals

    def _load(self, folder: Path, name: str, dtype: torch.dtype = torch.float32) -> tuple[AdapterWeights, PeftAdapter]:
        """Read ``folder`` once, check it against the base model with this store's limits, convert it.

        Returns the engine weights (id: ``name`` and the content digest) and the adapter read
        (config, sha256, size).
        Raises AdapterValidationError (see :func:`app.registry.validation.load_adapter_weights`).
        """
        adapter = read_peft_adapter(folder, max_json_depth=self.max_json_depth)
        check_adapter(adapter, self.base_shapes, max_rank=self.max_rank)
        return to_adapter_weights(adapter, name, dtype=dtype), adapter

    def _version_of(self, folder: Path) -> int:
        """The ``version`` in ``folder/stance.json``; 1 if it is missing or unreadable (logged)."""
        return stance_version(folder, self.max_json_depth + 1)

    def _taken(self, name: str) -> bool:
        """Whether ``name`` is registered or anything is on disk under it."""
        return name in self._index or occupied(self.root, name)

    def _read_record(self, name: str, folder: Path) -> AdapterRecord:
        weights, adapter = self._load(folder, name)
        model_file = folder / MODEL_FILE
        stance = read_json_object(folder / STANCE_FILE, self.max_json_depth + 1)
        if stance is None:
            version, created = 1, model_file.stat().st_mtime
            description, metadata = None, training_metadata(folder, max_depth=self.max_json_depth)
        else:
            version = self._version_of(folder)
            created = stance.get("created")
            if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created):
                created = model_file.stat().st_mtime
            description = stance.get("description") if isinstance(stance.get("description"), str) else None
            metadata = stance.get("metadata") if isinstance(stance.get("metadata"), dict) else {}
            if stance.get("sha256") not in (None, adapter.sha256):
                logger.warning("%s: %s differs from the sha256 in stance.json", folder, MODEL_FILE)
        return self._make_record(name, version, float(created), description, metadata, adapter, weights)

    def _make_record(
        self, name: str, version: int, created: float, description: str | None, metadata: dict[str, Any],
        adapter: PeftAdapter, weights: AdapterWeights,
    ) -> AdapterRecord:
        """The record of version ``version`` of ``name`` (``adapter`` as read and validated, ``weights`` its own)."""
        config = adapter.config
        base_model = config.get("base_model_name_or_path")
        return AdapterRecord(
            name=name,
            version=version,
            rank=weights.max_rank,
            alpha=float(config["lora_alpha"]),
            target_modules=tuple(sorted({path.rsplit(".", 1)[-1] for path in weights.modules})),
            size_bytes=adapter.size_bytes,
            sha256=adapter.sha256,
            digest=weights.id.digest,
            created=created,
            path=str(self.root / name),
            base_model=base_model if isinstance(base_model, str) else None,
            description=description,
            metadata=metadata,
        )
