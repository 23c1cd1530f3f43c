"""What a lower-precision dtype costs in output: greedy tokens of bf16 against fp32 on the stance probes.

:func:`dtype_parity` runs the same chat prompts (the shipped stances' held-out probes, or any list)
greedily through two engines over copies of one model, in float32 and in a lower dtype, and counts
how many generated tokens agree: position by position, and up to each answer's first divergence
(after which the two continuations condition on different text, so later agreement is luck).

This module measures; it asserts nothing and picks no default dtype (:mod:`app.model_loader`
does, from the hardware). On a CPU without native bf16 the bf16 engine runs emulated (slowly), which
changes its speed, not its numbers.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from app.engine import Engine, EngineConfig, SamplingParams, Stance
from training.datasets import load_probes

#: the shipped stances' held-out probes (``training/data/stances/<stance>/probes.jsonl``)
PROBE_DIR = Path(__file__).resolve().parent.parent / "training" / "data" / "stances"


def probe_prompts(per_stance: int = 8) -> list[str]:
    """The first ``per_stance`` probes of each shipped stance (:func:`training.datasets.load_probes`)."""
    return [p for path in sorted(PROBE_DIR.glob("*/probes.jsonl")) for p in load_probes(path)[:per_stance]]


def _greedy(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int, dtype: torch.dtype) -> tuple[list[list[int]], float]:
    """Greedy token ids of each prompt through an :class:`Engine` on a ``dtype`` copy of ``model``, and the seconds taken."""
    m = copy.deepcopy(model).to(dtype)
    config = EngineConfig(max_batch_size=len(prompts), max_waiting=len(prompts), max_model_len=1024)
    eng = Engine(m, tokenizer, "parity", set(), config=config)  # no EOS: every answer has max_tokens tokens
    eng.start()
    try:
        ids = [eng.chat_prompt_ids([{"role": "user", "content": p}]) for p in prompts]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        out = [c.token_ids for c in eng.generate_batch(ids, Stance.base(), params)]
        return out, time.perf_counter() - t0
    finally:
        eng.stop()


def dtype_parity(model: Any, tokenizer: Any, prompts: list[str], *, max_tokens: int = 32,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Greedy agreement of ``dtype`` with float32 over ``prompts`` (chat-templated, base model).

    Returns:
        ``token_agreement``: the share of generated positions with the same token in both;
        ``prefix_agreement``: the mean share of each answer before its first divergence;
        ``identical_answers``: the share of answers equal token for token; and the seconds each took.
    """
    ref, t_ref = _greedy(model, tokenizer, prompts, max_tokens, torch.float32)
    low, t_low = _greedy(model, tokenizer, prompts, max_tokens, dtype)
    same = total = 0
    prefixes = []
    for a, b in zip(ref, low):
        n = min(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        prefixes.append(first / max(1, len(a)))
    return {
        "dtype": str(dtype).removeprefix("torch."), "prompts": len(prompts), "max_tokens": max_tokens,
        "token_agreement": round(same / max(1, total), 4),
        "prefix_agreement": round(sum(prefixes) / max(1, len(prefixes)), 4),
        "identical_answers": round(sum(a == b for a, b in zip(ref, low)) / max(1, len(ref)), 4),
        "float32_s": round(t_ref, 2), f"{str(dtype).removeprefix('torch.')}_s": round(t_low, 2),
    }
