"""The shipped ``adapters/meeting-scheduler`` validates against the embedded SmolLM2 and carries its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "meeting-scheduler"


def test_meeting_scheduler_files_and_provenance():
    cfg = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert cfg["r"] <= 16 and {"q_proj", "v_proj"} <= set(cfg["target_modules"])
    assert (ADAPTER / "adapter_model.safetensors").stat().st_size < 16 * 1024 * 1024
    m = json.loads((ADAPTER / "training_metrics.json").read_text())
    assert m["method"] == "sft" and m["hyperparameters"]["rank"] == cfg["r"] and m["total_time_s"] > 0
    summary = json.loads((ADAPTER / "eval_summary.json").read_text())
    ad = summary["adapter"]
    assert ad["n"] == 150 and ad["seed"] == 123 and len(ad["batches"]) == 15
    assert set(ad["by_difficulty"]) == {"easy", "medium", "hard"}
    report = (ADAPTER / "eval_report.md").read_text()
    assert "## Batch by batch (15 x 10, strict)" in report and "## All tries" in report
    assert f"{100 * ad['accuracy']:.1f}%" in report
    readme = (ADAPTER / "README.md").read_text()
    assert "stanceserve scheduling-data" in readme and "stanceserve train" in readme


@pytest.mark.slow
def test_meeting_scheduler_loads_on_the_embedded_model(tmp_path):
    import shutil

    from app.config import Settings
    from app.model_loader import load_base_model
    from app.registry.store import AdapterStore
    from app.registry.validation import linear_shapes

    model = load_base_model(Settings(device="cpu")).model
    shutil.copytree(ADAPTER, tmp_path / "meeting-scheduler")  # scanning may write stance.json
    store = AdapterStore(tmp_path, linear_shapes(model), max_rank=64, max_bytes=1 << 30)
    store.scan()
    rec = store.get("meeting-scheduler")
    assert rec.rank <= 16
