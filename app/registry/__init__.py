"""The adapter registry: what a LoRA "stance" is, how it is checked, staged and stored.

- :mod:`app.registry.adapter`: plain data (:class:`AdapterWeights`, :class:`AdapterRecord`).
- :mod:`app.registry.validation`: reading a peft adapter folder and checking it against the
  base model (:func:`load_adapter_weights`, :func:`linear_shapes`, :func:`validate_name`).
- :mod:`app.registry.upload`: turning uploaded files or an archive into a staged folder
  (:func:`stage_upload`).
- :mod:`app.registry.store`: the on-disk store and its index (:class:`AdapterStore`), with
  its side files (:mod:`app.registry.sidefiles`) and file helpers (:mod:`app.registry.files`).
- :mod:`app.registry.jsonread`: parsing outside JSON with size and nesting-depth limits
  (:func:`loads_limited`, :func:`parse_metadata`, :data:`MAX_JSON_DEPTH`).

Nothing here touches a compute device; loading weights onto one is :mod:`app.engine`.
"""

from app.registry.adapter import AdapterRecord, AdapterWeights, LoRAModuleWeights
from app.registry.jsonread import MAX_JSON_DEPTH, loads_limited, parse_metadata
from app.registry.store import AdapterStore
from app.registry.upload import stage_upload
from app.registry.validation import NAME_RE, linear_shapes, load_adapter_weights, validate_name

__all__ = [
    "MAX_JSON_DEPTH",
    "NAME_RE",
    "AdapterRecord",
    "AdapterStore",
    "AdapterWeights",
    "LoRAModuleWeights",
    "linear_shapes",
    "load_adapter_weights",
    "loads_limited",
    "parse_metadata",
    "stage_upload",
    "validate_name",
]
