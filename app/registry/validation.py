"""Reading and checking one peft LoRA adapter folder against the base model.

:func:`load_adapter_weights` turns ``adapter_config.json`` + ``adapter_model.safetensors``
into an :class:`~app.registry.adapter.AdapterWeights` on CPU, or raises
:class:`~app.errors.AdapterValidationError` naming the file and the field or tensor at
fault. :func:`linear_shapes` lists the linear layers an adapter may target, and
:func:`validate_name` checks a stance name.

This module only reads: it never writes to disk, never unpickles (weights are read with
``safetensors.safe_open`` only) and knows nothing of the store layout
(:mod:`app.registry.store`) or of uploads (:mod:`app.registry.upload`).

Only plain LoRA on ``nn.Linear`` layers is served: ``delta_W = scaling * B @ A``
(Hu et al. 2021, arXiv:2106.09685). DoRA, LoRA biases, trained embeddings,
``modules_to_save`` and the other peft variants that change the forward pass are refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from app.errors import AdapterValidationError
from app.registry.adapter import AdapterWeights, LoRAModuleWeights
from app.registry.jsonread import MAX_JSON_DEPTH, loads_limited

CONFIG_FILE = "adapter_config.json"
MODEL_FILE = "adapter_model.safetensors"

#: A stance name: what clients put in ``model``; also the store's directory name.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Largest ``adapter_config.json`` read (a config is a few KiB; rank patterns of big models < 1 MiB).
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: Longest ``rank_pattern`` / ``alpha_pattern`` key; they are regexes run on every module path.
MAX_PATTERN_CHARS = 512

#: Pickle formats we never load (``torch.load`` runs arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
PICKLE_HINT = "pickle weights are refused; save with safe_serialization=True"

# peft keys are "<prefix>.<module path>.lora_A[.<adapter name>].weight"; peft's
# get_peft_model_state_dict drops the adapter name on save, other tools keep ".default".
_TENSOR_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIX = "base_model.model."

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


def peft_pattern_key(pattern_keys: Any, module_key: str) -> str:
    """The ``rank_pattern`` / ``alpha_pattern`` key peft applies to ``module_key``.

    Same rule as ``peft.utils.other.get_pattern_key`` (peft 0.21): the first key ``k``
    (in dict order) with ``re.match(rf"(.*\\.)?({k})$", module_key)`` wins; with no match,
    ``module_key`` itself is returned (so ``pattern.get(...)`` falls back to the default).

    Raises:
        re.error: if a key is not a valid regular expression.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_key):
            return key
    return module_key


def _fail(file: str, message: str) -> AdapterValidationError:
    return AdapterValidationError(f"{file}: {message}", param=file)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any, max_rank: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= max_rank


def _check_pattern(config: dict[str, Any], field: str, check, expected: str) -> dict[str, Any]:
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict):
        raise _fail(CONFIG_FILE, f"field {field!r} must be an object, got {type(pattern).__name__}")
    for key, value in pattern.items():
        if len(key) > MAX_PATTERN_CHARS:
            raise _fail(CONFIG_FILE, f"field {field!r}: key longer than {MAX_PATTERN_CHARS} characters")
        try:
            re.compile(key)
        except re.error as exc:
            raise _fail(CONFIG_FILE, f"field {field!r}: key {key!r} is not a valid regex ({exc})") from None
        if not check(value):
            raise _fail(CONFIG_FILE, f"field {field!r}[{key!r}] must be {expected}, got {value!r}")
    return pattern


def parse_adapter_config(raw: bytes, *, max_rank: int, max_json_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """Parse and check the bytes of ``adapter_config.json``; return the config dict.

    The nesting depth is checked before parsing (:func:`app.registry.jsonread.loads_limited`).

    Raises:
        AdapterValidationError: (``param="adapter_config.json"``) for more than
            :data:`MAX_CONFIG_BYTES` bytes, invalid UTF-8 or JSON, nesting deeper than
            ``max_json_depth`` levels, a ``peft_type`` other than ``LORA``, ``r`` / ``rank_pattern`` values outside
            ``[1, max_rank]``, a non-numeric ``lora_alpha`` / ``alpha_pattern`` value, or a
            feature that is not served (DoRA, ``bias`` != ``"none"``, ``modules_to_save``,
            LoRA bias, other peft variants, base-modifying inits such as unconverted PiSSA).
    """
    config = loads_limited(raw, max_depth=max_json_depth, param=CONFIG_FILE, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise _fail(CONFIG_FILE, f"must be a JSON object, got {type(config).__name__}")

    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _fail(CONFIG_FILE, f"field 'peft_type' is {peft_type!r}; only 'LORA' adapters are served")
    if "r" not in config:
        raise _fail(CONFIG_FILE, "field 'r' is missing")
    if not _is_rank(config["r"], max_rank):
        raise _fail(
            CONFIG_FILE, f"field 'r' must be an integer in [1, {max_rank}] (max_lora_rank), got {config['r']!r}"
        )
    if "lora_alpha" not in config:
        raise _fail(CONFIG_FILE, "field 'lora_alpha' is missing")
    if not _is_number(config["lora_alpha"]):
        raise _fail(CONFIG_FILE, f"field 'lora_alpha' must be a finite number, got {config['lora_alpha']!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise _fail(CONFIG_FILE, f"field 'use_rslora' must be true or false, got {config['use_rslora']!r}")
    _check_pattern(config, "rank_pattern", lambda v: _is_rank(v, max_rank), f"an integer in [1, {max_rank}]")
    _check_pattern(config, "alpha_pattern", _is_number, "a finite number")

    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise _fail(CONFIG_FILE, f"field 'bias' is {bias!r}; only 'none' is served (base-layer biases are not trained)")
    if config.get("modules_to_save"):
        raise _fail(
            CONFIG_FILE,
            f"field 'modules_to_save' is {config['modules_to_save']!r}; fully trained modules are not served",
        )
    for field, label in _VARIANT_FIELDS.items():
        if config.get(field):
            raise _fail(CONFIG_FILE, f"field {field!r} is set: {label} is not served, only plain LoRA")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MODIFYING_INITS):
        raise _fail(
            CONFIG_FILE,
            f"field 'init_lora_weights' is {config['init_lora_weights']!r}: this init changes the base weights; "
            "convert it to plain LoRA on save (path_initial_model_for_weight_conversion)",
        )
    return config


def module_scaling(config: dict[str, Any], module_path: str) -> tuple[int, float]:
    """``(r_m, scaling_m)`` peft gives the LoRA layer at ``module_path`` under ``config``.

    Source: peft 0.21 ``LoraModel._create_and_replace`` picks ``r`` / ``lora_alpha`` from
    ``rank_pattern`` / ``alpha_pattern`` via ``get_pattern_key`` (see
    :func:`peft_pattern_key`), and ``LoraLayer.update_layer`` sets
    ``scaling = lora_alpha / r``, or ``lora_alpha / math.sqrt(r)`` when ``use_rslora``
    (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732). ``config`` must have passed
    :func:`parse_adapter_config`.
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(peft_pattern_key(rank_pattern.keys(), module_path), config["r"])
    alpha = alpha_pattern.get(peft_pattern_key(alpha_pattern.keys(), module_path), config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return int(r), float(scaling)


def _module_path(tensor_name: str) -> tuple[str, str] | None:
    """``(module path, "lora_A" | "lora_B")`` of a peft tensor name, or None if it is not one."""
    match = _TENSOR_RE.match(tensor_name)
    if match is None:
        return None
    module = match.group("module")
    if module.startswith(_PEFT_PREFIX):
        module = module[len(_PEFT_PREFIX) :]
    return module, match.group("kind")


def _refuse_tensor(name: str) -> AdapterValidationError:
    if "lora_embedding_" in name:
        why = "LoRA on embeddings is not served"
    elif "lora_magnitude_vector" in name:
        why = "DoRA magnitude vectors are not served"
    elif re.search(r"\.lora_B(\.[^.]+)?\.bias$", name):
        why = "LoRA biases (lora_bias) are not served"
    else:
        why = "only '<module>.lora_A.weight' and '<module>.lora_B.weight' tensors are served"
    return _fail(MODEL_FILE, f"tensor {name!r}: {why}")


def load_adapter_weights(
    path: Path,
    key: str,
    base_shapes: dict[str, tuple[int, int]],
    *,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    max_json_depth: int = MAX_JSON_DEPTH,
) -> tuple[AdapterWeights, dict[str, Any]]:
    """Read, check and return the LoRA factors of the adapter folder ``path``.

    Args:
        path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        key: the :attr:`AdapterWeights.key` to give the result (``"{name}@{version}"``).
        base_shapes: :func:`linear_shapes` of the base model.
        max_rank: largest accepted rank (``Settings.max_lora_rank``).
        dtype: floating dtype of the returned tensors.
        max_json_depth: deepest nesting of arrays/objects accepted in ``adapter_config.json``.

    Returns:
        ``(weights, config)``: per module path, ``A`` of shape ``[r_m, d_in]``, ``B`` of
        shape ``[d_out, r_m]`` (contiguous CPU tensors owning their memory) and the peft
        ``scaling`` (see :func:`module_scaling`); and the parsed ``adapter_config.json``.

    Raises:
        AdapterValidationError: ``param`` is the file at fault and the message names the
            field or tensor: missing file, pickle weights only, invalid config (see
            :func:`parse_adapter_config`), unreadable safetensors, a tensor that is not a
            ``lora_A`` / ``lora_B`` weight, a module not among ``base_shapes``, a shape
            other than ``A=[r_m, d_in]``, ``B=[d_out, r_m]`` with ``r_m`` the configured
            rank of that module, an A without its B or vice versa, a non-float or
            non-finite value, or no module at all.
    """
    path = Path(path)
    config_path, model_path = path / CONFIG_FILE, path / MODEL_FILE
    if not config_path.is_file():
        raise _fail(CONFIG_FILE, f"missing from {path.name or path}")
    if not model_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
        hint = f" (found {', '.join(pickles)}: {PICKLE_HINT})" if pickles else ""
        raise _fail(MODEL_FILE, f"missing from {path.name or path}{hint}")
    try:
        with open(config_path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # one byte over, so parse_adapter_config sees it is too big
    except OSError as exc:
        raise _fail(CONFIG_FILE, f"unreadable ({exc})") from None
    config = parse_adapter_config(raw, max_rank=max_rank, max_json_depth=max_json_depth)

    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    try:
        from safetensors import safe_open

        with safe_open(str(model_path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            for name in names:
                parsed = _module_path(name)
                if parsed is None:
                    raise _refuse_tensor(name)
                module, kind = parsed
                if kind in factors.get(module, {}):
                    raise _fail(MODEL_FILE, f"tensor {name!r}: a second {kind} for module {module!r}")
                factors.setdefault(module, {})[kind] = (name, f.get_tensor(name))
    except AdapterValidationError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError on bad files
        raise _fail(MODEL_FILE, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if not factors:
        raise _fail(MODEL_FILE, "holds no LoRA tensors")

    modules: dict[str, LoRAModuleWeights] = {}
    for module in sorted(factors):
        pair = factors[module]
        for kind, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if kind in pair and other not in pair:
                raise _fail(
                    MODEL_FILE, f"tensor {pair[kind][0]!r} has no matching {other} tensor for module {module!r}"
                )
        (a_name, a), (b_name, b) = pair["lora_A"], pair["lora_B"]
        if module not in base_shapes:
            raise _fail(
                MODEL_FILE,
                f"tensor {a_name!r} targets module {module!r}, which is not a linear layer of the base model",
            )
        d_in, d_out = base_shapes[module]
        r_m, scaling = module_scaling(config, module)
        for t_name, tensor, expected in ((a_name, a, (r_m, d_in)), (b_name, b, (d_out, r_m))):
            if tuple(tensor.shape) != expected:
                raise _fail(
                    MODEL_FILE,
                    f"tensor {t_name!r} has shape {list(tensor.shape)}, expected {list(expected)} "
                    f"(module {module!r}: d_in={d_in}, d_out={d_out}, r={r_m})",
                )
            if not tensor.is_floating_point():
                raise _fail(MODEL_FILE, f"tensor {t_name!r} has dtype {tensor.dtype}, expected a floating dtype")
            if not bool(torch.isfinite(tensor).all()):
                raise _fail(MODEL_FILE, f"tensor {t_name!r} holds NaN or infinite values")
        a_out = a.to(dtype=dtype, copy=True).contiguous()
        b_out = b.to(dtype=dtype, copy=True).contiguous()
        for t_name, tensor in ((a_name, a_out), (b_name, b_out)):
            if not bool(torch.isfinite(tensor).all()):
                raise _fail(MODEL_FILE, f"tensor {t_name!r} overflows {dtype}")
        modules[module] = LoRAModuleWeights(A=a_out, B=b_out, scaling=scaling)
    return AdapterWeights(key=key, modules=modules), config
