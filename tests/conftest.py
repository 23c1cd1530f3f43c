"""Shared fixtures: tiny random models of each supported architecture, and peft adapters for them.

Nothing is downloaded. The tokenizer is the 512-token TinyStories tokenizer of the real
stories260k model vendored in ``tests/fixtures/stories260k`` (1 MB, MIT; provenance in its
SOURCE.md), given a ChatML chat template so chat requests work; the tiny models use the same
vocabulary size. Vendored so the tests need nothing outside the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
STORIES_DIR = REPO / "tests" / "fixtures" / "stories260k"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: LoRA target modules per architecture (issue #2).
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}


def tiny_config(arch: str):
    """A 2-layer random config of ``arch`` (llama | qwen2 | phi) with vocab 512."""
    from transformers import LlamaConfig, PhiConfig, Qwen2Config

    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "phi":
        return PhiConfig(num_key_value_heads=4, partial_rotary_factor=0.5, **common)
    raise ValueError(arch)


def build_tiny_model(arch: str, seed: int = 0):
    """A randomly initialised causal LM of ``arch`` in eval mode, fp32, on CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


def load_tokenizer():
    """The stories260k tokenizer with a ChatML template and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES_DIR)
    tok.chat_template = CHATML
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def save_peft_adapter(
    model,
    out_dir: Path,
    arch: str,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 1,
    targets: list[str] | None = None,
    scale_b: float = 0.1,
    use_rslora: bool = False,
) -> Path:
    """Make a peft LoRA adapter for ``model`` with random non-zero A and B, and save it.

    peft initialises ``B`` to zero; we randomise it so the adapter changes outputs.
    The base ``model`` is left untouched (peft wraps a deep copy).

    Returns:
        ``out_dir``, holding ``adapter_config.json`` and ``adapter_model.safetensors``.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets or TARGETS[arch],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale_b)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "phi"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch):
    return build_tiny_model(arch)
