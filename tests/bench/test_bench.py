"""Benchmark building blocks: dummy-weight configs match the published model sizes; scenarios run on a tiny model."""

from __future__ import annotations

import pytest
import torch

from app.engine.request import Stance
from bench.models import CONFIGS, BenchModel, random_adapter
from bench.scenarios import EngineBench, blend, cold_load, many_adapters, pct, stance
from tests.factories import build_tiny_model, load_tokenizer

#: Parameter counts published on each model card (approximate, in billions).
PUBLISHED = {"smollm2-135m": 0.135, "qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.61, "phi-2": 2.78}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dummy_configs_have_the_published_size(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(CONFIGS[name])
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):  # no memory, no init
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.03, n


def test_pct_nearest_rank():
    assert pct([], 0.5) is None
    assert pct([3.0, 1.0, 2.0], 0.5) == 2.0
    assert pct(list(range(101)), 0.99) == 99


def test_engine_scenarios_run_on_a_tiny_model():
    model = build_tiny_model("llama")
    bm = BenchModel(model, load_tokenizer(), "tiny", "llama", torch.device("cpu"), torch.float32, set(), 512, 0)
    ads = [random_adapter(model, "llama", f"a{i}", rank=4, seed=i) for i in range(4)]
    assert len(ads[0].modules) == 2 * 7
    eb = EngineBench(bm, prompt_len=8, max_tokens=5, max_loras=8, max_batch_size=4)
    try:
        for mix in ([Stance.base()] * 4, [stance(a) for a in ads], [blend(ads[:3])] * 4):
            r = eb.run(mix)
            assert r["output_tokens"] == 20 and r["output_tok_per_s"] > 0 and r["ttft_s_p50"] > 0
            assert r["decode_rows_per_step"] is not None
        busy = eb.busy_ttft(probes=2, background=3)
        assert busy["ratio_p50"] > 0
        soak = eb.soak([Stance.base(), stance(ads[0])], requests=8, max_tokens=2, checkpoints=2)
        assert soak["requests"] == 8 and len(soak["memory_bytes_at_checkpoints"]) == 2
        assert soak["growth_after_warmup_bytes"] == soak["memory_bytes_at_checkpoints"][1] - soak["memory_bytes_at_checkpoints"][0]
    finally:
        eb.close()
    assert not any(".base_layer" in n for n, _ in model.named_modules())  # unwrapped again


def test_store_scenarios_run_on_a_tiny_model(tmp_path):
    """cold_load (each load cold: the slot is dropped by version) and many_adapters (a scanned store)."""
    model = build_tiny_model("llama")
    bm = BenchModel(model, load_tokenizer(), "tiny", "llama", torch.device("cpu"), torch.float32, set(), 512, 0)
    eb = EngineBench(bm, prompt_len=8, max_tokens=3, max_loras=2, max_batch_size=4)
    try:
        cold = cold_load(eb, bm, tmp_path, n=3, rank=4, alpha=8.0)
        assert cold["adapters"] == 3 and eb.engine.slots.resident == 0 and eb.engine.slots.stats.misses == 3
    finally:
        eb.close()
    many = many_adapters(bm, tmp_path, n_adapters=5, slots=2, requests=8, concurrency=4, prompt_len=8,
                         max_tokens=3, rank=4, max_cpu_loras=3)
    assert many["output_tokens"] == 24 and many["slot_misses"] >= 2


def test_random_adapters_are_content_addressed():
    model = build_tiny_model("llama")
    a, same, other = (random_adapter(model, "llama", "a", rank=2, seed=s) for s in (0, 0, 1))
    assert a.id == same.id != other.id and a.id.name == "a"
    assert blend([a, same]).terms == ((a, 1.0),)  # listed twice: twice the weight


@pytest.mark.slow
def test_compile_scenario_times_eager_and_compiled_steps():
    from bench.decode import compiled_step

    model = build_tiny_model("llama")
    bm = BenchModel(model, load_tokenizer(), "tiny", "llama", torch.device("cpu"), torch.float32, set(), 512, 0)
    out = compiled_step(bm, rows=2, context=4, repeats=1)
    for k in ("eager_dense_step_s", "eager_prepacked_step_s", "compiled_step_s", "compile_s", "compiled_vs_engine"):
        assert out[k] > 0, k
    assert model.model.layers[0].self_attn.q_proj.weight.numel() > 0  # each variant ran on its own copy


def test_dtype_parity_counts_agreement_on_a_tiny_model():
    from bench.parity import dtype_parity, probe_prompts

    prompts = probe_prompts(per_stance=1)
    assert len(prompts) == 3 and all(isinstance(p, str) and p for p in prompts)
    same = dtype_parity(build_tiny_model("llama"), load_tokenizer(), prompts, max_tokens=4, dtype=torch.float32)
    assert same["token_agreement"] == same["prefix_agreement"] == same["identical_answers"] == 1.0
    low = dtype_parity(build_tiny_model("llama"), load_tokenizer(), prompts, max_tokens=4, dtype=torch.bfloat16)
    assert 0.0 <= low["prefix_agreement"] <= low["token_agreement"] <= 1.0  # agreeing prefixes are agreeing tokens
    assert low["dtype"] == "bfloat16" and low["prompts"] == 3


def test_step_scenario_counts_the_weight_bytes_each_mix_reads():
    """The step scenario's byte counts: every base weight once, and each distinct slot once however many rows use it."""
    from bench.cli import _step_scenario

    model = build_tiny_model("llama")
    bm = BenchModel(model, load_tokenizer(), "tiny", "llama", torch.device("cpu"), torch.float32, set(), 512, 0)
    ads = [random_adapter(model, "llama", f"a{i}", rank=4, seed=i) for i in range(4)]
    eb = EngineBench(bm, prompt_len=8, max_tokens=3, max_loras=8, max_batch_size=4)
    try:
        out = _step_scenario(eb, ads, 4, 10)
        lora = eb.engine.lora
        per_slot = lora.slot_bytes() // lora.slots
    finally:
        eb.close()
    linear_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers"))
    linear_params += model.lm_head.weight.numel()
    assert out["base_weight_bytes"] == {"base_bytes": 4 * linear_params, "lora_bytes": 0, "slots_read": 0,
                                        "bytes_bound_ratio": 1.0}
    assert out["one_adapter_weight_bytes"]["lora_bytes"] == per_slot > 0
    assert out["distinct_adapters_weight_bytes"]["lora_bytes"] == 4 * per_slot
    assert out["blend3_weight_bytes"]["slots_read"] == 4  # 3 terms per row, rotating over the 4 slots
    assert 1.0 > out["one_adapter_weight_bytes"]["bytes_bound_ratio"] > out["distinct_adapters_weight_bytes"]["bytes_bound_ratio"]
    assert out["base_step_ratio_to_base"] == 1.0 and out["distinct_adapters_step_ratio_to_base"] > 0
    assert out["matmul_roofline_s"] > 0 and out["profile_base"][-1]["op"] == "(all ops)"
    own = "cpu" if eb.engine.forward_pass.kernels() is not None else "embedding_bag"  # the C++ kernel where it builds
    assert out["profile_one_adapter"][-1]["op"] == "(all ops)" and out["decode_kernel"] == own
    assert out["one_adapter_alternating_ratio_to_base"] == pytest.approx(
        out["alternating_base_step_s"] / out["alternating_one_adapter_step_s"], rel=0.05)
    timed = {"embedding_bag", "bgmv"} | ({"cpu"} if own == "cpu" else set())
    for k in ("distinct_adapters", "blend3"):  # every kernel that runs here timed, the engine's own restored after
        assert set(out[f"{k}_step_s_by_kernel"]) == timed
        assert all(t > 0 for t in out[f"{k}_step_s_by_kernel"].values())
    assert {f.decode_kernel for f in eb.engine.forward_pass.linears.values()} == {own}
    # the roofline ratio pairs a step and a roofline timed in alternating rounds (times rounded to microseconds:
    # the tiny model's roofline is tens of them)
    assert out["base_step_vs_roofline"] == pytest.approx(out["base_step_paired_s"] / out["matmul_roofline_s"], rel=0.05)


def test_structured_scenario_and_grammar_libraries_on_a_tiny_model():
    """The structured scenario runs both batches (constrained rows generate every token: the schema cannot end),
    and the library comparison feeds each schema's instance through llguidance token by token."""
    from bench.structured import grammar_libraries, structured_scenario

    model = build_tiny_model("llama")
    bm = BenchModel(model, load_tokenizer(), "tiny", "llama", torch.device("cpu"), torch.float32, set(), 512, 0)
    ads = [random_adapter(model, "llama", f"a{i}", rank=4, seed=i) for i in range(4)]
    eb = EngineBench(bm, prompt_len=8, max_tokens=6, max_loras=8, max_batch_size=4)
    try:
        r = structured_scenario(eb, [stance(a) for a in ads], repeats=1)
    finally:
        eb.close()
    assert r["rows"] == 4 and r["constrained_rows"] == 2
    assert r["free_tok_per_s"] > 0 and r["constrained_tok_per_s"] > 0 and r["ratio"] > 0
    assert r["mask_s_per_decode_step"] > 0 and r["schema_compile_s"] > 0
    libs = grammar_libraries(load_tokenizer(), 512, repeats=1)
    for name in ("person", "order"):
        assert libs[name]["tokens"] > 10 and libs[name]["llguidance_mask_s_per_token"] > 0


def test_capacity_scenario_runs_on_a_tiny_model():
    """Streams of random and of chat prompts at the former 16-row cap and at the default one, then long and short
    prompts together in one budget."""
    from bench.capacity import capacity

    model = build_tiny_model("llama")
    bm = BenchModel(model, load_tokenizer(), "tiny", "llama", torch.device("cpu"), torch.float32, set(), 512, 0)
    out = capacity(bm, random_adapter(model, "llama", "a0", rank=4, seed=0), streams=(4, 20), prompt_len=8,
                   max_tokens=4, max_model_len=128, long_prompts=2, long_len=100, short_requests=6, chat_streams=(18,))
    for key in ("base_4", "one_adapter_20", "chat_base_18", "chat_one_adapter_18"):
        row = out[key]
        assert row["rows16"]["output_tokens"] == row["paged"]["output_tokens"] > 0 and row["tok_per_s_ratio"] > 0
    chat = out["chat_one_adapter_18"]
    assert (chat["prompts"], chat["stance"], chat["streams"]) == ("chat", "one_adapter", 18)
    assert chat["paged"]["ttft_s_p50_floor"] is None and out["base_20"]["prompts"] == "random"
    assert chat["rows16"]["decode_rows_peak"] <= 16 and chat["paged"]["max_batch_size"] > 16
    assert out["chat_prompt_tokens"] and min(out["chat_prompt_tokens"]) > 8  # the template's turn markers at least
    assert out["base_20"]["rows16"]["decode_rows_peak"] <= 16 and out["base_20"]["paged"]["max_batch_size"] > 16
    mixed = out["mixed_lengths"]
    assert mixed["output_tokens"] == 8 * 4 and 0 < mixed["kv_bytes_peak"] <= out["kv_budget_bytes"]
    assert out["kv_bytes_per_token"] > 0 and "ratio_median" in out["summary"]
    run = out["base_20"]["paged"]
    assert run["prefill_tok_per_s"] > 0 and run["ttft_s_p50_floor"] == round(10 * 8 / run["prefill_tok_per_s"], 3)


def test_ttft_floor_prefills_the_shortest_prompts_first():
    from bench.capacity import ttft_floor

    assert ttft_floor([100, 10, 30, 20], 10.0) == 3.0  # the 2nd first token: prompts of 10 and 20 tokens
    assert ttft_floor([100, 10, 30, 20], 10.0, q=1.0) == 16.0 and ttft_floor([5], 10.0) == 0.5
    assert ttft_floor([10], None) is None and ttft_floor([], 10.0) is None


def test_capacity_targets_are_judged_per_workload():
    """Each workload's rows are held to the stated bounds; a missed bound reads False, a missing row is left out, and
    16 streams (the same schedule at both caps) are not judged."""
    from bench.cli import _capacity_targets

    s = {"capacity_base_64_vs_16_rows": 1.35, "capacity_base_64_ttft_s_p50": 2.0,
         "capacity_chat_base_64_vs_16_rows": 1.8, "capacity_chat_base_64_ttft_s_p50": 0.4,
         "capacity_chat_one_adapter_64_peak_rss_vs_16_rows": 1.03, "capacity_chat_one_adapter_16_vs_16_rows": 0.95}
    t = _capacity_targets(s)
    assert t == {
        "base 64 streams (random prompts) >= 1.4x tok/s of 16 rows": False,
        "base 64 streams (random prompts) TTFT p50 <= 1.0 s": False,
        "base 64 streams (chat prompts) >= 1.4x tok/s of 16 rows": True,
        "base 64 streams (chat prompts) TTFT p50 <= 1.0 s": True,
        "one_adapter 64 streams (chat prompts) peak RSS <= 16 rows' (2% noise)": False,
    }


def test_service_scenario_streams_each_mix_over_http(tmp_path):
    """The service of this checkout, started on loopback over a store of random adapters, streams every mix."""
    from bench.service import MIXES, service_scenario
    from tests.factories import save_tiny_base

    model = build_tiny_model("llama")
    folder = save_tiny_base(tmp_path / "base")
    bm = BenchModel(model, load_tokenizer(), "tiny", "llama", torch.device("cpu"), torch.float32, set(), 512, 0)
    adapters = [random_adapter(model, "llama", f"a{i}", rank=4, seed=i) for i in range(3)]
    out = service_scenario(bm, adapters, model=str(folder), streams=5, max_tokens=3, rank=4, repeats=2,
                           workdir=tmp_path / "work")
    for mix in MIXES:
        r = out[mix]
        assert r["requests"] == 5 and r["output_tokens"] == 15 and len(r["output_tok_per_s_all"]) == 2
        assert 0 < r["ttft_s_p50"] <= r["ttft_s_p99"] and 0 <= r["itl_s_p50"] <= r["itl_s_p99"]  # chunks may come together
    assert out["peak_pss_bytes"] > 10_000_000 and out["adapters"] == 3
    assert set(out["summary"]) == {"one_adapter_vs_base", "distinct_adapters_vs_base", "blend3_vs_base",
                                   "median_tok_per_s"}


def test_a_service_that_cannot_start_is_reported_with_its_log(tmp_path):
    from bench.service import running_service

    with pytest.raises(RuntimeError, match="could not load its model .*does not exist") as e:
        with running_service(str(tmp_path / "no-such-model"), tmp_path / "store", dtype=torch.float32, device="cpu",
                             log=tmp_path / "service.log"):
            pass
    assert str(tmp_path / "service.log") in str(e.value) and (tmp_path / "service.log").stat().st_size > 0
