"""Batched multi-LoRA layers against peft (one adapter per row) and against a hand-merged blend."""

from __future__ import annotations

import copy

import pytest
import torch

from app.engine.lora import LoRABatch, MultiLoRA
from app.engine.slots import NoFreeSlotError, SlotCache
from tests.factories import TARGETS, mixed_batch_and_alone, peft_logits, read_adapter, write_peft_adapter


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


def test_uniform_fast_path_matches_gather_path(tiny_model, arch, two_adapters):
    d1, _ = two_adapters
    ids = torch.randint(3, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(tiny_model)
    lora = MultiLoRA(model, max_slots=2)
    lora.write_slot(1, read_adapter(d1, "a1"))
    fast = LoRABatch.from_rows([[(1, 1.0)], [(1, 1.0)]], device=torch.device("cpu"), dtype=torch.float32)
    assert fast.uniform_slot == 1
    slow = LoRABatch(fast.idx, fast.weights, None)
    with torch.no_grad():
        with lora.routing(fast):
            a = model(input_ids=ids).logits
        with lora.routing(slow):
            b = model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a, peft_logits(tiny_model, d1, ids), atol=1e-5, rtol=1e-4)


def test_blend_matches_hand_merged_reference(tiny_model, arch, two_adapters):
    d1, d2 = two_adapters
    a1, a2 = read_adapter(d1, "a1"), read_adapter(d2, "a2")
    ids = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(2))
    weights = (0.7, -1.3)  # negative weights and sum != 1 are allowed
    ref = hand_merged_logits(tiny_model, [a1, a2], weights, ids[0:1])
    model = copy.deepcopy(tiny_model)
    lora = MultiLoRA(model, max_slots=4)
    lora.write_slot(2, a1)
    lora.write_slot(3, a2)
    rows = [[(2, weights[0]), (3, weights[1])], [(3, 1.0)]]  # row 1: a different stance in the same batch
    with torch.no_grad(), lora.routing(LoRABatch.from_rows(rows, device=torch.device("cpu"), dtype=torch.float32)):
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out[0:1], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1:2], peft_logits(tiny_model, d2, ids[1:2]), atol=1e-5, rtol=1e-4)


def test_zero_weight_blend_is_base(tiny_model, two_adapters):
    d1, _ = two_adapters
    ids = torch.randint(3, 512, (1, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
    model = copy.deepcopy(tiny_model)
    lora = MultiLoRA(model, max_slots=2)
    lora.write_slot(0, read_adapter(d1, "a1"))
    with torch.no_grad(), lora.routing(LoRABatch.from_rows([[(0, 0.0)]], device=torch.device("cpu"), dtype=torch.float32)):
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama"])
def test_slot_cache_lru_never_evicts_pinned(tiny_model, arch, tmp_path):
    ads = [
        read_adapter(write_peft_adapter(tmp_path / f"a{i}", arch, model=tiny_model, seed=i, targets=TARGETS[arch][:2]), f"a{i}")
        for i in range(3)
    ]
    loads = []
    cache = SlotCache(MultiLoRA(copy.deepcopy(tiny_model), max_slots=2), on_load=lambda k, s: loads.append(k))
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
def test_linear_shapes_unchanged_by_wrapping(tiny_model, arch, tmp_path):
    from app.registry.validation import linear_shapes

    before = linear_shapes(tiny_model)
    model = copy.deepcopy(tiny_model)
    lora = MultiLoRA(model, max_slots=2)
    lora.write_slot(0, read_adapter(write_peft_adapter(tmp_path / "a", arch, model=tiny_model), "a"))
    assert any(".base_layer" in n for n, _ in model.named_modules())
    assert linear_shapes(model) == before


@pytest.mark.slow
def test_real_smollm2_mixed_batch_logits_match_peft(tmp_path):
    """The embedded SmolLM2: one forward over rows of two adapters and the base equals peft per row."""
    from app.config import Settings
    from app.engine.model_loader import load_base_model

    base = load_base_model(Settings(device="cpu", dtype="float32")).model
    d1 = write_peft_adapter(tmp_path / "a1", "llama", model=base, rank=8, alpha=16, seed=3, scale=0.05)
    d2 = write_peft_adapter(tmp_path / "a2", "llama", model=base, rank=4, alpha=8, seed=4, scale=0.05, targets=["q_proj", "v_proj"])
    ids = torch.randint(100, 40000, (3, 12), generator=torch.Generator().manual_seed(0))
    out, refs = mixed_batch_and_alone(base, d1, d2, ids)
    assert (refs[0] - refs[2]).abs().max() > 0.1  # the adapter matters
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out[i : i + 1], ref, atol=2e-4, rtol=1e-4)
