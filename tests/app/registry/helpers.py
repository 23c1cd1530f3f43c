"""Helpers for registry tests (imported by the test modules): cached tiny base models, real peft adapters, and ways to break them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from app.registry.validation import linear_shapes
from tests.conftest import TARGETS, build_tiny_model, save_peft_adapter

_MODELS: dict[str, torch.nn.Module] = {}


def base_model(arch: str) -> torch.nn.Module:
    """One tiny model per arch for the whole session (callers must not modify it)."""
    if arch not in _MODELS:
        _MODELS[arch] = build_tiny_model(arch)
    return _MODELS[arch]


def shapes(arch: str) -> dict[str, tuple[int, int]]:
    return linear_shapes(base_model(arch))


def make_adapter(out: Path, arch: str = "llama", **kwargs) -> Path:
    """A real peft adapter for the cached ``arch`` model (see tests.conftest.save_peft_adapter)."""
    return save_peft_adapter(base_model(arch), out, arch, **kwargs)


def make_pattern_adapter(out: Path, arch: str, *, rank_pattern, alpha_pattern, use_rslora=False, seed=3) -> Path:
    """A peft adapter with ``rank_pattern`` / ``alpha_pattern`` and random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[arch],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=use_rslora,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(copy.deepcopy(base_model(arch)), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    return Path(out)


def edit_config(folder: Path, **changes) -> None:
    path = Path(folder) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensors(folder: Path, fn) -> None:
    """Rewrite adapter_model.safetensors with ``fn(dict of tensors)`` (which edits it in place)."""
    path = Path(folder) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def key(module: str, kind: str = "lora_A") -> str:
    """The peft tensor name of ``module`` (a base-model module path)."""
    return f"base_model.model.{module}.{kind}.weight"


Q0 = "model.layers.0.self_attn.q_proj"

#: (config changes, fragment of the message): each is refused.
REFUSED_CONFIGS = [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "'bias'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "lora_bias"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 4.0}, "'r'"),
    ({"r": 0}, "'r'"),
    ({"r": True}, "'r'"),
    ({"lora_alpha": "16"}, "lora_alpha"),
    ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern"),
    ({"rank_pattern": {"q_proj(": 2}}, "not a valid regex"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
    ({"use_rslora": "yes"}, "use_rslora"),
]

#: (extra tensor name, fragment of the message): each is refused.
REFUSED_TENSORS = [
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embeddings"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "bias"),
    ("base_model.model.model.norm.weight", "only"),
]
