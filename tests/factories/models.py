"""Tiny models and the test tokenizer.

Random 2-layer Llama / Qwen2 / Phi models built from configs (nothing downloaded), the vendored
stories260k tokenizer with a ChatML template, a :class:`LoadedModel` around the tiny Llama for
``create_app(model_factory=...)``, and a saved base-model folder for code that loads a model by path.
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
STORIES_DIR = REPO / "tests" / "fixtures" / "stories260k"
#: The served name of the tiny Llama behind :func:`tiny_factory`.
BASE_MODEL = "tiny-llama"

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
    with torch.no_grad():  # transformers initialises biases to zero, which would hide a dropped or misplaced bias
        for name, param in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name:
                param.normal_(0.0, 0.02)
    return model.eval()


#: architectures the forward pass serves beyond :func:`build_tiny_model`'s three (Qwen3's q/k norms, Mistral)
EXTRA_ARCHS = ("qwen3", "mistral")


def build_extra_model(arch: str):
    """A tiny random Qwen3 (q/k norms, head_dim 16) or Mistral causal LM in eval mode, fp32, on CPU."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg = Qwen3Config(head_dim=16, **common) if arch == "qwen3" else MistralConfig(**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


_MODELS: dict[str, torch.nn.Module] = {}


def base_model(arch: str) -> torch.nn.Module:
    """One :func:`build_tiny_model` of ``arch`` for the whole session (callers must not modify it)."""
    if arch not in _MODELS:
        _MODELS[arch] = build_tiny_model(arch)
    return _MODELS[arch]


def shapes(arch: str) -> dict[str, tuple[int, int]]:
    """The linear shapes of the tiny ``arch`` model, as the adapter store and validation take them."""
    from app.registry.validation import linear_shapes

    return linear_shapes(base_model(arch))


def load_tokenizer():
    """The stories260k tokenizer with a ChatML template and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES_DIR)
    tok.chat_template = CHATML
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def save_tiny_base(folder: Path, arch: str = "llama") -> Path:
    """A local base-model folder (``save_pretrained`` of the tiny ``arch`` model and the tokenizer)."""
    build_tiny_model(arch).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return Path(folder)


def tiny_factory(settings):
    """A ``model_factory`` for ``create_app``: the tiny random Llama served as :data:`BASE_MODEL` (``settings`` unused)."""
    from app.model_loader import LoadedModel

    model = build_tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        model=model, tokenizer=load_tokenizer(), name=BASE_MODEL, source="tiny", device=torch.device("cpu"),
        dtype=torch.float32, eos_token_ids={2}, has_chat_template=True,
    )
