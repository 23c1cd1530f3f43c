"""Engines on tiny models, and the per-row reference the batched LoRA path is checked against.

:func:`make_engine` starts an :class:`Engine` on a copy of a model; :func:`peft_logits` and
:func:`mixed_batch_and_alone` run peft alone and :class:`MultiLoRA` batched on the same rows.
"""

from __future__ import annotations

import copy

import torch

from tests.factories.adapters import read_adapter


def make_engine(model, tokenizer, store, **kw):
    """A started engine on a copy of ``model``; ``kw`` are :class:`EngineConfig` fields (default 4 slots)."""
    from app.engine.config import EngineConfig
    from app.engine.engine import Engine

    config = EngineConfig(max_loras=4).replace(**kw)
    eng = Engine(copy.deepcopy(model), tokenizer, "tiny", {10_000}, config=config, store=store)  # no EOS in range
    eng.start()
    return eng


def peft_logits(base, adapter_dir, input_ids, attention_mask=None):
    """Logits of peft's own forward with the adapter folder ``adapter_dir`` on a copy of ``base``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def mixed_batch_and_alone(base, d1, d2, input_ids, dtype=torch.float32):
    """Rows ``[adapter d1, adapter d2, no adapter]`` of ``input_ids`` (``[3, T]``) in one forward
    through :class:`MultiLoRA` on a copy of ``base``, and each row run alone (peft for the adapters).

    Returns:
        ``(batched logits [3, T, V], [d1 alone, d2 alone, base alone])``, each alone ``[1, T, V]``.
    """
    from app.engine.lora import LoRABatch, MultiLoRA

    alone = [peft_logits(base, d1, input_ids[0:1]), peft_logits(base, d2, input_ids[1:2])]
    with torch.no_grad():
        alone.append(base(input_ids=input_ids[2:3]).logits)
    model = copy.deepcopy(base)
    lora = MultiLoRA(model, max_slots=4)
    lora.write_slot(0, read_adapter(d1, "a1"))
    lora.write_slot(1, read_adapter(d2, "a2"))
    rows = LoRABatch.from_rows([[(0, 1.0)], [(1, 1.0)], []], device=input_ids.device, dtype=dtype)
    with torch.no_grad(), lora.routing(rows):
        return model(input_ids=input_ids).logits, alone
