"""peft LoRA adapter folders, the ways tests break them, and a by-hand reader to check the app against.

:func:`write_peft_adapter` is the one writer of adapter folders (``adapter_config.json`` +
``adapter_model.safetensors``, saved by peft itself); :func:`edit_config` / :func:`edit_tensors` then
break a folder in place, and :data:`REFUSED_CONFIGS` / :data:`REFUSED_TENSORS` list the breakages the
registry must refuse. :func:`read_adapter` / :func:`adapter_version` parse a folder without the registry
code, as an independent reference.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch

from tests.factories.models import TARGETS, base_model

CFG, MODEL = "adapter_config.json", "adapter_model.safetensors"
#: A module path of every tiny model (the first layer's query projection).
Q0 = "model.layers.0.self_attn.q_proj"


def write_peft_adapter(
    out_dir: Path,
    arch: str = "llama",
    *,
    model=None,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int | None = 1,
    scale: float = 0.1,
    targets: list[str] | None = None,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    init_lora_weights: bool = True,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Make a peft LoRA adapter for ``model`` and save it to ``out_dir``.

    Args:
        model: the base model; default the session's tiny ``arch`` model (:func:`base_model`). It is left
            untouched (peft wraps a deep copy).
        targets: ``target_modules``; default every linear of ``arch`` (:data:`TARGETS`).
        seed, scale: every ``lora_A`` / ``lora_B`` is set to ``randn(generator seeded with seed) * scale``
            (peft initialises ``B`` to zero; random B makes the adapter change outputs). ``seed=None`` keeps
            peft's own initialisation (with ``init_lora_weights=False``, peft's random non-zero B).
        rank_pattern, alpha_pattern, use_rslora, init_lora_weights, task_type: as in ``peft.LoraConfig``
            (the patterns are left out of the config when ``None``).

    Returns:
        ``out_dir``, holding ``adapter_config.json`` and ``adapter_model.safetensors``.
    """
    from peft import LoraConfig, get_peft_model

    model = base_model(arch) if model is None else model
    patterns = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets or TARGETS[arch],
        lora_dropout=0.0,
        bias="none",
        task_type=task_type,
        use_rslora=use_rslora,
        init_lora_weights=init_lora_weights,
        **{k: v for k, v in patterns.items() if v is not None},
    )
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def calm_and_bold(root: Path) -> dict[str, Path]:
    """The two tiny-Llama adapters the HTTP and load tests upload: ``calm`` (rank 4) and ``bold`` (rank 8)."""
    return {
        "calm": write_peft_adapter(root / "calm", "llama", rank=4, seed=11, scale=0.5),
        "bold": write_peft_adapter(root / "bold", "llama", rank=8, alpha=16, seed=12, scale=0.5),
    }


def adapter_bytes(folder: Path) -> dict[str, bytes]:
    """``{file name: content}`` of the two files of an adapter folder."""
    return {CFG: (folder / CFG).read_bytes(), MODEL: (folder / MODEL).read_bytes()}


# ---------------------------------------------------------------------------- breaking a folder
def edit_config(folder: Path, **changes) -> None:
    """Update ``adapter_config.json`` with ``changes``."""
    path = Path(folder) / CFG
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensors(folder: Path, fn) -> None:
    """Rewrite adapter_model.safetensors with ``fn(dict of tensors)`` (which edits it in place)."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / MODEL
    tensors = load_file(str(path))
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def key(module: str, kind: str = "lora_A") -> str:
    """The peft tensor name of ``module`` (a base-model module path)."""
    return f"base_model.model.{module}.{kind}.weight"


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


# ---------------------------------------------------------------------------- reading a folder by hand
def adapter_version(path: Path, name: str):
    """The :class:`AdapterVersion` the peft adapter folder ``path`` makes under ``name`` (hashing its files by hand)."""
    from app.registry.adapter import AdapterVersion, content_digest

    cfg = json.loads((path / CFG).read_text())
    return AdapterVersion(name, content_digest(hashlib.sha256((path / MODEL).read_bytes()).hexdigest(), cfg))


def read_adapter(path: Path, name: str):
    """Parse a peft adapter folder by hand (independent of the registry code) into ``AdapterWeights`` ``name``."""
    from safetensors.torch import load_file

    from app.registry.adapter import AdapterWeights, LoRAModuleWeights

    cfg = json.loads((path / CFG).read_text())
    tensors = load_file(str(path / MODEL))
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    modules = {}
    for tensor_name, a in tensors.items():
        if ".lora_A." not in tensor_name:
            continue
        mod = tensor_name.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = tensors[tensor_name.replace(".lora_A.", ".lora_B.")]
        modules[mod] = LoRAModuleWeights(A=a, B=b, scaling=scaling)
    return AdapterWeights(id=adapter_version(path, name), modules=modules)
