"""read_peft_adapter: the same tensors as safetensors, read once, refusing only what it cannot read."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.errors import AdapterValidationError
from app.registry.peft_reader import (
    CONFIG_FILE,
    MODEL_FILE,
    LoRAFactors,
    PeftAdapter,
    module_scaling,
    read_peft_adapter,
    split_tensor_name,
)
from tests.factories import Q0, edit_config, edit_tensors, key, write_peft_adapter

CFG, MODEL = "adapter_config.json", "adapter_model.safetensors"


def by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``load_file`` output regrouped as module path -> {"lora_A": A, "lora_B": B}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, kind = split_tensor_name(name)
        out.setdefault(module, {})[kind] = tensor
    return out


def test_peft_file_names():
    from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    assert (CONFIG_FILE, MODEL_FILE) == (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME) == (CFG, MODEL)


def test_reader_returns_the_tensors_of_load_file(llama_adapter):
    adapter = read_peft_adapter(llama_adapter)
    assert isinstance(adapter, PeftAdapter)
    want = by_module(load_file(str(llama_adapter / MODEL)))
    assert set(adapter.tensors) == set(want) and len(want) == 14
    for module, pair in adapter.tensors.items():
        assert isinstance(pair, LoRAFactors)
        assert torch.equal(pair.A, want[module]["lora_A"]) and pair.A.dtype == want[module]["lora_A"].dtype
        assert torch.equal(pair.B, want[module]["lora_B"]) and pair.B.device.type == "cpu"
        assert pair.a_name == key(module) and pair.b_name == key(module, "lora_B")
    assert adapter.config == json.loads((llama_adapter / CFG).read_text())
    with safe_open(str(llama_adapter / MODEL), framework="pt") as f:
        assert adapter.metadata == (f.metadata() or {})
    data = (llama_adapter / MODEL).read_bytes()
    assert adapter.sha256 == hashlib.sha256(data).hexdigest() and adapter.size_bytes == len(data)
    assert adapter.other_tensors == () and adapter.duplicate_tensors == ()
    assert adapter.path == llama_adapter
    with pytest.raises(dataclasses.FrozenInstanceError):
        adapter.config = {}


def test_reader_keeps_stored_dtype_and_adapter_name_segment(llama_adapter):
    ref = load_file(str(llama_adapter / MODEL))

    def rename_and_cast(t):
        for k in list(t):
            t[k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")] = t.pop(k).half()

    edit_tensors(llama_adapter, rename_and_cast)
    adapter = read_peft_adapter(llama_adapter)
    assert adapter.tensors[Q0].A.dtype == torch.float16
    assert torch.equal(adapter.tensors[Q0].A, ref[key(Q0)].half())
    assert adapter.tensors[Q0].a_name == key(Q0).replace(".lora_A.", ".lora_A.default.")


def test_reader_copies_out_of_the_file(llama_adapter):
    """A later in-place write to the file does not change what was read (safetensors may mmap)."""
    adapter = read_peft_adapter(llama_adapter)
    before = adapter.tensors[Q0].A.clone()
    path = llama_adapter / MODEL
    zeros = {k: torch.zeros_like(v) for k, v in load_file(str(path)).items()}
    save_file(zeros, str(llama_adapter / "z.safetensors"), metadata={"format": "pt"})
    with open(path, "r+b") as f:
        f.write((llama_adapter / "z.safetensors").read_bytes())
    assert torch.equal(adapter.tensors[Q0].A, before)


def test_reader_reads_what_the_validator_refuses(llama_adapter):
    """Bad configs, odd tensors, duplicates, lone factors are read as they are, not raised."""
    edit_config(llama_adapter, r=10_000, use_dora=True, peft_type="IA3")
    dup = key(Q0).replace(".lora_A.", ".lora_A.default.")
    extra = "base_model.model.model.norm.weight"

    def edit(t):
        t[dup] = t[key(Q0)].clone()
        t[extra] = torch.zeros(64)
        t.pop(key("model.layers.1.mlp.up_proj", "lora_B"))
        t[key(Q0, "lora_B")] = torch.full((3, 3), float("nan"))

    edit_tensors(llama_adapter, edit)
    adapter = read_peft_adapter(llama_adapter)
    assert adapter.config["r"] == 10_000 and adapter.config["use_dora"] is True
    assert adapter.other_tensors == (extra,)
    assert adapter.duplicate_tensors in ((dup,), (key(Q0),))  # whichever comes second in the file
    lone = adapter.tensors["model.layers.1.mlp.up_proj"]
    assert lone.B is None and lone.b_name is None and lone.A is not None
    assert adapter.tensors[Q0].B.shape == (3, 3)


def test_reader_never_unpickles(llama_adapter, monkeypatch):
    def no_pickle(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    (llama_adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    assert read_peft_adapter(llama_adapter).tensors
    (llama_adapter / MODEL).unlink()
    with pytest.raises(AdapterValidationError) as exc:
        read_peft_adapter(llama_adapter)
    assert exc.value.param == MODEL and "adapter_model.bin" in exc.value.message


@pytest.mark.parametrize(
    "breakage, file, fragment",
    [
        (lambda d: (d / CFG).unlink(), CFG, "missing"),
        (lambda d: (d / MODEL).unlink(), MODEL, "missing"),
        (lambda d: (d / CFG).write_bytes(b"{not json"), CFG, "not valid JSON"),
        (lambda d: (d / CFG).write_bytes(b"[1, 2]"), CFG, "must be a JSON object"),
        (lambda d: (d / CFG).write_bytes(b"\xff\xfe"), CFG, "UTF-8"),
        (lambda d: (d / CFG).write_text('{"a": ' + "[" * 40 + "]" * 40 + "}"), CFG, "nested deeper"),
        (lambda d: (d / CFG).write_bytes(b" " * (4 * 1024 * 1024 + 1)), CFG, "larger than"),
        (lambda d: (d / MODEL).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"), MODEL, "not a readable"),
    ],
)
def test_reader_raises_only_for_unreadable_files(llama_adapter, breakage, file, fragment):
    breakage(llama_adapter)
    with pytest.raises(AdapterValidationError) as exc:
        read_peft_adapter(llama_adapter)
    assert exc.value.param == file and exc.value.message.startswith(f"{file}: ")
    assert fragment in exc.value.message, exc.value.message


def test_reader_json_depth_limit_is_configurable(llama_adapter):
    with pytest.raises(AdapterValidationError, match="nested deeper than 1"):
        read_peft_adapter(llama_adapter, max_json_depth=1)


def test_split_tensor_name():
    assert split_tensor_name(key(Q0)) == (Q0, "lora_A")
    assert split_tensor_name(f"base_model.model.{Q0}.lora_B.default.weight") == (Q0, "lora_B")
    assert split_tensor_name(f"{Q0}.lora_A.weight") == (Q0, "lora_A")
    assert split_tensor_name(f"base_model.model.{Q0}.lora_magnitude_vector") is None


def test_module_scaling_uses_peft_get_pattern_key(tmp_path, monkeypatch):
    import app.registry.peft_reader as reader

    folder = write_peft_adapter(
        tmp_path / "a", "llama", rank_pattern={"q_proj": 8}, alpha_pattern={r"layers\.1\..*": 2}, alpha=8, seed=3,
        scale=1.0,
    )
    config = read_peft_adapter(folder).config
    assert module_scaling(config, Q0) == (8, 1.0)
    assert module_scaling(config, "model.layers.1.mlp.up_proj") == (4, 0.5)
    calls = []
    monkeypatch.setattr(reader, "get_pattern_key", lambda keys, k: calls.append(k) or k)
    module_scaling(config, Q0)
    assert calls == [Q0, Q0]
