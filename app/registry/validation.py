"""Checking a read peft adapter against the base model, and turning it into engine weights.

- :func:`validate_adapter` lists every :class:`Problem` of a
  :class:`~app.registry.peft_reader.PeftAdapter` (from
  :func:`~app.registry.peft_reader.read_peft_adapter`) against a base model: its config
  (:func:`config_problems`), its tensor names and pairs (:func:`tensor_problems`) and each
  module's shapes and values (:func:`module_problems`). :func:`check_adapter` raises the
  first problem as :class:`~app.errors.AdapterValidationError`.
- :func:`to_adapter_weights` turns a checked adapter into the engine's
  :class:`~app.registry.adapter.AdapterWeights` (factors in one dtype, peft scaling per
  module from :func:`~app.registry.peft_reader.module_scaling`).
- :func:`load_adapter_weights` is the three together (read, check, convert) for callers
  that have a folder; :func:`linear_shapes` lists the linear layers an adapter may
  target, and :func:`validate_name` checks a stance name.

This module reads nothing itself (files are :mod:`app.registry.peft_reader`), never
writes, and knows nothing of the store layout (:mod:`app.registry.store`) or of uploads
(:mod:`app.registry.upload`).

Only plain LoRA on ``nn.Linear`` layers is served: ``delta_W = scaling * B @ A``
(Hu et al. 2021, arXiv:2106.09685). DoRA, LoRA biases, trained embeddings,
``modules_to_save`` and the other peft variants that change the forward pass are refused;
the config fields that switch them on are peft 0.21 ``LoraConfig`` field names
(``tests/app/registry/test_validation.py`` checks each against the installed ``LoraConfig``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.errors import AdapterValidationError
from app.registry.adapter import AdapterVersion, AdapterWeights, LoRAModuleWeights
from app.registry.jsonread import MAX_JSON_DEPTH
from app.registry.peft_reader import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    MODEL_FILE,
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    PeftAdapter,
    module_scaling,
    read_peft_adapter,
    split_tensor_name,
)

__all__ = [
    "CONFIG_FILE",
    "MAX_CONFIG_BYTES",
    "MODEL_FILE",
    "NAME_RE",
    "PICKLE_HINT",
    "PICKLE_SUFFIXES",
    "Problem",
    "check_adapter",
    "config_problems",
    "linear_shapes",
    "load_adapter_weights",
    "module_problems",
    "module_scaling",
    "tensor_problems",
    "to_adapter_weights",
    "validate_adapter",
    "validate_name",
]

#: A stance name: what clients put in ``model``; also the store's directory name.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Longest ``rank_pattern`` / ``alpha_pattern`` key; they are regexes run on every module path.
MAX_PATTERN_CHARS = 512

# peft LoraConfig fields that switch on a variant whose forward pass differs from plain LoRA.
_VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "nn.Parameter targets (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "lora_bias": "LoRA bias (lora_bias)",
}
# init_lora_weights values whose adapters only make sense with the *modified* base weights
# peft writes at init, unless converted on save (peft_model.save_pretrained
# path_initial_model_for_weight_conversion, which resets init_lora_weights to True).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def validate_name(name: str) -> str:
    """Check a stance name against :data:`NAME_RE` and return it.

    Raises:
        AdapterValidationError: (``param="name"``) if ``name`` is not 1-64 characters of
            ``[A-Za-z0-9._-]`` starting with a letter or digit.
    """
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise AdapterValidationError(
            f"invalid adapter name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
            param="name",
        )
    return name


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Map every ``nn.Linear`` of the base model to ``(in_features, out_features)``.

    Keys are module paths as ``model.named_modules()`` gives them
    (``model.layers.0.self_attn.q_proj``), which is also the key peft matches
    ``target_modules`` / ``rank_pattern`` against. ``lm_head`` is left out: it is not
    served with LoRA (it is often tied to the embeddings). A linear already wrapped by
    the engine's multi-LoRA layer (or by peft) sits at ``<path>.base_layer``; it is
    reported under ``<path>``, so the result is the same before and after wrapping.
    """
    shapes: dict[str, tuple[int, int]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        path = path.removesuffix(".base_layer")
        if path == "lm_head" or path.endswith(".lm_head"):
            continue
        shapes[path] = (int(module.in_features), int(module.out_features))
    return shapes


@dataclass(frozen=True)
class Problem:
    """One reason an adapter is refused.

    Attributes:
        param: the file at fault (``adapter_config.json`` or ``adapter_model.safetensors``).
        message: what is wrong, naming the field or tensor (without the file name).
    """

    param: str
    message: str

    def __str__(self) -> str:
        return f"{self.param}: {self.message}"

    def error(self) -> AdapterValidationError:
        """This problem as the API's error: message ``"<param>: <message>"``, same ``param``."""
        return AdapterValidationError(str(self), param=self.param)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any, max_rank: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= max_rank


def _pattern_problems(config: dict[str, Any], field: str, check, expected: str) -> list[Problem]:
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict):
        return [Problem(CONFIG_FILE, f"field {field!r} must be an object, got {type(pattern).__name__}")]
    problems = []
    for key, value in pattern.items():
        if len(key) > MAX_PATTERN_CHARS:
            problems.append(Problem(CONFIG_FILE, f"field {field!r}: key longer than {MAX_PATTERN_CHARS} characters"))
            continue
        try:
            re.compile(key)
        except re.error as exc:
            problems.append(Problem(CONFIG_FILE, f"field {field!r}: key {key!r} is not a valid regex ({exc})"))
            continue
        if not check(value):
            problems.append(Problem(CONFIG_FILE, f"field {field!r}[{key!r}] must be {expected}, got {value!r}"))
    return problems


def config_problems(config: dict[str, Any], *, max_rank: int) -> list[Problem]:
    """The problems of a parsed ``adapter_config.json`` (``param="adapter_config.json"`` each).

    Refused: a ``peft_type`` other than ``LORA``; ``r`` missing or not an integer in
    ``[1, max_rank]``; ``lora_alpha`` missing or not a finite number; ``use_rslora`` not a
    bool; ``rank_pattern`` / ``alpha_pattern`` not an object, with a key over
    :data:`MAX_PATTERN_CHARS` characters or not a valid regex, or a value outside
    ``[1, max_rank]`` / not a finite number; a feature that is not served (``bias`` other
    than ``"none"``, ``modules_to_save``, DoRA, LoRA bias and the other ``LoraConfig``
    variant fields, base-modifying inits such as unconverted PiSSA). Empty when the config
    is served; then :func:`~app.registry.peft_reader.module_scaling` may be used with it.
    """
    problems: list[Problem] = []

    def bad(message: str) -> None:
        problems.append(Problem(CONFIG_FILE, message))

    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        bad(f"field 'peft_type' is {peft_type!r}; only 'LORA' adapters are served")
    if "r" not in config:
        bad("field 'r' is missing")
    elif not _is_rank(config["r"], max_rank):
        bad(f"field 'r' must be an integer in [1, {max_rank}] (max_lora_rank), got {config['r']!r}")
    if "lora_alpha" not in config:
        bad("field 'lora_alpha' is missing")
    elif not _is_number(config["lora_alpha"]):
        bad(f"field 'lora_alpha' must be a finite number, got {config['lora_alpha']!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        bad(f"field 'use_rslora' must be true or false, got {config['use_rslora']!r}")
    problems += _pattern_problems(
        config, "rank_pattern", lambda v: _is_rank(v, max_rank), f"an integer in [1, {max_rank}]"
    )
    problems += _pattern_problems(config, "alpha_pattern", _is_number, "a finite number")

    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        bad(f"field 'bias' is {bias!r}; only 'none' is served (base-layer biases are not trained)")
    if config.get("modules_to_save"):
        bad(f"field 'modules_to_save' is {config['modules_to_save']!r}; fully trained modules are not served")
    for field, label in _VARIANT_FIELDS.items():
        if config.get(field):
            bad(f"field {field!r} is set: {label} is not served, only plain LoRA")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MODIFYING_INITS):
        bad(
            f"field 'init_lora_weights' is {config['init_lora_weights']!r}: this init changes the base weights; "
            "convert it to plain LoRA on save (path_initial_model_for_weight_conversion)"
        )
    return problems


def _other_tensor_problem(name: str) -> Problem:
    if "lora_embedding_" in name:
        why = "LoRA on embeddings is not served"
    elif "lora_magnitude_vector" in name:
        why = "DoRA magnitude vectors are not served"
    elif re.search(r"\.lora_B(\.[^.]+)?\.bias$", name):
        why = "LoRA biases (lora_bias) are not served"
    else:
        why = "only '<module>.lora_A.weight' and '<module>.lora_B.weight' tensors are served"
    return Problem(MODEL_FILE, f"tensor {name!r}: {why}")


def tensor_problems(adapter: PeftAdapter) -> list[Problem]:
    """The problems of the adapter's tensor names, without a base model (``param="adapter_model.safetensors"``).

    Refused: a tensor that is not a ``lora_A`` / ``lora_B`` weight (embeddings, DoRA
    magnitudes, LoRA biases, full weights...), a second ``lora_A`` or ``lora_B`` for one
    module, no LoRA tensor at all, an A without its B or a B without its A.
    """
    problems = [_other_tensor_problem(name) for name in adapter.other_tensors]
    for name in adapter.duplicate_tensors:
        module, kind = split_tensor_name(name) or (name, "factor")
        problems.append(Problem(MODEL_FILE, f"tensor {name!r}: a second {kind} for module {module!r}"))
    if not adapter.tensors:
        problems.append(Problem(MODEL_FILE, "holds no LoRA tensors"))
    for module in sorted(adapter.tensors):
        pair = adapter.tensors[module]
        if pair.B is None:
            problems.append(
                Problem(MODEL_FILE, f"tensor {pair.a_name!r} has no matching lora_B tensor for module {module!r}")
            )
        elif pair.A is None:
            problems.append(
                Problem(MODEL_FILE, f"tensor {pair.b_name!r} has no matching lora_A tensor for module {module!r}")
            )
    return problems


def module_problems(
    adapter: PeftAdapter, base_shapes: dict[str, tuple[int, int]], *, check_ranks: bool = True
) -> list[Problem]:
    """The problems of each module's factors against the base model (``param="adapter_model.safetensors"``).

    Args:
        adapter: the adapter read.
        base_shapes: :func:`linear_shapes` of the base model (``path -> (d_in, d_out)``).
        check_ranks: compare ranks with the config's (``r`` / ``rank_pattern``); pass
            False when :func:`config_problems` found problems (the rank of ``A`` is then used).

    Refused: a module not among ``base_shapes``; a shape other than ``A=[r_m, d_in]``,
    ``B=[d_out, r_m]`` with ``r_m`` the configured rank of that module; a non-float
    dtype; NaN or infinite values. Modules lacking a factor are skipped (see
    :func:`tensor_problems`).
    """
    problems: list[Problem] = []
    for module in sorted(adapter.tensors):
        pair = adapter.tensors[module]
        if pair.A is None or pair.B is None:
            continue
        if module not in base_shapes:
            problems.append(
                Problem(
                    MODEL_FILE,
                    f"tensor {pair.a_name!r} targets module {module!r}, which is not a linear layer of the base model",
                )
            )
            continue
        d_in, d_out = base_shapes[module]
        if check_ranks:
            r_m = module_scaling(adapter.config, module)[0]
        else:
            r_m = int(pair.A.shape[0]) if pair.A.ndim == 2 else 0
        for t_name, tensor, expected in ((pair.a_name, pair.A, (r_m, d_in)), (pair.b_name, pair.B, (d_out, r_m))):
            if tuple(tensor.shape) != expected:
                problems.append(
                    Problem(
                        MODEL_FILE,
                        f"tensor {t_name!r} has shape {list(tensor.shape)}, expected {list(expected)} "
                        f"(module {module!r}: d_in={d_in}, d_out={d_out}, r={r_m})",
                    )
                )
            if not tensor.is_floating_point():
                problems.append(
                    Problem(MODEL_FILE, f"tensor {t_name!r} has dtype {tensor.dtype}, expected a floating dtype")
                )
            elif not bool(torch.isfinite(tensor).all()):
                problems.append(Problem(MODEL_FILE, f"tensor {t_name!r} holds NaN or infinite values"))
    return problems


def validate_adapter(adapter: PeftAdapter, base_shapes: dict[str, tuple[int, int]], *, max_rank: int) -> list[Problem]:
    """Every problem of ``adapter`` against the base model; empty when it can be served.

    Args:
        adapter: from :func:`~app.registry.peft_reader.read_peft_adapter`.
        base_shapes: :func:`linear_shapes` of the base model.
        max_rank: largest accepted rank (``Settings.max_lora_rank``).

    Returns:
        :func:`config_problems`, then :func:`tensor_problems`, then
        :func:`module_problems` (ranks checked only when the config has no problem).
    """
    problems = config_problems(adapter.config, max_rank=max_rank)
    config_ok = not problems
    problems += tensor_problems(adapter)
    problems += module_problems(adapter, base_shapes, check_ranks=config_ok)
    return problems


def check_adapter(adapter: PeftAdapter, base_shapes: dict[str, tuple[int, int]], *, max_rank: int) -> None:
    """Raise the first problem :func:`validate_adapter` finds, if any.

    Raises:
        AdapterValidationError: ``param`` is the file at fault and the message, starting
            ``"<file>: "``, names the field or tensor.
    """
    problems = validate_adapter(adapter, base_shapes, max_rank=max_rank)
    if problems:
        raise problems[0].error()


def to_adapter_weights(adapter: PeftAdapter, name: str, *, dtype: torch.dtype = torch.float32) -> AdapterWeights:
    """The engine's weights of an adapter that :func:`validate_adapter` found no problem in.

    Args:
        adapter: the checked adapter.
        name: the adapter's name; the result's :attr:`AdapterWeights.id` is
            ``AdapterVersion(name, adapter.digest)`` (its content digest).
        dtype: floating dtype of the returned tensors.

    Returns:
        Per module path, ``A`` of shape ``[r_m, d_in]`` and ``B`` of shape ``[d_out, r_m]``
        (contiguous CPU tensors in ``dtype``; they may share memory with ``adapter``'s
        when the dtype is unchanged) and the peft ``scaling`` (see
        :func:`~app.registry.peft_reader.module_scaling`: ``alpha / r`` or
        ``alpha / sqrt(r)`` with rsLoRA, ``rank_pattern`` / ``alpha_pattern`` honoured).

    Raises:
        AdapterValidationError: (``param="adapter_model.safetensors"``) a value that
            overflows ``dtype`` (e.g. 1e6 in float16).
    """
    modules: dict[str, LoRAModuleWeights] = {}
    for module in sorted(adapter.tensors):
        pair = adapter.tensors[module]
        _r, scaling = module_scaling(adapter.config, module)
        a = pair.A.to(dtype=dtype).contiguous()
        b = pair.B.to(dtype=dtype).contiguous()
        for t_name, tensor in ((pair.a_name, a), (pair.b_name, b)):
            if not bool(torch.isfinite(tensor).all()):
                raise Problem(MODEL_FILE, f"tensor {t_name!r} overflows {dtype}").error()
        modules[module] = LoRAModuleWeights(A=a, B=b, scaling=scaling)
    return AdapterWeights(id=AdapterVersion(name, adapter.digest), modules=modules)


def load_adapter_weights(
    path: Path,
    name: str,
    base_shapes: dict[str, tuple[int, int]],
    *,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    max_json_depth: int = MAX_JSON_DEPTH,
) -> tuple[AdapterWeights, dict[str, Any]]:
    """Read, check and convert the adapter folder ``path``: :func:`read_peft_adapter`,
    :func:`check_adapter`, :func:`to_adapter_weights`.

    Args:
        path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: the adapter's name (the result's :attr:`AdapterWeights.id` is it plus the content digest).
        base_shapes: :func:`linear_shapes` of the base model.
        max_rank: largest accepted rank (``Settings.max_lora_rank``).
        dtype: floating dtype of the returned tensors.
        max_json_depth: deepest nesting of arrays/objects accepted in ``adapter_config.json``.

    Returns:
        ``(weights, config)``: see :func:`to_adapter_weights`; and the parsed
        ``adapter_config.json``.

    Raises:
        AdapterValidationError: ``param`` is the file at fault and the message names the
            field or tensor: a file that cannot be read (see
            :func:`~app.registry.peft_reader.read_peft_adapter`), the first problem of
            :func:`validate_adapter`, or an overflow of ``dtype``.
    """
    adapter = read_peft_adapter(path, max_json_depth=max_json_depth)
    check_adapter(adapter, base_shapes, max_rank=max_rank)
    return to_adapter_weights(adapter, name, dtype=dtype), adapter.config
