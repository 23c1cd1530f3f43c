"""validate_adapter: a typed Problem for each refusal of load_adapter_weights; check_adapter and to_adapter_weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from app.errors import AdapterValidationError
from app.registry.adapter import AdapterVersion
from app.registry.peft_reader import read_peft_adapter
from app.registry.validation import (
    _VARIANT_FIELDS,
    Problem,
    check_adapter,
    config_problems,
    load_adapter_weights,
    tensor_problems,
    to_adapter_weights,
    validate_adapter,
)
from tests.factories import (
    CFG,
    MODEL,
    Q0,
    REFUSED_CONFIGS,
    REFUSED_TENSORS,
    edit_config,
    edit_tensors,
    key,
    shapes,
    write_peft_adapter,
)


def problems(folder, arch="llama", max_rank=64) -> list[Problem]:
    return validate_adapter(read_peft_adapter(folder), shapes(arch), max_rank=max_rank)


def only(found: list[Problem], file: str, *fragments: str) -> Problem:
    """The one problem in ``found``: of ``file``, naming every fragment."""
    assert len(found) == 1, found
    problem = found[0]
    assert isinstance(problem, Problem) and problem.param == file
    for fragment in fragments:
        assert fragment in problem.message, problem.message
    return problem


def test_variant_fields_are_lora_config_fields():
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert set(_VARIANT_FIELDS) <= fields
    assert {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "modules_to_save"} <= fields


def test_valid_adapter_has_no_problem_and_converts_like_load(llama_adapter):
    adapter = read_peft_adapter(llama_adapter)
    assert validate_adapter(adapter, shapes("llama"), max_rank=64) == []
    check_adapter(adapter, shapes("llama"), max_rank=64)
    weights = to_adapter_weights(adapter, "t")
    ref, config = load_adapter_weights(llama_adapter, "t", shapes("llama"), max_rank=64)
    assert config == adapter.config and weights.id == ref.id == AdapterVersion("t", adapter.digest)
    assert set(weights.modules) == set(ref.modules)
    for module, m in weights.modules.items():
        assert torch.equal(m.A, ref.modules[module].A) and torch.equal(m.B, ref.modules[module].B)
        assert m.scaling == ref.modules[module].scaling == 2.0
        assert m.A.is_contiguous() and m.A.dtype == torch.float32


def test_problem_error_keeps_message_and_param():
    problem = Problem(CFG, "field 'r' is missing")
    assert str(problem) == f"{CFG}: field 'r' is missing"
    err = problem.error()
    assert isinstance(err, AdapterValidationError) and err.param == CFG and err.message == str(problem)


@pytest.mark.parametrize("changes, fragment", REFUSED_CONFIGS)
def test_config_problem(llama_adapter, changes, fragment):
    edit_config(llama_adapter, **changes)
    found = problems(llama_adapter)
    assert found and found[0].param == CFG and fragment in found[0].message
    assert all(p.param == CFG for p in found)  # tensors are fine


def test_config_problems_are_all_listed():
    found = config_problems({"r": 0, "lora_alpha": "x", "use_dora": True, "bias": "all"}, max_rank=8)
    assert [p.message.split()[1] for p in found] == ["'r'", "'lora_alpha'", "'bias'", "'use_dora'"]
    assert config_problems({"r": 4, "lora_alpha": 8}, max_rank=8) == []


def test_rank_above_max_problem(llama_adapter):
    only(problems(llama_adapter, max_rank=2), CFG, "'r'", "[1, 2]")


@pytest.mark.parametrize("extra, fragment", REFUSED_TENSORS)
def test_tensor_problem(llama_adapter, extra, fragment):
    edit_tensors(llama_adapter, lambda t: t.update({extra: torch.zeros(4, 64)}))
    only(problems(llama_adapter), MODEL, extra, fragment)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda t: t.update({key(Q0): torch.zeros(4, 32)}), (key(Q0), "[4, 32]", "[4, 64]")),
        (lambda t: t.update({key(Q0): torch.zeros(4, 64, dtype=torch.int32)}), (key(Q0), "floating")),
        (lambda t: t[key(Q0, "lora_B")].__setitem__((3, 1), float("nan")), (key(Q0, "lora_B"), "NaN or infinite")),
        (lambda t: t[key(Q0)].__setitem__((0, 0), float("-inf")), (key(Q0), "NaN or infinite")),
        (lambda t: t.pop(key(Q0, "lora_B")), (key(Q0), "no matching lora_B")),
        (lambda t: t.pop(key(Q0)), (key(Q0, "lora_B"), "no matching lora_A")),
        (lambda t: t.clear(), ("no LoRA tensors",)),
        (
            lambda t: t.update({key(Q0).replace(".lora_A.", ".lora_A.default."): t[key(Q0)].clone()}),
            ("a second lora_A",),
        ),
        (
            lambda t: t.update(
                {
                    key("model.layers.7.mlp.fc9"): t.pop(key(Q0)),
                    key("model.layers.7.mlp.fc9", "lora_B"): t.pop(key(Q0, "lora_B")),
                }
            ),
            ("model.layers.7.mlp.fc9", "not a linear layer"),
        ),
    ],
    ids=["shape", "dtype", "nan", "inf", "no-b", "no-a", "empty", "duplicate", "unknown-module"],
)
def test_weights_problem(llama_adapter, edit, fragments):
    edit_tensors(llama_adapter, edit)
    only(problems(llama_adapter), MODEL, *fragments)


def test_other_architecture_lists_every_module(tmp_path):
    folder = write_peft_adapter(tmp_path / "phi", "phi")
    found = problems(folder, "llama")
    assert all(p.param == MODEL for p in found)
    unknown = {p.message.split("targets module ")[1].split("'")[1] for p in found if "not a linear layer" in p.message}
    assert unknown == {f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.fc1", "mlp.fc2", "self_attn.dense")}
    assert "model.layers.0.mlp.fc1" in found[0].message


def test_shapes_checked_against_a_rank_even_with_a_config_problem(llama_adapter):
    edit_config(llama_adapter, use_dora=True)
    edit_tensors(llama_adapter, lambda t: t.update({key(Q0): torch.zeros(4, 32)}))
    found = problems(llama_adapter)
    assert [p.param for p in found] == [CFG, MODEL] and "[4, 32]" in found[1].message


def test_check_adapter_raises_the_first_problem(llama_adapter):
    edit_config(llama_adapter, use_dora=True, bias="all")
    adapter = read_peft_adapter(llama_adapter)
    first = validate_adapter(adapter, shapes("llama"), max_rank=64)[0]
    with pytest.raises(AdapterValidationError) as exc:
        check_adapter(adapter, shapes("llama"), max_rank=64)
    assert (exc.value.param, exc.value.message) == (first.param, str(first))


def test_tensor_problems_need_no_base_model(llama_adapter):
    edit_tensors(llama_adapter, lambda t: t.pop(key(Q0)))
    only(tensor_problems(read_peft_adapter(llama_adapter)), MODEL, "no matching lora_A")


def test_to_adapter_weights_dtype_and_overflow(llama_adapter):
    adapter = read_peft_adapter(llama_adapter)
    weights = to_adapter_weights(adapter, "t", dtype=torch.bfloat16)
    assert weights.modules[Q0].A.dtype == torch.bfloat16
    assert torch.equal(weights.modules[Q0].A, adapter.tensors[Q0].A.to(torch.bfloat16))
    edit_tensors(llama_adapter, lambda t: t[key(Q0)].__setitem__((0, 0), 1e6))
    big = read_peft_adapter(llama_adapter)
    assert validate_adapter(big, shapes("llama"), max_rank=64) == []
    with pytest.raises(AdapterValidationError, match="overflows") as exc:
        to_adapter_weights(big, "t", dtype=torch.float16)
    assert exc.value.param == MODEL
