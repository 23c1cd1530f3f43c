"""load_adapter_weights against peft's own loading, and every refusal rule."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft.utils.other import get_pattern_key as peft_pattern_key

from app.errors import AdapterValidationError
from app.registry.adapter import AdapterVersion
from app.registry.peft_reader import read_peft_adapter
from app.registry.validation import (
    linear_shapes,
    load_adapter_weights,
    module_scaling,
    validate_name,
)
from tests.factories import (
    CFG,
    MODEL,
    Q0,
    REFUSED_CONFIGS,
    REFUSED_TENSORS,
    TARGETS,
    base_model,
    edit_config,
    edit_tensors,
    key,
    shapes,
    write_peft_adapter,
)


def load(folder, arch="llama", max_rank=64, **kw):
    return load_adapter_weights(folder, "t", shapes(arch), max_rank=max_rank, **kw)


def assert_matches_peft(folder, arch, weights):
    """Every LoRA layer peft builds from ``folder`` has the same A, B and scaling as ``weights``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model(arch)), folder)
    seen = set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        path = name.removeprefix("base_model.model.")
        ours = weights.modules[path]
        assert torch.equal(ours.A, module.lora_A["default"].weight.detach()), path
        assert torch.equal(ours.B, module.lora_B["default"].weight.detach()), path
        assert ours.scaling == pytest.approx(module.scaling["default"], rel=1e-12), path
        seen.add(path)
    assert seen == set(weights.modules)
    return peft_model


# --------------------------------------------------------------------------- shapes / names


def test_linear_shapes_llama_excludes_lm_head():
    got = shapes("llama")
    assert got[Q0] == (64, 64)
    assert got["model.layers.1.self_attn.k_proj"] == (64, 32)  # 2 kv heads x head_dim 16
    assert got["model.layers.0.mlp.down_proj"] == (128, 64)
    assert not any(p.endswith("lm_head") for p in got)
    assert len(got) == 2 * 7


def test_linear_shapes_phi():
    got = linear_shapes(base_model("phi"))
    assert got["model.layers.0.self_attn.dense"] == (64, 64)
    assert got["model.layers.1.mlp.fc1"] == (64, 128)
    assert "lm_head" not in got


@pytest.mark.parametrize("name", ["a", "pirate", "Stance-2.v1_x", "0" * 64])
def test_validate_name_accepts(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../x", "a b", "x\n", "é", "a" * 65, "a@1"])
def test_validate_name_refuses(name):
    with pytest.raises(AdapterValidationError) as exc:
        validate_name(name)
    assert exc.value.param == "name"


# --------------------------------------------------------------------------- valid adapters vs peft


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi"])
def test_valid_adapter_matches_peft(tmp_path, arch):
    folder = write_peft_adapter(tmp_path / "a", arch, rank=4, alpha=8.0)
    weights, config = load(folder, arch)
    assert weights.id == AdapterVersion("t", read_peft_adapter(folder).digest)
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    expected = {f"model.layers.{i}.{p}" for i in range(2) for p in _paths(arch)}
    assert set(weights.modules) == expected
    for path, m in weights.modules.items():
        d_in, d_out = shapes(arch)[path]
        assert tuple(m.A.shape) == (4, d_in) and tuple(m.B.shape) == (d_out, 4)
        assert m.A.dtype == torch.float32 and m.scaling == 2.0
    assert_matches_peft(folder, arch, weights)


def _paths(arch):
    attn = {"q_proj", "k_proj", "v_proj", "o_proj", "dense"}
    return [("self_attn." if t in attn else "mlp.") + t for t in TARGETS[arch]]


def test_rslora_scaling_matches_peft(tmp_path):
    folder = write_peft_adapter(tmp_path / "a", "qwen2", rank=16, alpha=8.0, use_rslora=True)
    weights, _ = load(folder, "qwen2")
    assert all(m.scaling == pytest.approx(8.0 / math.sqrt(16)) for m in weights.modules.values())
    assert_matches_peft(folder, "qwen2", weights)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_pattern_match_peft(tmp_path, use_rslora):
    rank_pattern = {"model.layers.0.self_attn.q_proj": 8, "down_proj": 2}
    alpha_pattern = {"v_proj": 3, r"layers\.1\.mlp\.up_proj": 32}
    folder = write_peft_adapter(
        tmp_path / "a", "llama", rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=use_rslora,
        alpha=8, seed=3, scale=1.0,
    )
    weights, _ = load(folder)
    norm = math.sqrt if use_rslora else (lambda r: r)
    m = weights.modules
    assert m[Q0].rank == 8 and m[Q0].scaling == pytest.approx(8 / norm(8))
    assert m["model.layers.1.self_attn.q_proj"].rank == 4
    assert m["model.layers.1.mlp.down_proj"].rank == 2
    assert m["model.layers.1.mlp.down_proj"].scaling == pytest.approx(8 / norm(2))
    assert m["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(3 / norm(4))
    assert m["model.layers.1.mlp.up_proj"].scaling == pytest.approx(32 / norm(4))
    assert m["model.layers.0.mlp.up_proj"].scaling == pytest.approx(8 / norm(4))
    assert weights.max_rank == 8
    assert_matches_peft(folder, "llama", weights)


def test_peft_pattern_key_semantics():
    keys = ["q_proj", r"layers\.1\..*"]
    assert peft_pattern_key(keys, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert peft_pattern_key(keys, "model.layers.1.mlp.up_proj") == r"layers\.1\..*"
    # suffix match only on a whole dotted component
    assert peft_pattern_key(keys, "model.layers.0.self_attn.xq_proj") == "model.layers.0.self_attn.xq_proj"
    cfg = {"r": 4, "lora_alpha": 16, "rank_pattern": {"k_proj": 2}, "alpha_pattern": {}}
    assert module_scaling(cfg, "model.layers.0.self_attn.k_proj") == (2, 8.0)
    assert module_scaling(cfg, "model.layers.0.self_attn.q_proj") == (4, 4.0)


def test_adapter_name_segment_and_dtype(tmp_path, llama_adapter):
    ref, _ = load(llama_adapter)

    def rename(t):
        for k in list(t):
            t[k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")] = t.pop(k)

    edit_tensors(llama_adapter, rename)
    weights, _ = load(llama_adapter, dtype=torch.bfloat16)
    assert set(weights.modules) == set(ref.modules)
    assert weights.modules[Q0].A.dtype == torch.bfloat16
    assert torch.equal(weights.modules[Q0].A, ref.modules[Q0].A.to(torch.bfloat16))


# --------------------------------------------------------------------------- refusals


def refused(folder, file, *fragments, arch="llama", max_rank=64):
    with pytest.raises(AdapterValidationError) as exc:
        load(folder, arch, max_rank=max_rank)
    assert exc.value.param == file
    assert file in exc.value.message
    for fragment in fragments:
        assert fragment in exc.value.message, exc.value.message
    return exc.value


def test_wrong_shape(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.update({key(Q0): torch.zeros(4, 32)}))
    refused(llama_adapter, MODEL, key(Q0), "[4, 32]", "[4, 64]")


def test_rank_mismatch_between_a_and_b(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.update({key(Q0, "lora_B"): torch.zeros(64, 3)}))
    refused(llama_adapter, MODEL, key(Q0, "lora_B"), "[64, 3]")


def test_unknown_module(llama_adapter):
    bad = "model.layers.7.self_attn.q_proj"
    edit_tensors(llama_adapter, lambda t: t.update({key(bad): t.pop(key(Q0)), key(bad, "lora_B"): t.pop(key(Q0, "lora_B"))}))
    refused(llama_adapter, MODEL, bad, "not a linear layer")


def test_adapter_for_other_architecture(tmp_path):
    folder = write_peft_adapter(tmp_path / "phi", "phi")
    refused(folder, MODEL, "model.layers.0.mlp.fc1", "not a linear layer", arch="llama")


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_lm_head_target_refused(tmp_path):
    folder = write_peft_adapter(tmp_path / "a", "qwen2", targets=["q_proj", "lm_head"])
    # peft also saves the full lm_head weight (save_embedding_layers): a non-LoRA tensor
    refused(folder, MODEL, "lm_head.base_layer.weight", "only", arch="qwen2")
    edit_tensors(folder, lambda t: [t.pop(k) for k in list(t) if "lora_" not in k])
    refused(folder, MODEL, "'lm_head'", "not a linear layer", arch="qwen2")


def test_rank_above_max(llama_adapter):
    refused(llama_adapter, CFG, "'r'", "[1, 2]", max_rank=2)


def test_rank_pattern_above_max(llama_adapter):
    edit_config(llama_adapter, rank_pattern={"q_proj": 128})
    refused(llama_adapter, CFG, "rank_pattern", "q_proj")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values(llama_adapter, value):
    def poison(t):
        t[key(Q0, "lora_B")][3, 1] = value

    edit_tensors(llama_adapter, poison)
    refused(llama_adapter, MODEL, key(Q0, "lora_B"), "NaN or infinite")


def test_fp16_overflow_on_conversion(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t[key(Q0)].__setitem__((0, 0), 1e6))
    with pytest.raises(AdapterValidationError, match="overflows"):
        load(llama_adapter, dtype=torch.float16)


def test_missing_b(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.pop(key(Q0, "lora_B")))
    refused(llama_adapter, MODEL, key(Q0), "no matching lora_B")


def test_missing_a(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.pop(key(Q0)))
    refused(llama_adapter, MODEL, key(Q0, "lora_B"), "no matching lora_A")


def test_pickle_only_folder(llama_adapter):
    (llama_adapter / MODEL).unlink()
    (llama_adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    refused(llama_adapter, MODEL, "missing", "adapter_model.bin", "safe_serialization=True")


def test_missing_config(llama_adapter):
    (llama_adapter / CFG).unlink()
    refused(llama_adapter, CFG, "missing")


@pytest.mark.parametrize("changes, fragment", REFUSED_CONFIGS)
def test_refused_config_fields(llama_adapter, changes, fragment):
    edit_config(llama_adapter, **changes)
    refused(llama_adapter, CFG, fragment)


def test_missing_alpha(llama_adapter):
    cfg = json.loads((llama_adapter / CFG).read_text())
    del cfg["lora_alpha"]
    (llama_adapter / CFG).write_text(json.dumps(cfg))
    refused(llama_adapter, CFG, "lora_alpha", "missing")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_bad_json(llama_adapter, raw):
    (llama_adapter / CFG).write_bytes(raw)
    refused(llama_adapter, CFG)


@pytest.mark.parametrize("extra, fragment", REFUSED_TENSORS)
def test_refused_tensors(llama_adapter, extra, fragment):
    edit_tensors(llama_adapter, lambda t: t.update({extra: torch.zeros(4, 64)}))
    refused(llama_adapter, MODEL, extra, fragment)


def test_integer_tensor_refused(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.update({key(Q0): torch.zeros(4, 64, dtype=torch.int32)}))
    refused(llama_adapter, MODEL, key(Q0), "floating")


def test_corrupt_safetensors(llama_adapter):
    (llama_adapter / MODEL).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    refused(llama_adapter, MODEL, "not a readable safetensors")


def test_no_tensors(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.clear())
    refused(llama_adapter, MODEL, "no LoRA tensors")


def test_duplicate_factor_with_and_without_adapter_name(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.update({key(Q0).replace(".lora_A.", ".lora_A.default."): t[key(Q0)].clone()}))
    refused(llama_adapter, MODEL, "a second lora_A")
