"""Batched multi-LoRA layers against peft (one adapter per row) and against a hand-merged blend."""

from __future__ import annotations

import copy

import pytest
import torch

from app.engine.forward import ForwardPass
from app.engine.lora import LoRABatch, MultiLoRA
from app.engine.plan import Plan
from app.engine.slots import NoFreeSlotError, SlotCache
from tests.factories import (
    TARGETS,
    decoder_logits,
    mixed_batch_and_alone,
    peft_logits,
    read_adapter,
    write_peft_adapter,
)


def hand_merged_logits(base, adapters, weights, input_ids):
    """Reference blend: W' = W + sum_i w_i * s_i * B_i A_i in every targeted linear, then a plain forward."""
    model = copy.deepcopy(base)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for ad, w in zip(adapters, weights):
            for path, m in ad.modules.items():
                mods[path].weight += w * m.scaling * (m.B @ m.A)
        return model(input_ids=input_ids).logits


@pytest.fixture
def two_adapters(tiny_model, arch, tmp_path):
    d1 = write_peft_adapter(tmp_path / "a1", arch, model=tiny_model, rank=4, alpha=8, seed=1)
    d2 = write_peft_adapter(tmp_path / "a2", arch, model=tiny_model, rank=8, alpha=4, seed=2, use_rslora=True)
    return d1, d2


def test_mixed_batch_matches_peft_per_row(tiny_model, arch, two_adapters):
    d1, d2 = two_adapters
    ids = torch.randint(3, 512, (3, 7), generator=torch.Generator().manual_seed(0))
    out, (ref1, ref2, ref_base) = mixed_batch_and_alone(tiny_model, d1, d2, ids)

    # The adapters really change the output, so the comparison below can fail.
    assert not torch.allclose(ref1, ref_base[:, :, :], atol=1e-3)
    torch.testing.assert_close(out[0:1], ref1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1:2], ref2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[2:3], ref_base, atol=1e-5, rtol=1e-4)


def lora_decoder(model, adapters, slots=4):
    dec = ForwardPass(copy.deepcopy(model), prepack=4)  # as the engine runs on CPU
    lora = MultiLoRA(dec.linears, max_slots=slots)
    for slot, ad in adapters.items():
        lora.write_slot(slot, ad)
    return dec, lora


def test_uniform_fast_path_matches_gather_path(tiny_model, arch, two_adapters):
    """Both rows on one adapter: the dense path equals the per-row (prefill) and embedding_bag (decode) paths."""
    d1, _ = two_adapters
    ids = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(1)).tolist()
    dec, _ = lora_decoder(tiny_model, {1: read_adapter(d1, "a1")}, slots=2)
    fast = decoder_logits(None, [(ids[0], [(1, 1.0)]), (ids[1], [(1, 1.0)])], decoder=dec)
    slow = decoder_logits(None, [(ids[0], [(1, 1.0)]), (ids[1], [(1, 1.0), (0, 0.0)])], decoder=dec)  # not uniform
    for a, b, row in zip(fast, slow, ids):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a, peft_logits(tiny_model, d1, torch.tensor([row])), atol=1e-5, rtol=1e-4)


def count_kernel_calls(monkeypatch):
    """Wrap every decode kernel of :data:`app.engine.lora_kernels.KERNELS`; returns the per-kernel call counts."""
    from app.engine import lora_kernels

    calls = dict.fromkeys(lora_kernels.KERNELS, 0)
    for name, fn in list(lora_kernels.KERNELS.items()):
        def wrapped(*a, _name=name, _fn=fn):
            calls[_name] += 1
            return _fn(*a)
        monkeypatch.setitem(lora_kernels.KERNELS, name, wrapped)
    return calls


@pytest.mark.parametrize("kernel", ["embedding_bag", "bgmv", "cpu"])
@pytest.mark.parametrize("mix", ["blend", "plain"])
def test_decode_path_matches_peft_for_mixed_rows_and_blends(tiny_model, arch, two_adapters, mix, kernel, monkeypatch,
                                                            request):
    """One-token-per-row steps through each decode kernel over rows of two adapters, a blend (or a third plain
    adapter row: every term then has weight 1, the fast case that skips the weight multiply) and the base."""
    if kernel == "cpu":
        request.getfixturevalue("cpu_ext")
    d1, d2 = two_adapters
    a1, a2 = read_adapter(d1, "a1"), read_adapter(d2, "a2")
    dec, _ = lora_decoder(tiny_model, {0: a1, 1: a2})
    dec.set_lora_kernel(kernel)
    calls = count_kernel_calls(monkeypatch)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 6, 3, 5)]
    third = [(0, 0.5), (1, -0.25)] if mix == "blend" else [(1, 1.0)]
    routes = [[(0, 1.0)], [(1, 1.0)], third, []]
    cache, T = dec.row_cache(4, 16)
    plan = Plan.build([(T[i], p, 0) for i, p in enumerate(prompts)], dec.device)
    dec.forward(plan, cache, LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype, segments=plan.segments))
    nxt = [7, 8, 9, 10]
    step = Plan.build([(T[i], [t], len(p)) for i, (p, t) in enumerate(zip(prompts, nxt))], dec.device)
    out = dec.forward(step, cache, LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype))
    full = [p + [t] for p, t in zip(prompts, nxt)]
    ref = [
        peft_logits(tiny_model, d1, torch.tensor([full[0]]))[0, -1],
        peft_logits(tiny_model, d2, torch.tensor([full[1]]))[0, -1],
        hand_merged_logits(tiny_model, [a1, a2], (0.5, -0.25), torch.tensor([full[2]]))[0, -1]
        if mix == "blend" else peft_logits(tiny_model, d2, torch.tensor([full[2]]))[0, -1],
        tiny_model(input_ids=torch.tensor([full[3]])).logits[0, -1].detach(),
    ]
    for i in range(4):
        torch.testing.assert_close(out[i], ref[i], atol=1e-4, rtol=1e-4)
    enabled = sum(f.enabled for f in dec.linears.values())
    steps = 2 if kernel == "cpu" else 1  # the C++ kernel takes the prefill too
    assert calls == {k: steps * enabled if k == kernel else 0 for k in calls}  # the steps went through the chosen kernel


def decode_step_logits(dec, prompts, routes, nxt=7):
    """Prefill ``prompts`` routed by ``routes``, then one decode step of token ``nxt`` per row -> ``[rows, vocab]``."""
    cache, tables = dec.row_cache(len(prompts), max(map(len, prompts)) + 2)
    plan = Plan.build([(tables[i], p, 0) for i, p in enumerate(prompts)], dec.device)
    dec.forward(plan, cache, LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype, segments=plan.segments))
    step = Plan.build([(tables[i], [nxt], len(p)) for i, p in enumerate(prompts)], dec.device)
    return dec.forward(step, cache, LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype))


@pytest.mark.parametrize("others", ["same", "other_slot", "base_row", "half_weight", "padded_blend"])
def test_one_adapter_decode_takes_the_dense_path_only_when_every_row_is_that_slot(tiny_model, arch, two_adapters,
                                                                                 others, monkeypatch):
    """A decode step whose rows all use slot 1 at weight 1 skips the gathers (no kernel runs) and equals peft per
    row; any other row (another slot, the base model, weight 0.5, a padded 2-term route) takes the gather kernel,
    and the slot-1 rows still equal peft."""
    d1, d2 = two_adapters
    a1, a2 = read_adapter(d1, "a1"), read_adapter(d2, "a2")
    dec, _ = lora_decoder(tiny_model, {0: a2, 1: a1})
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 3, 6)]
    last = {"same": [(1, 1.0)], "other_slot": [(0, 1.0)], "base_row": [], "half_weight": [(1, 0.5)],
            "padded_blend": [(1, 1.0), (0, 0.0)]}[others]
    routes = [[(1, 1.0)], [(1, 1.0)], last]
    routing = LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype)
    assert (routing.uniform_slot == 1) == (others == "same")
    calls = count_kernel_calls(monkeypatch)
    out = decode_step_logits(dec, prompts, routes)
    assert (sum(calls.values()) == 0) == (others == "same")
    for i in range(3 if others in ("same", "padded_blend") else 2):
        want = peft_logits(tiny_model, d1, torch.tensor([prompts[i] + [7]]))[0, -1]
        torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4)
    if others == "other_slot":
        torch.testing.assert_close(out[2], peft_logits(tiny_model, d2, torch.tensor([prompts[2] + [7]]))[0, -1],
                                   atol=1e-4, rtol=1e-4)
    elif others == "base_row":
        torch.testing.assert_close(out[2], tiny_model(input_ids=torch.tensor([prompts[2] + [7]])).logits[0, -1].detach(),
                                   atol=1e-4, rtol=1e-4)
    elif others == "half_weight":
        want = hand_merged_logits(tiny_model, [a1], (0.5,), torch.tensor([prompts[2] + [7]]))[0, -1]
        torch.testing.assert_close(out[2], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_rows", [256, 0], ids=["block_diagonal_b", "b_per_part"])
def test_one_adapter_path_follows_a_slot_rewritten_in_place(tiny_model, arch, two_adapters, block_rows, monkeypatch):
    """The one-slot path's block-diagonal B is built from the slot it serves: after another adapter is written into
    that slot (and after the slots grow), a decode step on it equals peft of the new adapter; with the per-part
    products (block rows 0) too."""
    from app.engine import lora

    monkeypatch.setattr(lora, "BLOCK_B_ROWS", block_rows)
    d1, d2 = two_adapters
    dec, multi = lora_decoder(tiny_model, {1: read_adapter(d1, "a1")}, slots=2)
    prompts = [[5, 9, 13], [7, 11]]
    routes = [[(1, 1.0)], [(1, 1.0)]]

    def check(d):
        out = decode_step_logits(dec, prompts, routes)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(out[i], peft_logits(tiny_model, d, torch.tensor([p + [7]]))[0, -1],
                                       atol=1e-4, rtol=1e-4)

    check(d1)
    built = [f._block for f in dec.linears.values() if f.enabled]
    assert built and all((b is not None) == (block_rows > 0) for b in built)
    multi.write_slot(1, read_adapter(d2, "a2"))  # same slot tensors, new contents (rank 8 > 4: they grow first)
    check(d2)
    multi.write_slot(1, read_adapter(d1, "a1"))
    check(d1)


def test_small_cpu_lora_products_run_single_threaded_and_restore_the_thread_count(tiny_model, arch, two_adapters,
                                                                                  monkeypatch):
    """The LoRA terms of a decode step run at one torch thread on CPU (the base matmuls at all of them), and the
    count is restored afterwards, also when a kernel raises; an input past SMALL_ROWS keeps every thread."""
    from app.engine import lora_kernels
    from app.engine.lora_kernels import SMALL_ROWS, serial_threads

    d1, d2 = two_adapters
    dec, _ = lora_decoder(tiny_model, {0: read_adapter(d1, "a1"), 1: read_adapter(d2, "a2")})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        real = lora_kernels.KERNELS["embedding_bag"]

        def spy(*a):
            seen.append(torch.get_num_threads())
            return real(*a)

        monkeypatch.setitem(lora_kernels.KERNELS, "embedding_bag", spy)
        decode_step_logits(dec, [[5, 6, 7], [8, 9]], [[(0, 1.0)], [(1, 1.0)]])
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2

        with pytest.raises(RuntimeError, match="boom"):
            with serial_threads(torch.zeros(4, 8)):
                assert torch.get_num_threads() == 1
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        with serial_threads(torch.zeros(SMALL_ROWS + 1, 8)):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_decode_kernel_table():
    """Each device and dtype gets a kernel from the table; a device type it does not name gets embedding_bag."""
    from app.engine.lora_kernels import DECODE_KERNELS, KERNELS, decode_kernel_for

    for (device, dtype), name in DECODE_KERNELS.items():
        assert name in KERNELS
        if dtype is not None:
            assert decode_kernel_for(torch.device(device), dtype) == name
    assert decode_kernel_for(torch.device("cpu"), torch.float16) == DECODE_KERNELS[("cpu", None)]
    assert decode_kernel_for(torch.device("meta"), torch.float32) == "embedding_bag"


def test_blend_matches_hand_merged_reference(tiny_model, arch, two_adapters):
    d1, d2 = two_adapters
    a1, a2 = read_adapter(d1, "a1"), read_adapter(d2, "a2")
    ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(2))
    weights = (0.7, -1.3)  # negative weights and sum != 1 are allowed
    ref = hand_merged_logits(tiny_model, [a1, a2], weights, ids[0:1])
    dec, _ = lora_decoder(tiny_model, {2: a1, 3: a2})
    rows = [(ids[0].tolist(), [(2, weights[0]), (3, weights[1])]), (ids[1].tolist(), [(3, 1.0)])]  # row 1: another stance
    out = decoder_logits(None, rows, decoder=dec)
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], peft_logits(tiny_model, d2, ids[1:2]), atol=1e-5, rtol=1e-4)


def test_zero_weight_blend_is_base(tiny_model, two_adapters):
    d1, _ = two_adapters
    ids = torch.randint(3, 512, (1, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
    dec, _ = lora_decoder(tiny_model, {0: read_adapter(d1, "a1")}, slots=2)
    out = decoder_logits(None, [(ids[0].tolist(), [(0, 0.0)])], decoder=dec)[0]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_growing_rank_and_slots_keeps_loaded_adapters(tiny_model, arch, tmp_path):
    """A rank-4 adapter loaded first keeps its exact output after a rank-8 one grows every slot tensor."""
    d4 = write_peft_adapter(tmp_path / "r4", arch, model=tiny_model, rank=4, seed=5)
    d8 = write_peft_adapter(tmp_path / "r8", arch, model=tiny_model, rank=8, seed=6)
    dec = ForwardPass(copy.deepcopy(tiny_model))
    lora = MultiLoRA(dec.linears, max_slots=4, initial_slots=1)
    lora.write_slot(0, read_adapter(d4, "r4"))
    lora.write_slot(3, read_adapter(d8, "r8"))  # grows slots 1 -> 4 and rank 4 -> 8
    assert lora.slots == 4 and lora.rank == 8
    ids = [5, 9, 13, 17]
    out = decoder_logits(None, [(ids, [(0, 1.0)]), (ids, [(3, 1.0)])], decoder=dec)
    torch.testing.assert_close(out[0], peft_logits(tiny_model, d4, torch.tensor([ids])), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], peft_logits(tiny_model, d8, torch.tensor([ids])), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama"])
def test_slot_cache_lru_never_evicts_pinned(tiny_model, arch, tmp_path):
    ads = [
        read_adapter(write_peft_adapter(tmp_path / f"a{i}", arch, model=tiny_model, seed=i, targets=TARGETS[arch][:2]), f"a{i}")
        for i in range(3)
    ]
    loads = []
    cache = SlotCache(MultiLoRA(ForwardPass(copy.deepcopy(tiny_model)).linears, max_slots=2), on_load=lambda k, s: loads.append(k))
    s0 = cache.acquire(ads[0])
    s1 = cache.acquire(ads[1])
    assert s0 != s1
    with pytest.raises(NoFreeSlotError):
        cache.acquire(ads[2])  # both pinned
    cache.release(s0)
    s2 = cache.acquire(ads[2])  # evicts a0, the only unpinned one
    assert s2 == s0 and ads[0].id not in cache and cache.stats.evictions == 1
    assert cache.acquire(ads[1]) == s1 and cache.stats.hits == 1
    assert loads == [a.id for a in ads] and cache.keys() == [ads[2].id, ads[1].id]
    assert cache.stats.misses == 4 and cache.stats.last_load_seconds > 0  # the refused acquire was a miss too
    assert cache.stats.load_seconds_total >= cache.stats.last_load_seconds
    with pytest.raises(RuntimeError):
        cache.release(s0)
        cache.release(s0)


@pytest.mark.parametrize("arch", ["phi"])
def test_linear_shapes_unchanged_by_fusing(tiny_model, arch, tmp_path):
    from app.registry.validation import linear_shapes

    before = linear_shapes(tiny_model)
    model = copy.deepcopy(tiny_model)
    lora = MultiLoRA(ForwardPass(model).linears, max_slots=2)
    lora.write_slot(0, read_adapter(write_peft_adapter(tmp_path / "a", arch, model=tiny_model), "a"))
    assert linear_shapes(model) == before


def test_unknown_target_module_is_refused(tiny_model, arch, tmp_path):
    from app.registry.adapter import AdapterWeights

    ad = read_adapter(write_peft_adapter(tmp_path / "a", arch, model=tiny_model), "a")
    m = next(iter(ad.modules.values()))
    bad = AdapterWeights(ad.id, {"model.layers.0.nonexistent": m})
    lora = MultiLoRA(ForwardPass(copy.deepcopy(tiny_model)).linears, max_slots=2)
    with pytest.raises(KeyError, match="nonexistent"):
        lora.write_slot(0, bad)


@pytest.mark.slow
def test_real_smollm2_mixed_batch_logits_match_peft(tmp_path):
    """The embedded SmolLM2: one forward over rows of two adapters and the base equals peft per row."""
    from app.config import Settings
    from app.model_loader import load_base_model

    base = load_base_model(Settings(device="cpu", dtype="float32")).model
    d1 = write_peft_adapter(tmp_path / "a1", "llama", model=base, rank=8, alpha=16, seed=3, scale=0.05)
    d2 = write_peft_adapter(tmp_path / "a2", "llama", model=base, rank=4, alpha=8, seed=4, scale=0.05, targets=["q_proj", "v_proj"])
    ids = torch.randint(100, 40000, (3, 12), generator=torch.Generator().manual_seed(0))
    out, refs = mixed_batch_and_alone(base, d1, d2, ids)
    assert (refs[0] - refs[2]).abs().max() > 0.1  # the adapter matters
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out[i : i + 1], ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("rows_of_blend", [(0, 1), (0, 1, 3)], ids=["adjacent", "scattered"])
def test_prefill_of_one_blend_on_several_rows(tiny_model, arch, two_adapters, rows_of_blend):
    """Rows of one blend: adjacent ones at equal weights share one slice per slot (no gather); with a row of another
    stance between them, each slot gathers its tokens. Every row equals its reference (hand-merged blend, peft)."""
    d1, d2 = two_adapters
    a1, a2 = read_adapter(d1, "a1"), read_adapter(d2, "a2")
    dec, _ = lora_decoder(tiny_model, {0: a1, 1: a2})
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 3, 4, 6, 2)][: max(rows_of_blend) + 2]
    blend = [(0, 0.5), (1, 0.5)]
    routes = [blend if i in rows_of_blend else [(1, 1.0)] for i in range(len(ids))]
    plan = Plan.build([([i + 1], p, 0) for i, p in enumerate(ids)], dec.device)  # one block each: only segments count
    groups = {s: t for s, t, _ in LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype,
                                                         segments=plan.segments).slot_groups}
    if rows_of_blend == (0, 1):
        assert groups[0] == slice(0, 8)  # rows 0 and 1 (5 + 3 tokens), one run at weight 0.5
    else:
        assert isinstance(groups[0], torch.Tensor) and groups[0].tolist() == [*range(8), *range(12, 18)]
    assert isinstance(groups[1], torch.Tensor)  # weights 0.5 and 1.0: never merged
    out = decoder_logits(None, [(p, r) for p, r in zip(ids, routes)], decoder=dec)
    for p, r, got in zip(ids, routes, out):
        want = (hand_merged_logits(tiny_model, [a1, a2], (0.5, 0.5), torch.tensor([p])) if r == blend
                else peft_logits(tiny_model, d2, torch.tensor([p])))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fp16_padding_terms_never_carry_another_adapters_overflow(tiny_model, arch, two_adapters):
    """fp16: slot 0 holds an adapter whose ``A x`` overflows to inf. A base-model row next to a 2-term blend pads
    its terms with (slot 0, weight 0), and inf * 0 is NaN; the row must still equal the base model run alone."""
    d1, d2 = two_adapters
    huge = read_adapter(d1, "a1")
    for m in huge.modules.values():
        m.A.fill_(65000.0)
    dec = ForwardPass(copy.deepcopy(tiny_model).half())
    lora = MultiLoRA(dec.linears, max_slots=4)
    for slot, ad in ((0, huge), (1, read_adapter(d1, "a1")), (2, read_adapter(d2, "a2"))):
        lora.write_slot(slot, ad)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 4)]

    def step(routes, rows):
        cache, T = dec.row_cache(2, 16)
        plan = Plan.build([(T[i], prompts[r], 0) for i, r in enumerate(rows)], dec.device)
        dec.forward(plan, cache, LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype, segments=plan.segments))
        step = Plan.build([(T[i], [7], len(prompts[r])) for i, r in enumerate(rows)], dec.device)
        return dec.forward(step, cache, LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype))

    mixed = step([[], [(1, 0.5), (2, 0.5)]], [0, 1])
    alone = step([[]], [0])
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[0], alone[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_decode_kernel_gives_a_row_its_bits_whatever_the_other_rows(cpu_ext, tiny_model, arch,
                                                                        two_adapters, dtype):
    """With the C++ kernels (attention, fused steps and the ``"cpu"`` LoRA kernel) a decode row's logits are the same
    bits alone, among rows of other adapters, blends and the base model, and among rows all on its own adapter (the
    step the other kernels send down the dense path). The rows' KV is prefilled once, together; each decode step
    then rewrites only its rows' next position."""
    d1, d2 = two_adapters
    dec = ForwardPass(copy.deepcopy(tiny_model).to(dtype), prepack=16, attention_kernel=True)
    lora = MultiLoRA(dec.linears, max_slots=4)
    lora.write_slot(0, read_adapter(d1, "a1"))
    lora.write_slot(1, read_adapter(d2, "a2"))
    dec.set_lora_kernel("cpu")
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 9, 3, 6, 5, 5)]
    routes = [[(0, 1.0)], [(1, 1.0)], [(0, 0.5), (1, -0.25)], [], [(0, 1.0)], [(0, 1.0)]]
    cache, T = dec.row_cache(len(prompts), 16)
    plan = Plan.build([(T[i], p, 0) for i, p in enumerate(prompts)], dec.device)
    dec.forward(plan, cache, LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype, segments=plan.segments))

    def step(rows):
        plan = Plan.build([(T[i], [7], len(prompts[i])) for i in rows], dec.device)
        return dec.forward(plan, cache, LoRABatch.from_rows([routes[i] for i in rows], device=dec.device,
                                                            dtype=dec.dtype))

    together = step(range(len(prompts)))
    for i in range(4):
        assert torch.equal(step([i])[0], together[i]), i
    uniform = step([0, 4, 5])  # every row slot 0 at weight 1
    for j, i in enumerate((0, 4, 5)):
        assert torch.equal(uniform[j], together[i])


def test_cpu_kernel_prefill_matches_peft_per_row(cpu_ext, tiny_model, arch, two_adapters):
    """Prefill through the C++ LoRA kernel (rows of 1 to 11 tokens: whole and partial tiles of 4) over rows of two
    adapters, a blend and the base model, each against peft (or the hand-merged blend) alone."""
    d1, d2 = two_adapters
    a1, a2 = read_adapter(d1, "a1"), read_adapter(d2, "a2")
    dec, _ = lora_decoder(tiny_model, {0: a1, 1: a2})
    dec.set_lora_kernel("cpu")
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (11, 1, 6, 8)]
    routes = [[(0, 1.0)], [(1, 1.0)], [(0, 0.5), (1, -0.25)], []]
    out = decoder_logits(None, list(zip(ids, routes)), decoder=dec)
    refs = [peft_logits(tiny_model, d1, torch.tensor([ids[0]])), peft_logits(tiny_model, d2, torch.tensor([ids[1]])),
            hand_merged_logits(tiny_model, [a1, a2], (0.5, -0.25), torch.tensor([ids[2]])),
            tiny_model(input_ids=torch.tensor([ids[3]])).logits.detach()]
    assert not torch.allclose(refs[0], tiny_model(input_ids=torch.tensor([ids[0]])).logits, atol=1e-3)
    for got, ref in zip(out, refs):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
