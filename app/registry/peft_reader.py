"""Reading one peft LoRA adapter folder into a typed value, once, without checking it.

:func:`read_peft_adapter` turns ``adapter_config.json`` + ``adapter_model.safetensors``
into a :class:`PeftAdapter`: the parsed config, the ``lora_A`` / ``lora_B`` tensors of each
module (CPU, as stored: no dtype change), the safetensors ``__metadata__``, and the sha256
and size of the weights file. The server's store (and through it the engine), the
registry and ``training inspect`` all read adapters through it.

What it does not do: decide whether the adapter is acceptable. A config with a bad rank,
DoRA, a module the base model lacks, a wrong shape, NaNs, an A without its B... are all
read as they are and left to :func:`app.registry.validation.validate_adapter`. It raises
:class:`~app.errors.AdapterValidationError` (``param`` = the file at fault) only for a file
it cannot read at all: missing (a pickle-only folder gets a hint), unreadable, a config
that is too large, not UTF-8, nested too deep (:func:`app.registry.jsonread.loads_limited`,
checked before parsing) or not a JSON object, or weights that are not a safetensors file.
Weights are read with ``safetensors.safe_open`` only; pickle files (``adapter_model.bin``)
are never opened.

peft helpers used (pinned by pyproject: ``peft>=0.21.2,<1``; checked against 0.21.2):

- ``peft.utils.constants.CONFIG_NAME`` / ``SAFETENSORS_WEIGHTS_NAME`` / ``WEIGHTS_NAME``:
  the file names (:data:`CONFIG_FILE`, :data:`MODEL_FILE`, and the pickle name refused).
- ``peft.utils.other.get_pattern_key``: which ``rank_pattern`` / ``alpha_pattern`` key
  applies to a module, exactly as ``peft.tuners.lora.model.LoraModel._create_and_replace``
  picks it (:func:`module_scaling`). peft's own ``PeftConfig.from_pretrained`` is not used:
  it parses JSON without a depth limit.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors import safe_open

from app.errors import AdapterValidationError
from app.registry.adapter import content_digest
from app.registry.files import file_id, read_prefix
from app.registry.jsonread import MAX_JSON_DEPTH, loads_limited

#: ``adapter_config.json`` (peft ``CONFIG_NAME``).
CONFIG_FILE = CONFIG_NAME
#: ``adapter_model.safetensors`` (peft ``SAFETENSORS_WEIGHTS_NAME``).
MODEL_FILE = SAFETENSORS_WEIGHTS_NAME

#: Largest ``adapter_config.json`` read (a config is a few KiB; rank patterns of big models < 1 MiB).
MAX_CONFIG_BYTES = 4 * 1024 * 1024

#: Pickle formats we never load (``torch.load`` runs arbitrary code); peft's is ``WEIGHTS_NAME``.
PICKLE_SUFFIXES = tuple(dict.fromkeys((Path(WEIGHTS_NAME).suffix, ".bin", ".pt", ".pth", ".pkl", ".pickle")))
PICKLE_HINT = "pickle weights are refused; save with safe_serialization=True"

# peft keys are "<prefix>.<module path>.lora_A[.<adapter name>].weight"; peft's
# get_peft_model_state_dict drops the adapter name on save, other tools keep ".default".
_TENSOR_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAFactors:
    """The stored LoRA factors of one module, each None when the file lacks it.

    Attributes:
        A: ``lora_A`` weight as stored (a valid one is ``[r, d_in]``), CPU, or None.
        B: ``lora_B`` weight as stored (a valid one is ``[d_out, r]``), CPU, or None.
        a_name: the tensor name of ``A`` in the safetensors file, or None.
        b_name: the tensor name of ``B``, or None.
    """

    A: torch.Tensor | None
    B: torch.Tensor | None
    a_name: str | None = None
    b_name: str | None = None


@dataclass(frozen=True)
class PeftAdapter:
    """One peft adapter folder as read from disk (unchecked; treat the containers as read-only).

    Attributes:
        path: the folder read.
        config: the parsed ``adapter_config.json`` (a JSON object; fields not checked).
        tensors: base-model module path (``model.layers.0.self_attn.q_proj``, the peft
            ``base_model.model.`` prefix removed) -> its :class:`LoRAFactors`, in file order.
        other_tensors: names of the tensors that are not ``lora_A`` / ``lora_B`` weights
            (DoRA magnitudes, biases, embeddings, full weights...), in file order; not loaded.
        duplicate_tensors: names of tensors that repeat a factor already read for their
            module (``...lora_A.weight`` and ``...lora_A.default.weight``); not loaded.
        metadata: the safetensors header's ``__metadata__`` (``{}`` when absent).
        sha256: hex digest of ``adapter_model.safetensors``, of the very bytes read.
        size_bytes: size of ``adapter_model.safetensors`` in bytes.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, LoRAFactors]
    other_tensors: tuple[str, ...]
    duplicate_tensors: tuple[str, ...]
    metadata: dict[str, str]
    sha256: str
    size_bytes: int

    @property
    def digest(self) -> str:
        """The adapter's content digest (weights file and config): :func:`~app.registry.adapter.content_digest`."""
        return content_digest(self.sha256, self.config)


def split_tensor_name(name: str) -> tuple[str, str] | None:
    """``(module path, "lora_A" | "lora_B")`` of a peft tensor name, or None if it is not a LoRA factor.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` and
    ``...q_proj.lora_A.default.weight`` both give ``("model.layers.0.self_attn.q_proj", "lora_A")``.
    """
    match = _TENSOR_RE.match(name)
    if match is None:
        return None
    return match.group("module").removeprefix(_PEFT_PREFIX), match.group("kind")


def module_scaling(config: dict[str, Any], module_path: str) -> tuple[int, float]:
    """``(r_m, scaling_m)`` peft gives the LoRA layer at ``module_path`` under ``config``.

    Same rule as peft 0.21 ``LoraModel._create_and_replace``: ``r`` / ``lora_alpha`` are
    taken from ``rank_pattern`` / ``alpha_pattern`` under the key
    ``peft.utils.other.get_pattern_key`` picks (the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module_path)``), else the config's ``r`` /
    ``lora_alpha``; ``LoraLayer.update_layer`` then sets ``scaling = lora_alpha / r``, or
    ``lora_alpha / math.sqrt(r)`` when ``use_rslora`` (rsLoRA, Kalajdzievski 2023,
    arXiv:2312.03732).

    ``config`` must have no problem under
    :func:`app.registry.validation.config_problems` (``r`` and the pattern values are
    numbers, the pattern keys valid regexes); otherwise TypeError, KeyError or re.error.
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_path), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_path), config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return int(r), float(scaling)


def _fail(file: str, message: str) -> AdapterValidationError:
    return AdapterValidationError(f"{file}: {message}", param=file)


def _read_config(config_path: Path, max_json_depth: int) -> dict[str, Any]:
    try:
        raw = read_prefix(config_path, MAX_CONFIG_BYTES)  # one byte over, so loads_limited sees it is too big
    except OSError as exc:
        raise _fail(CONFIG_FILE, f"unreadable ({exc})") from None
    config = loads_limited(raw, max_depth=max_json_depth, param=CONFIG_FILE, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise _fail(CONFIG_FILE, f"must be a JSON object, got {type(config).__name__}")
    return config


def read_peft_adapter(path: Path, *, max_json_depth: int = MAX_JSON_DEPTH) -> PeftAdapter:
    """Read the peft adapter folder ``path`` (config, LoRA tensors, metadata, sha256) without checking it.

    Args:
        path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        max_json_depth: deepest nesting of arrays/objects accepted in ``adapter_config.json``.

    Returns:
        The :class:`PeftAdapter`. Tensors keep their stored dtype and shape (``lora_A``
        ``[r, d_in]``, ``lora_B`` ``[d_out, r]`` when valid) and live on CPU, owning
        their memory. ``sha256`` and ``size_bytes`` describe the bytes the tensors came from.

    Raises:
        AdapterValidationError: ``param`` is the file at fault: a missing file (for a
            missing ``adapter_model.safetensors``, pickle files in the folder are named
            with :data:`PICKLE_HINT`), an unreadable one, a config larger than
            :data:`MAX_CONFIG_BYTES`, not UTF-8, nested deeper than ``max_json_depth``,
            not JSON or not a JSON object, weights that are not a readable safetensors
            file, or weights that changed while being read.
    """
    path = Path(path)
    config_path, model_path = path / CONFIG_FILE, path / MODEL_FILE
    if not config_path.is_file():
        raise _fail(CONFIG_FILE, f"missing from {path.name or path}")
    if not model_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
        hint = f" (found {', '.join(pickles)}: {PICKLE_HINT})" if pickles else ""
        raise _fail(MODEL_FILE, f"missing from {path.name or path}{hint}")
    config = _read_config(config_path, max_json_depth)

    factors: dict[str, dict[str, Any]] = {}
    others: list[str] = []
    duplicates: list[str] = []
    try:
        with open(model_path, "rb") as raw:
            before = os.fstat(raw.fileno())
            sha256 = hashlib.file_digest(raw, "sha256").hexdigest()
    except OSError as exc:
        raise _fail(MODEL_FILE, f"unreadable ({exc})") from None
    try:
        with safe_open(str(model_path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for name in f.keys():
                parsed = split_tensor_name(name)
                if parsed is None:
                    others.append(name)
                    continue
                module, kind = parsed
                pair = factors.setdefault(module, {})
                if kind in pair:
                    duplicates.append(name)
                    continue
                # get_tensor may return a view of the file's mmap: copy, so a later write
                # to the file cannot change what was read (and checked).
                pair[kind] = (name, f.get_tensor(name).clone())
        changed = file_id(os.stat(model_path)) != file_id(before)
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError on bad files
        raise _fail(MODEL_FILE, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if changed:
        raise _fail(MODEL_FILE, "changed while it was being read; retry")

    tensors = {}
    for module, pair in factors.items():
        a_name, a = pair.get("lora_A", (None, None))
        b_name, b = pair.get("lora_B", (None, None))
        tensors[module] = LoRAFactors(A=a, B=b, a_name=a_name, b_name=b_name)
    return PeftAdapter(
        path=path,
        config=config,
        tensors=tensors,
        other_tensors=tuple(others),
        duplicate_tensors=tuple(duplicates),
        metadata=metadata,
        sha256=sha256,
        size_bytes=int(before.st_size),
    )
