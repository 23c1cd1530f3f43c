"""The stance adapters shipped in ``adapters/`` validate against the embedded SmolLM2 and carry their provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.datasets import STANCES

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import shutil

    from app.config import Settings
    from app.model_loader import load_base_model
    from app.registry.store import AdapterStore
    from app.registry.validation import linear_shapes

    model = load_base_model(Settings(device="cpu")).model
    root = tmp_path_factory.mktemp("store")
    for s in STANCES:  # scan a copy: scanning may write stance.json
        shutil.copytree(ADAPTERS / s, root / s)
    st = AdapterStore(root, linear_shapes(model), max_rank=64, max_bytes=1 << 30)
    st.scan()
    return st


@pytest.mark.parametrize("stance", STANCES)
def test_shipped_stance_adapter(store, stance):
    rec = store.get(stance)
    assert rec.rank == 16 and set(rec.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert rec.size_bytes < 8 * 1024 * 1024  # bf16, a few MB
    m = json.loads((ADAPTERS / stance / "training_metrics.json").read_text())
    assert m["method"] == "dpo" and m["command"].startswith("stanceserve train")
    assert m["summary"]["final_reward_margin"] > 0
    assert (ADAPTERS / stance / "training_curves.png").exists()
