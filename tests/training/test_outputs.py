"""Commands never overwrite what the user did not name: defaults go under runs/, an existing output is kept
unless --overwrite, and the refusal comes before any work. ``inspect`` finds adapters as every command does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.factories import save_tiny_base
from tests.factories.adapters import write_peft_adapter
from training.cli import app
from training.outputs import OutputExistsError, check_dir, check_file, default_out

REPO = Path(__file__).resolve().parents[2]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def refused(res, path) -> bool:
    text = " ".join(res.output.split())
    return res.exit_code == 1 and "already exists" in text and "--overwrite" in text and str(path) in text


def test_check_file_and_dir(tmp_path):
    assert default_out("eval", "x.md") == Path("runs/eval/x.md")
    check_file(tmp_path / "new.md", overwrite=False)
    (tmp_path / "old.md").write_text("kept")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_file(tmp_path / "old.md", overwrite=False)
    check_file(tmp_path / "old.md", overwrite=True)
    (tmp_path / "empty").mkdir()
    check_dir(tmp_path / "empty", overwrite=False)
    with pytest.raises(OutputExistsError, match="not empty"):
        check_dir(tmp_path, overwrite=False)
    with pytest.raises(OutputExistsError, match="is a file"):
        check_dir(tmp_path / "old.md", overwrite=True)


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    store = root / "store"
    write_peft_adapter(store / "curious-uncertainty", "llama", rank=4, seed=3, scale=0.5)
    probes = root / "probes.jsonl"
    probes.write_text("\n".join(json.dumps({"prompt": f"Why {i}?"}) for i in range(2)))
    return {"base": save_tiny_base(root / "base"), "store": store, "probes": probes}


def test_eval_default_report_goes_under_runs_and_is_never_overwritten_unasked(work, tiny):
    args = ["eval", "--adapter", "curious-uncertainty", "--adapters-dir", str(tiny["store"]), "--probes",
            str(tiny["probes"]), "--base", str(tiny["base"]), "--no-likelihood", "--max-tokens", "2", "--quiet"]
    report = Path("runs/eval/curious-uncertainty.md")
    report.parent.mkdir(parents=True)
    report.write_text("an earlier report")
    res = run(*args)
    assert refused(res, report) and report.read_text() == "an earlier report"
    res = run(*args, "--overwrite")
    assert res.exit_code == 0, res.output
    assert report.read_text().startswith("# Stance evaluation") and not list(work.glob("eval-*.md"))


def test_inspect_takes_a_store_name_and_writes_under_runs(work, tiny):
    folder = tiny["store"] / "curious-uncertainty"
    before = sorted(p.name for p in folder.iterdir())
    res = run("inspect", "curious-uncertainty", "--adapters-dir", str(tiny["store"]))
    assert res.exit_code == 0, res.output
    png = work / "runs" / "inspect" / "curious-uncertainty.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and sorted(p.name for p in folder.iterdir()) == before
    assert refused(run("inspect", "curious-uncertainty", "--adapters-dir", str(tiny["store"])), "curious-uncertainty.png")
    assert run("inspect", "curious-uncertainty", "--adapters-dir", str(tiny["store"]), "--overwrite").exit_code == 0
    missing = run("inspect", "no-such-adapter", "--adapters-dir", str(tiny["store"]))
    assert missing.exit_code == 1 and "the adapter store" in " ".join(missing.output.split())


def test_inspect_of_a_shipped_adapter_leaves_its_folder_alone(work):
    shipped = REPO / "adapters" / "curious-uncertainty"
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    res = run("inspect", "curious-uncertainty", "--adapters-dir", str(work / "empty-store"))
    assert res.exit_code == 0, res.output
    assert (work / "runs" / "inspect" / "curious-uncertainty.png").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before


def test_scheduling_data_defaults_under_runs_and_keeps_an_existing_file(work):
    res = run("scheduling-data", "--n", "3")
    assert res.exit_code == 0, res.output
    out = Path("runs/scheduling-data/train.sft.jsonl")
    assert json.loads(res.stdout)["out"] == str(out) and len(out.read_text().splitlines()) == 3
    out.write_text("mine")
    assert refused(run("scheduling-data", "--n", "3"), out) and out.read_text() == "mine"
    assert run("scheduling-data", "--n", "3", "--overwrite").exit_code == 0 and out.read_text() != "mine"


def test_train_sweep_compare_and_export_refuse_existing_outputs_before_any_work(work):
    Path("runs/my-stance").mkdir(parents=True)
    Path("runs/my-stance/adapter_config.json").write_text("{}")
    data = work / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert refused(run("train", "--data", str(data), "--name", "my-stance", "--base", "/nonexistent"), "runs/my-stance")
    Path("runs/sweep").mkdir()
    Path("runs/sweep/sweep.json").write_text("{}")
    assert refused(run("eval", "--sweep", "--base", "/nonexistent"), "runs/sweep")
    Path("runs/compare").mkdir()
    Path("runs/compare/compare.md").write_text("mine")
    assert refused(run("train", "--compare", "runs/my-stance"), "compare.md")
    Path("exported").mkdir()
    Path("exported/x").write_text("mine")
    assert refused(run("export-blend", "--stances", "a=1", "--out", "exported"), "exported")


def test_compare_takes_shipped_adapter_names(work):
    res = run("train", "--compare", "curious-uncertainty", "confident-expertise")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{"):])
    assert [Path(r["run"]).name for r in report["runs"]] == ["curious-uncertainty", "confident-expertise"]
    assert (work / "runs" / "compare" / "compare.md").is_file()
