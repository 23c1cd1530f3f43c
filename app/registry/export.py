"""A weighted blend written as one plain peft LoRA adapter, exactly, from the weights the server already holds.

The engine computes a blend live, per request: every targeted module adds ``sum_i w_i s_i B_i A_i x``
(``s_i`` the member's peft scaling, ``alpha/r`` or rsLoRA's ``alpha/sqrt(r)``). Stacking the factors gives
one adapter with the same update (peft's ``add_weighted_adapter(combination_type="cat")``, which
``stanceserve export-blend --method cat`` runs on a copy of the base model):

    A = [w_1 s_1 A_1; ...; w_n s_n A_n]   (rows)      B = [B_1 ... B_n]   (columns)      B A = sum_i w_i s_i B_i A_i

with ``lora_alpha = r`` (scaling 1). Every module gets the same rank ``R``, the sum of the members' largest
ranks: a member that does not target a module, or targets it at a lower rank (``rank_pattern``), adds zero
rows and columns there, so the config needs no patterns and any peft loads it. ``target_modules`` lists the
full module paths, so peft wraps exactly the modules that have tensors.

:func:`export_zip` is what ``POST /v1/export-blend`` sends: a zip of ``adapter_config.json``,
``adapter_model.safetensors`` (float32) and ``export_blend.json`` (the recipe and each member's version),
which ``POST /v1/adapters`` accepts back as an upload. Not here: resolving names to weights
(:class:`app.catalog.StanceCatalog`), HTTP.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from app.registry.adapter import AdapterWeights
from app.registry.peft_reader import CONFIG_FILE, MODEL_FILE

#: The summary file written beside the adapter (the CLI's export writes one of the same name).
SUMMARY_FILE = "export_blend.json"
_PREFIX = "base_model.model."


def blend_tensors(terms: Sequence[tuple[AdapterWeights, float]]) -> tuple[dict[str, torch.Tensor], int]:
    """The peft tensors of the ``cat`` export of ``terms`` (``(weights, weight)`` pairs), and its rank ``R``.

    Float32 on CPU, one ``lora_A`` ``[R, d_in]`` and one ``lora_B`` ``[d_out, R]`` per module any member
    targets, named as peft saves them (``base_model.model.<path>.lora_A.weight``).

    Raises:
        ValueError: no terms, or two members disagree on a module's shape.
    """
    if not terms:
        raise ValueError("a blend needs at least one adapter")
    rank = sum(w.max_rank for w, _ in terms)
    offsets, at = [], 0
    for w, _ in terms:
        offsets.append(at)
        at += w.max_rank
    paths = sorted({p for w, _ in terms for p in w.modules})
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        a = b = None
        for (weights, x), off in zip(terms, offsets):
            m = weights.modules.get(path)
            if m is None:
                continue
            d_out, d_in = int(m.B.shape[0]), int(m.A.shape[1])
            if a is None:
                a, b = torch.zeros(rank, d_in), torch.zeros(d_out, rank)
            elif a.shape[1] != d_in or b.shape[0] != d_out:
                raise ValueError(f"members disagree on the shape of {path}")
            r = m.rank
            a[off:off + r] = m.A.float() * (float(x) * m.scaling)
            b[:, off:off + r] = m.B.float()
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = b.contiguous()
    return tensors, rank


def export_config(paths: Sequence[str], rank: int, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` of a ``cat`` export: rank ``rank`` everywhere, ``lora_alpha = rank``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(paths),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_zip(terms: Sequence[tuple[AdapterWeights, float]], *, base_model: str | None, name: str | None = None) -> bytes:
    """A zip of the ``cat`` export of ``terms``: the two peft files and :data:`SUMMARY_FILE`, at its top level.

    Args:
        terms: ``(adapter weights, blend weight)`` pairs, in blend order (a resolved :class:`Stance`'s terms).
        base_model: written as the config's ``base_model_name_or_path``.
        name: the blend's name, recorded in the summary (informative).
    """
    tensors, rank = blend_tensors(terms)
    paths = sorted({k[len(_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    summary = {
        "name": name,
        "stances": {w.id.name: float(x) for w, x in terms},
        "members": {w.id.name: {"digest": w.id.digest, "rank": w.max_rank} for w, _ in terms},
        "method": "cat",
        "rank": rank,
        "lora_alpha": rank,
        "exact": True,
        "modules": len(paths),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(CONFIG_FILE, json.dumps(export_config(paths, rank, base_model), indent=2) + "\n")
        zf.writestr(MODEL_FILE, save_safetensors(tensors, metadata={"format": "pt"}))
        zf.writestr(SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return buf.getvalue()
