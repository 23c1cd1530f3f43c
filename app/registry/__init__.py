"""The adapter registry: what a LoRA "stance" is, how it is checked, staged and stored.

- :mod:`app.registry.adapter`: plain data (:class:`AdapterVersion`, :class:`AdapterWeights`, :class:`AdapterRecord`).
- :mod:`app.registry.peft_reader`: reading a peft adapter folder once into a typed value
  (:func:`read_peft_adapter` -> :class:`PeftAdapter`), without checking it.
- :mod:`app.registry.validation`: checking that value against the base model
  (:func:`validate_adapter` -> list of :class:`Problem`, :func:`check_adapter`), turning it
  into engine weights (:func:`to_adapter_weights`), all three at once
  (:func:`load_adapter_weights`), :func:`linear_shapes`, :func:`validate_name`.
- :mod:`app.registry.upload`: turning uploaded files or an archive into a staged folder
  (:func:`stage_upload`).
- :mod:`app.registry.store`: the on-disk store and its index (:class:`AdapterStore`), with
  its folder layout and atomic swaps (:mod:`app.registry.layout`), side files
  (:mod:`app.registry.sidefiles`) and file helpers (:mod:`app.registry.files`).
- :mod:`app.registry.jsonread`: parsing outside JSON with size and nesting-depth limits
  (:func:`loads_limited`, :func:`parse_metadata`, :data:`MAX_JSON_DEPTH`).

Nothing here touches a compute device; loading weights onto one is :mod:`app.engine`.
"""

from app.registry.adapter import AdapterRecord, AdapterVersion, AdapterWeights, LoRAModuleWeights
from app.registry.jsonread import MAX_JSON_DEPTH, loads_limited, parse_metadata
from app.registry.peft_reader import PeftAdapter, read_peft_adapter
from app.registry.store import AdapterStore
from app.registry.upload import stage_upload
from app.registry.validation import (
    NAME_RE,
    Problem,
    check_adapter,
    linear_shapes,
    load_adapter_weights,
    to_adapter_weights,
    validate_adapter,
    validate_name,
)

__all__ = [
    "MAX_JSON_DEPTH",
    "NAME_RE",
    "AdapterRecord",
    "AdapterStore",
    "AdapterVersion",
    "AdapterWeights",
    "LoRAModuleWeights",
    "PeftAdapter",
    "Problem",
    "check_adapter",
    "linear_shapes",
    "load_adapter_weights",
    "loads_limited",
    "parse_metadata",
    "read_peft_adapter",
    "stage_upload",
    "to_adapter_weights",
    "validate_adapter",
    "validate_name",
]
