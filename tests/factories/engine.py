"""Engines on tiny models, and the per-row reference the batched LoRA path is checked against.

:func:`make_engine` starts an :class:`Engine` on a copy of a model; :func:`collect` drains one request inside a
running event loop (requests that must overlap, e.g. under ``asyncio.gather``); :func:`reference_greedy` is
greedy decoding the slow, obviously right way; :func:`block_bytes` is one KV block's size for a model; :func:`decoder_logits` runs rows
through the engine's own forward pass (:class:`~app.engine.forward.ForwardPass`) with adapters in slots;
:func:`peft_logits` and :func:`mixed_batch_and_alone` run peft alone and the batched path on the same rows.
"""

from __future__ import annotations

import copy

import torch

from app.engine.kv_cache import BLOCK_SIZE, token_bytes
from app.engine.request import ErrorEvent, FinishEvent, TokenEvent
from tests.factories.adapters import read_adapter


def make_engine(model, tokenizer, store, *, metrics=None, **kw):
    """A started engine on a copy of ``model``; ``kw`` are :class:`EngineConfig` fields (default 4 slots).

    ``metrics``: a :class:`~app.metrics.Metrics` that watches the engine (:meth:`~app.metrics.Metrics.attach`).
    """
    from app.engine.config import EngineConfig
    from app.engine.engine import Engine

    config = EngineConfig(max_loras=4).replace(**kw)
    eng = Engine(copy.deepcopy(model), tokenizer, "tiny", {10_000}, config=config, store=store)  # no EOS in range
    if metrics is not None:
        metrics.attach(eng)
    eng.start()
    return eng


async def drain(eng, prompt, params, stance):
    """``(token ids, text, finish event or None, errors)`` of one request run to its end; errors are collected."""
    toks, text, fin, errs = [], "", None, []
    async for ev in eng.generate(prompt, params, stance):
        if isinstance(ev, TokenEvent):
            toks.append(ev.token_id)
            text += ev.text
        elif isinstance(ev, FinishEvent):
            fin = ev
            text += ev.text
        elif isinstance(ev, ErrorEvent):
            errs.append(ev.error)
    return toks, text, fin, errs


async def collect(eng, prompt, params, stance):
    """``(token ids, text, finish event)`` of one request run to its end; raises the error of an ``ErrorEvent``."""
    toks, text, fin, errs = await drain(eng, prompt, params, stance)
    if errs:
        raise errs[0]
    return toks, text, fin


def reference_greedy(model, prompt, n, adapter_dir=None):
    """Greedy decoding without KV cache or batching: the slow, obviously right way (peft for the adapter)."""
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]


def block_bytes(model) -> int:
    """Bytes of one KV block (``BLOCK_SIZE`` tokens, float32) of ``model``'s cache."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return token_bytes(cfg.num_hidden_layers, kv_heads, head_dim, torch.float32) * BLOCK_SIZE


def peft_logits(base, adapter_dir, input_ids, attention_mask=None):
    """Logits of peft's own forward with the adapter folder ``adapter_dir`` on a copy of ``base``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def decoder_logits(model, rows, adapters=(), *, max_slots=4, decoder=None, prepack=4, attention_kernel=False):
    """Every position's logits of ``rows`` run in ONE packed prefill through the engine's forward pass.

    Args:
        model: a Hugging Face causal LM (copied first, unless ``decoder`` is given).
        prepack: the ``ForwardPass``'s ``prepack`` (oneDNN-packed weights on CPU, as the engine runs; ``None``: dense).
        attention_kernel: the ``ForwardPass``'s ``attention_kernel`` (the C++ CPU attention kernels).
        rows: ``(token ids, [(slot, weight), ...])`` per row; rows may differ in length.
        adapters: :class:`AdapterWeights` written into slots ``0, 1, ...``.

    Returns:
        a list of ``[1, T_row, vocab]`` logits, one per row.
    """
    from app.engine.forward import ForwardPass
    from app.engine.lora import LoRABatch, MultiLoRA
    from app.engine.plan import Plan

    if decoder is None:
        decoder = ForwardPass(copy.deepcopy(model), prepack=prepack, attention_kernel=attention_kernel)
        lora = MultiLoRA(decoder.linears, max_slots=max_slots)
        for slot, ad in enumerate(adapters):
            lora.write_slot(slot, ad)
    cache, tables = decoder.row_cache(len(rows), max(len(ids) for ids, _ in rows))
    plan = Plan.build([(tables[i], list(ids), 0) for i, (ids, _) in enumerate(rows)], decoder.device, all_logits=True)
    routing = LoRABatch.from_rows([list(p) for _, p in rows], device=decoder.device, dtype=decoder.dtype,
                                  segments=plan.segments)
    out = decoder.forward(plan, cache, routing)
    return [out[a:b].unsqueeze(0) for a, b in plan.segments]


def mixed_batch_and_alone(base, d1, d2, input_ids, dtype=torch.float32):
    """Rows ``[adapter d1, adapter d2, no adapter]`` of ``input_ids`` (``[3, T]``) in one packed forward
    through the engine's :class:`~app.engine.forward.ForwardPass` on a copy of ``base``, and each row run alone
    (peft for the adapters, plain ``transformers`` for the base).

    Returns:
        ``(batched logits [3, T, V], [d1 alone, d2 alone, base alone])``, each alone ``[1, T, V]``.
    """
    alone = [peft_logits(base, d1, input_ids[0:1]), peft_logits(base, d2, input_ids[1:2])]
    with torch.no_grad():
        alone.append(base(input_ids=input_ids[2:3]).logits)
    ids = input_ids.tolist()
    out = decoder_logits(
        base, [(ids[0], [(0, 1.0)]), (ids[1], [(1, 1.0)]), (ids[2], [])],
        [read_adapter(d1, "a1"), read_adapter(d2, "a2")],
    )
    return torch.cat(out, dim=0), alone


def row_kv(cache: torch.Tensor, table, n: int) -> torch.Tensor:
    """``[kv_heads, n, head_dim]``: a row's first ``n`` positions of a cache layer ``[kv_heads, blocks, block_size,
    head_dim]``, read through its block table."""
    return cache[:, table].flatten(1, 2)[:, :n]


def decode_attention_reference(q, k, v, tables, lengths, scale) -> torch.Tensor:
    """fp64 decode attention, row by row over each row's own ``lengths[r]`` positions read through ``tables[r]``:
    ``q`` ``[n, kv_heads, G, head_dim]``, ``k``/``v`` cache layers -> ``[n, kv_heads * G * head_dim]``."""
    out = []
    for r, n in enumerate(lengths):
        kr, vr = row_kv(k, tables[r], n).double(), row_kv(v, tables[r], n).double()
        p = torch.softmax(q[r].double() @ kr.transpose(-1, -2) * scale, -1)
        out.append((p @ vr).reshape(-1))
    return torch.stack(out)
