"""Models and adapters for the benchmark: the embedded model, or realistic architectures with dummy weights.

``--config qwen2.5-0.5b|qwen2.5-1.5b|qwen2.5-7b|phi-2 --dummy-weights`` builds
those architectures from their published ``config.json`` values with random
weights (as vLLM's ``--load-format dummy``): decode speed does not depend on
the values, and nothing is downloaded. Random LoRA adapters are made directly
as :class:`AdapterWeights`, identified by a digest of their tensors. This module builds; it does not time anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from app.config import Settings
from app.model_loader import load_base_model, resolve_device, resolve_dtype
from app.registry.adapter import AdapterVersion, AdapterWeights, LoRAModuleWeights

logger = logging.getLogger(__name__)

#: Published config values (``config.json`` of each model on the Hugging Face Hub).
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=1e5, rms_norm_eps=1e-5),
    "phi-2": dict(model_type="phi", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=51200, tie_word_embeddings=False,
                  max_position_embeddings=2048, partial_rotary_factor=0.4, layer_norm_eps=1e-5, hidden_act="gelu_new"),
}

#: LoRA target modules per architecture (peft conventions for these models).
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}


class IdTokenizer:
    """Stand-in tokenizer for dummy-weight models (which ship none): ids decode to ``"<id>"`` text."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


@dataclass
class BenchModel:
    """A model to benchmark, with its tokenizer and metadata.

    Attributes:
        weight_bytes: bytes of all parameters (what one decode step must read at least once).
    """

    model: Any
    tokenizer: Any
    name: str
    arch: str
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: set[int]
    vocab_size: int
    weight_bytes: int


def build_model(config: str | None, *, device: str = "auto", dtype: str = "auto", cache_dir: Path | None = None) -> BenchModel:
    """The embedded model (``config=None``) or a dummy-weight model of a named architecture.

    Raises:
        KeyError: unknown ``config`` name.
    """
    if config is None:
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        if cache_dir is not None:
            kw["cache_dir"] = cache_dir
        lm = load_base_model(Settings(**kw))
        m = lm.model
        return BenchModel(m, lm.tokenizer, lm.name, m.config.model_type, lm.device, lm.dtype, lm.eos_token_ids,
                          m.config.vocab_size, _weight_bytes(m))
    values = dict(CONFIGS[config])
    model_type = values.pop("model_type")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(0)
    with torch.device(dev):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    m.eval().requires_grad_(False)
    logger.info("built %s with dummy weights on %s (%s)", config, dev, dt)
    return BenchModel(m, IdTokenizer(), config, model_type, dev, dt, set(), cfg.vocab_size, _weight_bytes(m))


def _weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied embeddings count once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def random_adapter(
    model: torch.nn.Module, arch: str, name: str, *, rank: int = 16, alpha: float = 32.0, seed: int = 0,
    targets: list[str] | None = None, std: float = 0.01,
) -> AdapterWeights:
    """A random LoRA adapter ``name`` (rank ``rank`` on every target module) as CPU fp32 tensors.

    Its id's digest is a sha256 over its module paths, scalings and tensor bytes (it has no files).
    """
    wanted = set(targets or TARGETS.get(arch, TARGETS["llama"]))
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path, mod in model.named_modules():
        path = path.removesuffix(".base_layer")  # already wrapped by the engine
        if isinstance(mod, torch.nn.Linear) and path.rsplit(".", 1)[-1] in wanted:
            a = torch.randn(rank, mod.in_features, generator=g) * std
            b = torch.randn(mod.out_features, rank, generator=g) * std
            modules[path] = LoRAModuleWeights(a, b, alpha / rank)
    digest = hashlib.sha256()
    for path, m in modules.items():
        digest.update(f"{path}\0{m.scaling!r}\0".encode())
        digest.update(m.A.numpy())
        digest.update(m.B.numpy())
    return AdapterWeights(AdapterVersion(name, digest.hexdigest()), modules)


def save_peft_folder(adapter: AdapterWeights, folder: Path, *, rank: int, alpha: float, dtype=torch.bfloat16) -> Path:
    """Write ``adapter`` as a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({p.rsplit(".", 1)[-1] for p in adapter.modules})
    tensors = {}
    for path, m in adapter.modules.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = m.A.to(dtype).contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = m.B.to(dtype).contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
           "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder
