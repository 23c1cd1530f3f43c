"""What an adapter *is*: its identity, its LoRA tensors and its descriptive record.

Where an adapter comes from (upload, disk) lives in :mod:`app.registry.store`
and :mod:`app.registry.upload`; when it is loaded onto the compute device lives
in :mod:`app.engine.slots`. This module holds plain, immutable data only.

Identity: an :class:`AdapterVersion` is an adapter's name plus the sha256 digest of its
content (:func:`content_digest`: the weights file's sha256 and the config that sets each
module's scaling). Caches (CPU weights, device slots) key on it, so two uploads of the same
files are the same version and a replaced adapter is a different one, whatever the
record's integer ``version`` counter (shown by the API) says.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds to a linear layer ``y = W x`` the
low-rank update ``scaling * B (A x)`` with ``A: [r, d_in]``, ``B: [d_out, r]``;
peft's ``scaling`` is ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA,
Kalajdzievski 2023, arXiv:2312.03732).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

_HEX64 = re.compile(r"[0-9a-f]{64}")


def content_digest(weights_sha256: str, config: Mapping[str, Any]) -> str:
    """The content digest of an adapter: sha256 over its weights file's sha256 and its config.

    The config counts because it sets the scaling of each module (``lora_alpha``, ``r``,
    ``rank_pattern``, ``alpha_pattern``, ``use_rslora``): the same tensors under another
    config are other weights. The config is hashed as canonical JSON (sorted keys), so a
    config written back by the store hashes as the one uploaded.
    """
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"stanceserve-adapter\0{weights_sha256}\0{canonical}".encode()).hexdigest()


@dataclass(frozen=True)
class AdapterVersion:
    """The identity of one adapter version: its name and its content digest (hashable).

    Attributes:
        name: the adapter's name (its stance name).
        digest: 64 lowercase hex digits, :func:`content_digest` of its files.

    ``str()`` gives ``name@<first 12 hex digits>`` for logs.
    """

    name: str
    digest: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"adapter version needs a name, got {self.name!r}")
        if not isinstance(self.digest, str) or _HEX64.fullmatch(self.digest) is None:
            raise ValueError(f"adapter version digest must be 64 lowercase hex digits, got {self.digest!r}")

    def __str__(self) -> str:
        return f"{self.name}@{self.digest[:12]}"


def freeze_json(value: Any) -> Any:
    """A read-only copy of a JSON value: objects become ``MappingProxyType``, arrays tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze_json(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze_json(v) for v in value)
    return value


def thaw_json(value: Any) -> Any:
    """The plain JSON value (dicts and lists) of a :func:`freeze_json` result; a fresh copy."""
    if isinstance(value, Mapping):
        return {k: thaw_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw_json(v) for v in value]
    return value


@dataclass(frozen=True)
class LoRAModuleWeights:
    """The LoRA factors of one target linear module.

    Attributes:
        A: ``lora_A`` weight, shape ``[r, d_in]``.
        B: ``lora_B`` weight, shape ``[d_out, r]``.
        scaling: multiplier of ``B A x`` (peft: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True, eq=False)
class AdapterWeights:
    """All LoRA factors of one adapter version, on CPU.

    Equal (and hashed) by :attr:`id`: two weight objects of one version are the same adapter,
    so they can key a blend (:meth:`app.engine.request.Stance.blend`).

    Attributes:
        id: the version these factors are; the slot cache keys on it, so a replaced adapter
            never aliases the version running requests still use.
        modules: base-model module path (``model.layers.0.self_attn.q_proj``) -> factors (read-only).
    """

    id: AdapterVersion
    modules: dict[str, LoRAModuleWeights]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AdapterWeights) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    def nbytes(self) -> int:
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())


@dataclass(frozen=True)
class AdapterRecord:
    """The registry's description of one adapter version (what `GET /v1/adapters/{name}` shows).

    Immutable, so the store hands out its own objects: ``target_modules`` becomes a tuple and
    ``metadata`` a read-only copy (:func:`freeze_json`) on construction. Derive a changed record
    with ``dataclasses.replace``. The API view is :meth:`app.schemas.AdapterInfo.from_record`.

    Attributes:
        name: the stance name clients put in ``model`` or ``stances``.
        version: 1 for the first upload, +1 on each ``?replace=true`` (a counter for the API;
            identity is :attr:`id`).
        rank: peft ``r`` (the largest, if ``rank_pattern`` gives several).
        alpha: peft ``lora_alpha``.
        target_modules: leaf module names the adapter targets (``q_proj``...), sorted.
        size_bytes: size of ``adapter_model.safetensors`` in bytes.
        sha256: hex digest of ``adapter_model.safetensors``.
        digest: :func:`content_digest` of the adapter (weights and config).
        created: creation time of this version, seconds since the epoch (UTC).
        path: directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model: the ``base_model_name_or_path`` the adapter's config names (informative).
        description: free text given at upload.
        metadata: free JSON (training provenance, metrics summary...), read-only.
    """

    name: str
    version: int
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    sha256: str
    digest: str
    created: float
    path: str
    base_model: str | None = None
    description: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "metadata", freeze_json(self.metadata))

    def __hash__(self) -> int:
        return hash((self.name, self.version, self.digest))

    @property
    def id(self) -> AdapterVersion:
        """The version this record describes (what caches key on)."""
        return AdapterVersion(self.name, self.digest)
