"""The engine's own forward pass (:class:`~app.engine.forward.ForwardPass`) against ``transformers``' logits.

For every supported architecture (tiny random models: Llama with GQA and tied embeddings, Qwen2 with
q/k/v biases, Phi with parallel blocks and partial rotary, Qwen3 with q/k norms, Mistral), rows of
different lengths are prefilled in one packed pass, prefilled in chunks, and decoded token by token (attention
through PyTorch and, on CPU, through the C++ kernels of :mod:`app.engine.cpu_kernels`)
on block tables handed out round-robin and across block boundaries, and every logit is compared with the Hugging Face model's own forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

from app.engine.forward import ForwardPass, UnsupportedModelError
from app.engine.kv_cache import blocks_for
from app.engine.plan import Plan
from tests.factories import build_tiny_model, decode_attention_reference, decoder_logits

ATOL = 1e-4


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch-attention", "cpu-kernel"])
@pytest.mark.parametrize("prepack", [None, 4], ids=["dense", "prepacked"])
def test_packed_prefill_matches_transformers(any_model, prepack, kernel):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (7, 1, 12, 40)]
    out = decoder_logits(any_model, [(ids, []) for ids in rows], prepack=prepack, attention_kernel=kernel)
    for ids, got in zip(rows, out):
        torch.testing.assert_close(got, hf_logits(any_model, ids), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch-attention", "cpu-kernel"])
@pytest.mark.parametrize("prepack", [None, 2], ids=["dense", "prepacked"])
def test_chunked_prefill_and_decode_on_shuffled_rows_match_transformers(any_model, prepack, kernel):
    ref_model = any_model
    dec = ForwardPass(copy.deepcopy(any_model), prepack=prepack, attention_kernel=kernel)
    assert dec.prepacked == (prepack is not None and dec.device.type == "cpu")
    cache, T = dec.row_cache(4, 64)
    g = torch.Generator().manual_seed(1)
    seqs = {3: torch.randint(3, 512, (9,), generator=g).tolist(), 1: torch.randint(3, 512, (5,), generator=g).tolist()}
    # prefill in two chunks: 4 tokens of each row, then the rest
    dec.forward(Plan.build([(T[r], s[:4], 0) for r, s in seqs.items()], dec.device), cache, None)
    last = dec.forward(Plan.build([(T[r], s[4:], 4) for r, s in seqs.items()], dec.device), cache, None)
    for i, s in enumerate(seqs.values()):
        torch.testing.assert_close(last[i], hf_logits(ref_model, s)[0, -1], atol=ATOL, rtol=1e-4)
    for _ in range(3):  # greedy decode, rows 3 and 1 (not contiguous)
        nxt = {r: int(last[i].argmax()) for i, r in enumerate(seqs)}
        plan = Plan.build([(T[r], [nxt[r]], len(seqs[r])) for r in seqs], dec.device)
        assert plan.decode
        last = dec.forward(plan, cache, None)
        for i, r in enumerate(seqs):
            seqs[r].append(nxt[r])
            torch.testing.assert_close(last[i], hf_logits(ref_model, seqs[r])[0, -1], atol=ATOL, rtol=1e-4)


def test_decode_across_block_boundaries_on_scattered_blocks_matches_transformers(any_model):
    """Rows of 14, 16 and 31 tokens decode 4 tokens each, crossing position 16 and 32 (block boundaries), on block
    tables taken in no order (new blocks handed out as the rows grow, as the scheduler does): every step's logits
    equal transformers'; rows whose tables list the same blocks in another order would read other positions."""
    dec = ForwardPass(copy.deepcopy(any_model))
    cache = dec.new_cache(16)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (14, 16, 31)]
    tables = [[] for _ in seqs]
    for t, s in zip(reversed(tables), reversed(seqs)):  # the longest row takes the lowest blocks
        t += cache.allocate(blocks_for(len(s)))
    last = dec.forward(Plan.build([(t, s, 0) for t, s in zip(tables, seqs)], dec.device), cache, None)
    for _ in range(4):
        nxt = [int(x.argmax()) for x in last]
        for t, s in zip(tables, seqs):
            if blocks_for(len(s) + 1) > len(t):
                t += cache.allocate(1)
        last = dec.forward(Plan.build([(t, [x], len(s)) for t, s, x in zip(tables, seqs, nxt)], dec.device), cache, None)
        for i, (s, x) in enumerate(zip(seqs, nxt)):
            s.append(x)
            torch.testing.assert_close(last[i], hf_logits(any_model, s)[0, -1], atol=ATOL, rtol=1e-4)
    assert [len(t) for t in tables] == [2, 2, 3] and sorted(b for t in tables for b in t) == list(range(1, 8))
    cache.pool.check()


def test_rows_of_very_different_lengths_attend_in_groups_and_match_transformers(any_model):
    """Rows of 3, 4 and 70 tokens: the decode step splits them into a 1-block and a 5-block group (not three rows
    of 5 blocks); the logits equal the one-group step's and transformers'."""
    dec = ForwardPass(copy.deepcopy(any_model))
    cache, T = dec.row_cache(3, 80)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 4, 70)]
    dec.forward(Plan.build([(T[i], s, 0) for i, s in enumerate(seqs)], dec.device), cache, None)
    step = lambda: Plan.build([(T[i], [9], len(s)) for i, s in enumerate(seqs)], dec.device)  # noqa: E731
    plan = step()
    assert [g.tables.shape[1] for g in plan.groups] == [1, 5] and plan.groups[1].rows.tolist() == [2]
    split = dec.forward(plan, cache, None)
    one = step()
    one.groups = None  # a single group over the padded tables
    torch.testing.assert_close(split, dec.forward(one, cache, None), atol=1e-5, rtol=1e-5)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(split[i], hf_logits(any_model, s + [9])[0, -1], atol=ATOL, rtol=1e-4)
    assert Plan.build([(T[i], [9], 30 + i) for i in range(3)], dec.device).groups is None  # similar lengths: one group


@pytest.mark.parametrize("kw", [{}, {"prepack": 4, "keep_dense": True}], ids=["dense", "prepacked-keep-dense"])
def test_hf_model_still_runs_on_the_fused_weights(kw):
    model = build_tiny_model("qwen2")  # untied lm_head: prepacking alone would free every linear weight
    ids = [4, 5, 6, 7]
    before = hf_logits(model, ids)
    ForwardPass(model, **kw)  # q/k/v and gate/up weights become views of the fused copies
    torch.testing.assert_close(hf_logits(model, ids), before)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prepacking_frees_dense_weights_but_keeps_a_tied_embedding(arch):
    model = build_tiny_model(arch)  # llama: tied lm_head; qwen2: untied
    tied = model.config.tie_word_embeddings
    dec = ForwardPass(model, prepack=4)
    if not dec.prepacked:
        pytest.skip("no oneDNN prepacking on this device")
    for name, f in dec.linears.items():
        assert f.packed is not None
        keeps = name == "lm_head" and tied
        assert (f.weight.numel() > 0) == keeps, name
    assert model.model.layers[0].self_attn.q_proj.weight.numel() == 0  # the HF module no longer holds a copy
    assert model.model.embed_tokens.weight.numel() > 0


def test_unsupported_architecture_is_named():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2.*llama"):
        ForwardPass(model)


def test_packed_row_buckets_bound_the_shapes():
    from app.engine.lora import DECODE_ROW_STEP, PACKED_ROW_BUCKET, packed_rows

    assert [packed_rows(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [2, 2, 4, 8, 8, 16, 16]
    assert packed_rows(1, 1) == 1 and packed_rows(12, 12) == 12 and packed_rows(9, 12) == 12
    assert [packed_rows(n, 256) for n in (17, 48, 49, 250, 256)] == [32, 48, 64, 256, 256]
    assert packed_rows(17, 16) == PACKED_ROW_BUCKET and packed_rows(PACKED_ROW_BUCKET + 1, 16) == 2 * PACKED_ROW_BUCKET
    assert len({packed_rows(n, 16) for n in range(1, 513)}) == 4 + 512 // PACKED_ROW_BUCKET
    assert len({packed_rows(n, 256) for n in range(1, 513)}) == 4 + (256 - DECODE_ROW_STEP) // DECODE_ROW_STEP + 256 // PACKED_ROW_BUCKET


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_alone_gets_the_bits_it_gets_among_others(dtype):
    """A packed linear with a long reduction (1536 wide, as a down projection) gives each row the same bits
    whether it runs alone or with 63 others: one-row products are padded to two rows, as oneDNN's one-row kernel
    rounds such sums differently (without the padding some of these rows differ)."""
    from app.engine.lora import FusedLinear, prepack_supported

    if not prepack_supported(torch.device("cpu"), dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 576, bias=False).to(dtype)
    fused = FusedLinear("down", [("down", lin)])
    assert fused.prepack(256)
    x = torch.randn(64, 1536).to(dtype)
    together = fused.base(x)
    assert all(torch.equal(fused.base(x[r : r + 1])[0], together[r]) for r in range(64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_decode_attention_equals_sdpa(any_model, dtype):
    """The CPU decode attention (two matmuls and a softmax; fp32 scores in bf16) against SDPA's, on rows of
    different lengths."""
    dec = ForwardPass(copy.deepcopy(any_model).to(dtype))
    assert dec.matmul_decode_attention  # CPU
    cache, T = dec.row_cache(3, 32)
    rows = {0: [5, 6, 7, 8, 9, 10, 11], 1: [9, 10], 2: [3, 4, 5, 6]}
    dec.forward(Plan.build([(T[r], s, 0) for r, s in rows.items()], dec.device), cache, None)
    out = {}
    for matmul in (True, False):
        dec.matmul_decode_attention = matmul
        out[matmul] = dec.forward(Plan.build([(T[r], [12], len(s)) for r, s in rows.items()], dec.device), cache, None)
    assert not torch.allclose(out[True][0], out[True][1], atol=1e-3)  # rows really differ
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[True].float(), out[False].float(), atol=tol, rtol=tol)


def test_bf16_decode_attention_keeps_fp32_scores(any_model):
    """In bf16 the matmul decode attention is as accurate as SDPA's fused kernel against an fp64 reference, at
    score magnitudes where rounding the scores to bf16 would cost ~10x the error (so its scores stay fp32)."""
    from app.engine.plan import DecodeGroup

    dec = ForwardPass(copy.deepcopy(any_model).to(torch.bfloat16))
    cache, T = dec.row_cache(4, 48)
    gen = torch.Generator().manual_seed(0)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=gen) * 3)
    lengths = [48, 40, 33, 17]
    group = DecodeGroup(None, torch.tensor(T), torch.tensor([n - 1 for n in lengths]), cache.block_size)
    q = (torch.randn(4, dec.num_heads, dec.head_dim, generator=gen) * 3).to(torch.bfloat16)
    qg = q.view(4, dec.kv_heads, dec.num_heads // dec.kv_heads, dec.head_dim)
    ref = decode_attention_reference(qg, cache.k[0], cache.v[0], T, lengths, dec.scaling)
    err = {}
    for matmul in (True, False):
        dec.matmul_decode_attention = matmul
        err[matmul] = (dec._decode_attention(q, group, 0, cache, None).double() - ref).abs().max().item()
    assert err[True] <= 2 * err[False] + 1e-3, err
