"""What an adapter *is*: its LoRA tensors and its descriptive record.

Where an adapter comes from (upload, disk) lives in :mod:`app.registry.store`
and :mod:`app.registry.upload`; when it is loaded onto the compute device lives
in :mod:`app.engine.slots`. This module holds plain data only.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds to a linear layer ``y = W x`` the
low-rank update ``scaling * B (A x)`` with ``A: [r, d_in]``, ``B: [d_out, r]``;
peft's ``scaling`` is ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA,
Kalajdzievski 2023, arXiv:2312.03732).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def adapter_name(key: str) -> str:
    """The adapter name of a version key ``"{name}@{version}"``."""
    return key.rsplit("@", 1)[0]


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


@dataclass(frozen=True)
class AdapterWeights:
    """All LoRA factors of one adapter version, on CPU.

    Attributes:
        key: unique id of this version, ``"{name}@{version}"``; the slot cache keys on it,
            so a replaced adapter never aliases the version running requests still use.
        modules: base-model module path (``model.layers.0.self_attn.q_proj``) -> factors.
    """

    key: str
    modules: dict[str, LoRAModuleWeights]

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    def nbytes(self) -> int:
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())


@dataclass
class AdapterRecord:
    """The registry's description of one adapter version (what `GET /v1/adapters/{name}` shows).

    Attributes:
        name: the stance name clients put in ``model`` or ``stances``.
        version: 1 for the first upload, +1 on each ``?replace=true``.
        rank: peft ``r`` (the largest, if ``rank_pattern`` gives several).
        alpha: peft ``lora_alpha``.
        target_modules: leaf module names the adapter targets (``q_proj``...), sorted.
        size_bytes: size of ``adapter_model.safetensors`` in bytes.
        sha256: hex digest of ``adapter_model.safetensors``.
        created: creation time of this version, seconds since the epoch (UTC).
        path: directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model: the ``base_model_name_or_path`` the adapter's config names (informative).
        description: free text given at upload.
        metadata: free JSON (training provenance, metrics summary...).
    """

    name: str
    version: int
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    sha256: str
    created: float
    path: str
    base_model: str | None = None
    description: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Version-unique id, ``"{name}@{version}"``."""
        return f"{self.name}@{self.version}"

    def to_public(self) -> dict[str, Any]:
        """JSON-able view for the API (no server paths)."""
        return {
            "name": self.name,
            "version": self.version,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "created": int(self.created),
            "base_model": self.base_model,
            "description": self.description,
            "metadata": dict(self.metadata),
        }
