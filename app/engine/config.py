"""The engine's and the scheduler's configuration: :class:`EngineConfig`.

:class:`EngineConfig` is the part of :class:`app.config.Settings` that the
engine (and its scheduler) read: slot counts, batch and queue sizes, context
limits, the blend weight bound. It is built from the settings with
:meth:`EngineConfig.from_settings`. Its defaults are *read from* the settings'
field defaults, so every default of the service is declared once, in
:mod:`app.config`. This module does not read the environment, load models or
validate values (:class:`~app.config.Settings` does that).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from app.config import Settings


def _default(name: str) -> Any:
    """The default of the settings field ``name`` (the one place defaults are declared)."""
    return Settings.model_fields[name].default


@dataclass(frozen=True)
class EngineConfig:
    """What the engine and its scheduler are sized by (a frozen subset of :class:`~app.config.Settings`).

    Attributes:
        max_loras: adapter slots on the compute device.
        max_cpu_loras: parsed adapters kept on CPU (``None``: all).
        max_batch_size: most sequences decoded in one step (a cap; free KV blocks bound them too).
        max_waiting: queue length past which requests are refused (HTTP 429).
        prefill_chunk_tokens: most prompt tokens prefilled per engine step.
        max_model_len: longest prompt + completion, in tokens (the engine clamps it to the
            model's ``max_position_embeddings``).
        max_prompt_tokens: longest prompt, in tokens (``None``: ``max_model_len - 1``).
        max_blend_weight: largest ``|w|`` of a blend term.
        kv_cache_memory_bytes: paged KV cache budget in bytes (``None``: sized from the device's free memory,
            :func:`~app.engine.kv_cache.default_budget`).
        prefix_cache_memory_bytes: most bytes of KV blocks the prefix cache keeps keyed (0: off).
        weight_prepack: pack linear weights for oneDNN on CPU (:meth:`~app.engine.lora.FusedLinear.prepack`).
        cpu_attention_kernel: on CPU, attention and the fused element-wise steps through the C++ kernels
            (:mod:`app.engine.cpu_kernels`).
        cuda_graphs: on CUDA, replay decode steps from CUDA graphs (:mod:`app.engine.graphs`).

    The field descriptions that the CLI and the docs show live on the settings fields of the same names.
    """

    max_loras: int = _default("max_loras")
    max_cpu_loras: int | None = _default("max_cpu_loras")
    max_batch_size: int = _default("max_batch_size")
    max_waiting: int = _default("max_waiting")
    prefill_chunk_tokens: int = _default("prefill_chunk_tokens")
    max_model_len: int = _default("max_model_len")
    max_prompt_tokens: int | None = _default("max_prompt_tokens")
    max_blend_weight: float = _default("max_blend_weight")
    kv_cache_memory_bytes: int | None = _default("kv_cache_memory_bytes")
    prefix_cache_memory_bytes: int = _default("prefix_cache_memory_bytes")
    weight_prepack: bool = _default("weight_prepack")
    cpu_attention_kernel: bool = _default("cpu_attention_kernel")
    cuda_graphs: bool = _default("cuda_graphs")

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        """The engine's part of ``settings`` (fields of the same names)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with ``changes`` (field names); ``TypeError`` on an unknown name."""
        return dataclasses.replace(self, **changes)
