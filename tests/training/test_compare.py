"""train --compare: the table and the overlaid-curves PNG of finished runs, from their training_metrics.json."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from training.cli import app


def _run(folder, method, losses, margins=None, acc_key="rewards/accuracies", step_s=2.0):
    steps = []
    for i, loss in enumerate(losses):
        rec = {"step": i + 1, "loss": loss, "step_time_s": step_s + (10.0 if i == 0 else 0.0)}  # a slow first step
        if margins is not None:
            rec["rewards/margins"] = margins[i]
        rec[acc_key] = 0.5 + 0.1 * i
        steps.append(rec)
    folder.mkdir()
    (folder / "training_metrics.json").write_text(json.dumps(
        {"name": folder.name, "method": method, "steps": steps, "total_time_s": 12.5 * len(losses),
         "dataset": {"rows": 64}}))
    return folder


def test_compare_two_runs(tmp_path):
    a = _run(tmp_path / "dpo-a", "dpo", [0.69, 0.5, 0.3], margins=[0.0, 0.8, 1.7])
    b = _run(tmp_path / "sft-b", "sft", [2.0, 1.5], acc_key="mean_token_accuracy", step_s=3.0)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["train", "--compare", str(a), str(b), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{"):])
    ra, rb = report["runs"]
    assert (ra["steps"], ra["final_loss"], ra["final_reward_margin"], ra["accuracy"]) == (3, 0.3, 1.7, 0.7)
    assert ra["accuracy_metric"] == "rewards/accuracies" and ra["time_per_step_s"] == 2.0  # median, not mean
    assert rb["final_reward_margin"] is None and rb["accuracy_metric"] == "mean_token_accuracy"
    assert rb["total_time_s"] == 25.0 and rb["time_per_step_s"] == 8.0  # median of [13, 3]
    png = out / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (out / "compare.md").read_text()
    assert "| dpo-a | dpo | 3 | 0.3000 | 1.700 | 0.700 (rewards/accuracies) | 2.00 | 37.5 |" in md
    assert "![curves](compare.png)" in md


def test_rpo_runs_are_labelled_with_their_alpha(tmp_path):
    rpo = _run(tmp_path / "rpo", "dpo", [3.0, 2.0], margins=[0.0, 0.5])
    metrics = json.loads((rpo / "training_metrics.json").read_text())
    metrics["hyperparameters"] = {"sft_weight": 1.0}
    metrics["machine"] = {"device": "cpu", "dtype": "bfloat16"}
    (rpo / "training_metrics.json").write_text(json.dumps(metrics))
    plain = _run(tmp_path / "plain", "dpo", [0.69, 0.5], margins=[0.0, 0.8])
    res = CliRunner().invoke(app, ["train", "--compare", str(rpo), str(plain), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("{"):])["runs"]
    assert [r["method"] for r in rows] == ["dpo + RPO (1)", "dpo"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| rpo | dpo + RPO (1) | 2 |" in md and "| cpu, bfloat16 |" in md and "| unknown, unknown |" in md


def test_compare_refuses_a_folder_without_metrics_and_train_needs_data(tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["train", "--compare", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no training_metrics.json" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["train", "--name", "x"])
    assert res.exit_code == 1 and "--data" in res.output
