"""The command line shows no dependency warnings a user cannot act on, and keeps every other warning."""

from __future__ import annotations

import json
import warnings

from app.cli import quiet_dependency_warnings
from tests.factories import save_tiny_base


def _shown(category, module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependency_warnings()
        warnings.warn_explicit("`gradient_checkpointing` is deprecated", category, "x.py", 1, module=module)
    return bool(caught)


def test_library_deprecations_are_hidden_ours_are_not():
    assert not _shown(FutureWarning, "transformers.modeling_utils")
    assert not _shown(FutureWarning, "trl.trainer.dpo_trainer")
    assert not _shown(DeprecationWarning, "torch.utils")
    assert _shown(FutureWarning, "training.trainers")  # ours stay visible
    assert _shown(UserWarning, "transformers.modeling_utils")  # only the known-harmless kinds are hidden
    assert _shown(FutureWarning, "transformers_fork")


def test_saving_an_adapter_does_not_look_the_base_model_up(tmp_path):
    """peft's embedding check looked the served name up on the Hub ("Could not find a config file in ...")."""
    from training.trainers import TrainConfig, train_adapter

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}?", "completion": "Maybe."}) for i in range(2)))
    cfg = TrainConfig(method="sft", rank=2, alpha=4, epochs=1, batch_size=2, grad_accum=1, max_steps=1,
                      gradient_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = train_adapter(data, "t", tmp_path / "out", cfg, base=str(save_tiny_base(tmp_path / "base")),
                            progress=False).out_dir
    texts = [str(w.message) for w in caught]
    assert not [t for t in texts if "Could not find a config file" in t or "Unable to fetch remote file" in t], texts
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "training_metrics.json").read_text())["hyperparameters"]["gradient_checkpointing"] is False
