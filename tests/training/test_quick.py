"""The --quick presets of train, eval and eval --sweep: what they set, that given options win, and that they run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.factories import save_tiny_base
from tests.factories.adapters import write_peft_adapter
from training import quick
from training.cli import app


def test_apply_sets_only_what_was_not_given():
    values = {"lr": 5e-5, "max_steps": 3}
    quick.apply(quick.TRAIN, values, given=lambda name: name == "max_steps")
    assert values["max_steps"] == 3 and values["lr"] == quick.TRAIN["lr"]
    assert values["precompute_ref"] is False and values["gradient_checkpointing"] is False
    assert quick.QUICK_DATA.is_file()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    store = root / "store"
    for i, name in enumerate(("curious-uncertainty", "confident-expertise")):
        write_peft_adapter(store / name, "llama", rank=4, seed=20 + i, scale=0.5)
    return {"base": save_tiny_base(root / "base"), "store": store}


def invoke(tmp_path, monkeypatch, *args):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout[res.stdout.index("{"):])


def test_train_quick_runs_the_preset_on_the_shipped_data(tiny, tmp_path, monkeypatch):
    report = invoke(tmp_path, monkeypatch, "train", "--quick", "--name", "q", "--base", str(tiny["base"]),
                    "--max-steps", "2", "--quiet")
    m = json.loads((Path(report["adapter_dir"]) / "training_metrics.json").read_text())
    hp = m["hyperparameters"]
    assert hp["max_steps"] == 2  # given: wins over the preset's 8
    assert {k: hp[k] for k in quick.TRAIN if k != "max_steps"} == {k: v for k, v in quick.TRAIN.items()
                                                                    if k != "max_steps"}
    assert m["dataset"]["path"] == str(quick.QUICK_DATA) and m["method"] == "dpo" and len(m["steps"]) == 2


def test_eval_quick_uses_the_first_probes_of_the_stance(tiny, tmp_path, monkeypatch):
    res = invoke(tmp_path, monkeypatch, "eval", "--quick", "--adapter", "curious-uncertainty", "--adapters-dir",
                 str(tiny["store"]), "--base", str(tiny["base"]), "--quiet")
    assert res["probes"] == quick.EVAL["probe_limit"] and res["stance"] == "curious-uncertainty"
    assert (tmp_path / "runs" / "eval" / "curious-uncertainty.md").is_file()


def test_sweep_quick_is_the_small_sweep(tiny, tmp_path, monkeypatch):
    invoke(tmp_path, monkeypatch, "eval", "--sweep", "--quick", "--adapters-dir", str(tiny["store"]), "--base",
           str(tiny["base"]), "--no-likelihood", "--max-tokens", "4", "--quiet")
    result = json.loads((tmp_path / "runs" / "sweep" / "sweep.json").read_text())
    assert result["weights"] == [0.0, 0.5, 1.0] and result["ts"] == [0.0, 0.5, 1.0]
    assert result["probes"] == 6 and result["max_tokens"] == 4  # 3 per stance; --max-tokens given wins
    assert result["bootstrap"]["resamples"] == quick.SWEEP["resamples"]
    assert [c["name"] for c in result["curves"]] == ["curious-uncertainty", "confident-expertise",
                                                    "curious-uncertainty+confident-expertise"]
