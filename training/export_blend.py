"""``stanceserve export-blend``: write one ordinary peft LoRA adapter equal to a weighted blend.

The server computes a blend live, per request: ``W x + sum_i w_i s_i B_i A_i x`` with
``s_i = alpha_i / r_i`` (or ``alpha_i / sqrt(r_i)`` with rsLoRA). Servers that cannot blend
(vLLM, llama.cpp) can still serve a blend exported as one adapter:

* ``cat`` (exact): stack the factors, ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]``, ``B = [B_1 ... B_n]``,
  rank ``sum r_i``, ``lora_alpha = rank`` (scale 1), so ``B A = sum_i w_i s_i B_i A_i``. This is peft's
  ``add_weighted_adapter(combination_type="cat")``, which is what this module calls.
* ``svd`` (approximate, smaller): peft's ``combination_type="svd"``: the truncated SVD of each
  module's blended update ``dW`` at rank ``R`` (default: the largest member rank), the best rank-R
  approximation in Frobenius norm (Eckart-Young); the error per module is the norm of the dropped
  singular values.

:func:`export_blend` also measures how far the exported update is from the blend, per module:
``||dW_export - dW_blend||_F / ||dW_blend||_F`` (written to ``export_blend.json``). Not here:
serving, the engine's blend (:mod:`app.engine.lora`), uploads.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from app.engine import Engine, SamplingParams, Stance
from app.registry.validation import linear_shapes, load_adapter_weights

logger = logging.getLogger(__name__)

METHODS = ("cat", "svd")
#: Internal peft adapter name of the result ("default" saves at the folder's root, not in a subfolder).
_OUT = "default"


def parse_stances(text: str) -> dict[str, float]:
    """``"a=0.6,b=-0.4"`` -> ``{"a": 0.6, "b": -0.4}``.

    Raises:
        ValueError: an item is not ``name=number``, a name repeats, or nothing is given.
    """
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, weight = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected name=weight, got {item!r}")
        if name.strip() in out:
            raise ValueError(f"{name.strip()!r} given twice")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"weight of {name.strip()!r} is not a number: {weight!r}") from None
    if not out:
        raise ValueError("no stances given")
    return out


def _peft_name(i: int) -> str:
    return f"member{i}"  # adapter names inside peft (any valid identifier; store names may contain '.' or '-')


def blend_deltas(model: Any, names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    """``{module path: sum_i w_i s_i B_i A_i}`` ``[d_out, d_in]`` of peft adapters ``names`` loaded in ``model``."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        total = None
        for name, w in zip(names, weights):
            if name in module.lora_A:
                d = module.get_delta_weight(name).float() * w
                total = d if total is None else total + d
        if total is not None:
            out[path] = total
    return out


def export_blend(
    base_model: Any,
    folders: dict[str, Path],
    weights: dict[str, float],
    out_dir: Path,
    *,
    method: str = "cat",
    rank: int | None = None,
) -> dict[str, Any]:
    """Blend peft adapters into one and save it to ``out_dir`` (``adapter_config.json`` +
    ``adapter_model.safetensors`` + ``export_blend.json``).

    Args:
        base_model: the base causal LM (left untouched: a deep copy is wrapped).
        folders: adapter name -> peft folder, in blend order.
        weights: adapter name -> weight (same keys as ``folders``).
        method: ``"cat"`` (exact, rank = sum of ranks) or ``"svd"`` (rank ``rank``).
        rank: target rank for ``svd`` (default: the largest member rank); refused for ``cat``.

    Returns:
        The summary written to ``export_blend.json``: recipe, method, rank, and the relative Frobenius
        error of the exported update per module (``max_rel_error``, ``mean_rel_error``, ``per_module``).

    Raises:
        ValueError: unknown method, ``rank`` with ``cat``, a rank < 1, or keys of ``folders`` and ``weights``
            that differ.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "cat" and rank is not None:
        raise ValueError("--rank applies to svd only (cat's rank is the sum of the member ranks)")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if list(folders) != list(weights):
        raise ValueError(f"folders and weights name different adapters: {list(folders)} vs {list(weights)}")
    t0 = time.perf_counter()
    names = list(folders)
    internal = [_peft_name(i) for i in range(len(names))]
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folders[names[0]]), adapter_name=internal[0])
    for name, peft_name in zip(names[1:], internal[1:]):
        model.load_adapter(str(folders[name]), adapter_name=peft_name)
    ws = [float(weights[n]) for n in names]
    model.add_weighted_adapter(internal, ws, adapter_name=_OUT, combination_type=method,
                               **({"svd_rank": rank} if method == "svd" else {}))
    want = blend_deltas(model, internal, ws)
    got = blend_deltas(model, [_OUT], [1.0])
    per_module = {}
    for path, d in want.items():
        denom = float(d.norm())
        err = float((got[path] - d).norm())
        per_module[path] = err / denom if denom > 0 else err
    model.set_adapter(_OUT)
    for peft_name in internal:
        model.delete_adapter(peft_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), selected_adapters=[_OUT])
    cfg = model.peft_config[_OUT]
    errors = list(per_module.values())
    summary = {
        "stances": {n: float(weights[n]) for n in names},
        "method": method,
        "rank": int(cfg.r),
        "lora_alpha": float(cfg.lora_alpha),
        "sources": {n: str(folders[n]) for n in names},
        "max_rel_error": max(errors) if errors else 0.0,
        "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
        "modules": len(errors),
        "seconds": round(time.perf_counter() - t0, 3),
        "per_module": per_module,
    }
    (out_dir / "export_blend.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("exported %s blend %s to %s (rank %d, max relative error %.2e)", method, summary["stances"], out_dir,
                summary["rank"], summary["max_rel_error"])
    return summary


def parity(loaded: Any, folders: dict[str, Path], weights: dict[str, float], exported: Path, prompts: list[str],
           *, steps: int = 16, top: int = 20) -> dict[str, Any]:
    """How closely the exported adapter, loaded by plain peft, follows the server's live blend.

    The live side runs in stanceserve's engine (the blend as a request's ``stances``, greedy, ``steps`` tokens
    per prompt, with the top-``top`` logprobs of each step); the exported side is ``PeftModel.from_pretrained``
    on a copy of the base model, teacher-forced on the engine's tokens.

    Args:
        loaded: the base model as ``app.model_loader.LoadedModel`` (left untouched).

    Returns:
        ``{"prompts", "steps", "max_abs_logprob_diff" (nats, over every step's live top-k), "greedy_agreement"
        (fraction of steps whose peft argmax is the engine's token)}``.
    """


    shapes = linear_shapes(loaded.model)
    terms = {load_adapter_weights(f, n, shapes, max_rank=4096)[0]: float(weights[n]) for n, f in folders.items()}
    engine = Engine(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.name, loaded.eos_token_ids,
                    max_loras=len(terms) + 1, max_batch_size=8)
    engine.start()

    try:
        ids = [engine.chat_prompt_ids([{"role": "user", "content": p}]) for p in prompts]
        params = SamplingParams(max_tokens=steps, temperature=0, logprobs=top, ignore_eos=True)
        done = engine.generate_batch(ids, Stance.blend(terms), params)
        live = [([t.token_id for t in c.tokens if not t.ends], [dict(t.top_logprobs) for t in c.tokens if not t.ends])
                for c in done]
    finally:
        engine.stop()
    model = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(exported)).eval()
    worst, agree, total = 0.0, 0, 0
    for prompt_ids, (toks, tops) in zip(ids, live):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + toks])).logits[0]
        lp = torch.log_softmax(logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(toks)].float(), dim=-1)
        for i, t in enumerate(toks):
            worst = max(worst, max(abs(lp[i, k].item() - v) for k, v in tops[i].items()))
            agree += int(lp[i].argmax().item() == t)
            total += 1
    return {"prompts": len(prompts), "steps": steps, "max_abs_logprob_diff": worst,
            "greedy_agreement": agree / max(1, total)}
