"""Blend sweeps (training.sweep, training.sweep_report, training.stats) on the tiny random Llama.

The sweep runs for real through the engine's live blend (two tiny peft adapters named as stances);
the tests check the JSON's shape and numbers against the answers and scorers, the PNG, the report,
and the statistics against hand-computed values.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.factories import tiny_factory, write_peft_adapter
from training.evaluate import LocalGenerator
from training.stats import bootstrap_mean, paired_delta, spearman, sweep_rho
from training.sweep import blend_key, curves, run_sweep, write_answers
from training.sweep_report import curve_filename, plot_curve, write_sweep_report

A, B = "curious-uncertainty", "confident-expertise"
PROBES = ["Why is the sky blue?", "How do magnets work?", "What is a prime number?"]
WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 1.5)
TS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    write_peft_adapter(root / A, "llama", rank=4, seed=21, scale=0.6)
    write_peft_adapter(root / B, "llama", rank=8, alpha=16, seed=22, scale=0.6)
    gen = LocalGenerator(loaded=tiny_factory(None), adapters_dir=root, max_batch_size=8)
    from training.scoring import LikelihoodScorer

    scorer = LikelihoodScorer(gen.loaded.model, gen.loaded.tokenizer)
    try:
        result, answers = run_sweep(gen, [A, B], PROBES, weights=WEIGHTS, ts=TS, max_tokens=6,
                                    likelihood_scorer=scorer, resamples=200)
        single = gen.generate(PROBES, A, 6)  # the adapter alone, not as a blend
    finally:
        gen.close()
    return result, answers, single, scorer


def test_sweep_json_schema_and_numbers(swept):
    result, answers, single, scorer = swept
    json.dumps(result, allow_nan=True)  # JSON-ready
    assert result["schema_version"] == 1 and result["probes"] == 3 and result["scorers"] == ["likelihood", "marker"]
    assert [c["name"] for c in result["curves"]] == [A, B, f"{A}+{B}"]
    # distinct blends: base, 4 non-zero weights per stance, 1 interior pair point (t=0 and 1 are single stances)
    assert len(answers) == 1 + 4 + 4 + 1 and result["generations"] == 10 * 3
    for c in result["curves"]:
        assert [p["x"] for p in c["points"]] == list(WEIGHTS if c["kind"] == "stance" else TS)
        for p in c["points"]:
            for s in c["members"]:
                for sc in result["scorers"]:
                    stat = p["scores"][s][sc]
                    assert set(stat) == {"mean", "ci", "n"}
                    if stat["n"]:  # the tiny model's base answers may be empty: nothing to score (nan)
                        assert stat["ci"][0] - 1e-9 <= stat["mean"] <= stat["ci"][1] + 1e-9
                    else:
                        assert math.isnan(stat["mean"])
            assert 0.0 <= p["fraction_different"] <= 1.0
        for s in c["members"]:
            for sc in result["scorers"]:
                t = c["spearman"][s][sc]
                assert set(t) == {"rho_means", "ci_means", "rho_answers", "ci_answers"}
                assert math.isnan(t["rho_means"]) or -1 <= t["rho_means"] <= 1
    stance_a = result["curves"][0]
    base_point = stance_a["points"][WEIGHTS.index(0.0)]
    assert base_point["blend"] == {A: 0.0} and base_point["fraction_different"] == 0.0
    # the random adapters change the greedy answers
    assert stance_a["points"][WEIGHTS.index(1.5)]["fraction_different"] > 0
    assert set(stance_a["anti_stance"][A]) == {"weight", "likelihood", "marker"}
    # the numbers are the scorer's on the stored answers
    want = scorer.score(PROBES, answers[blend_key({A: 1.0})], A)
    got = stance_a["points"][WEIGHTS.index(1.0)]["scores"][A]["likelihood"]["mean"]
    assert got == pytest.approx(float(np.mean(want)), abs=1e-6)
    # a pair's ends are the single stances (generated once), and {A: 1} as a live blend answers as A alone
    pair = result["curves"][2]
    assert pair["points"][0]["blend"] == {A: 1.0, B: 0.0}
    assert pair["points"][0]["scores"][A] == stance_a["points"][WEIGHTS.index(1.0)]["scores"][A]
    assert answers[blend_key({A: 1.0})] == single


def test_plot_and_report(swept, tmp_path):
    result, answers, _, _ = swept
    pngs = {}
    for c in result["curves"]:
        path = plot_curve(c, result["scorers"], tmp_path / curve_filename(c["name"]))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        pngs[c["name"]] = path.name
    report = write_sweep_report(tmp_path / "r.md", result, PROBES, answers, pngs=pngs, command="stanceserve eval --sweep")
    text = report.read_text()
    assert f"![{A}+{B}]({A}+{B}.png)" in text and "## Anti-stance (negative weight)" in text
    assert "| probe | weight=0 | weight=0.5 | weight=1 |" in text and "| probe | t=0 | t=0.5 | t=1 |" in text
    rows = [json.loads(line) for line in write_answers(tmp_path / "a.jsonl", PROBES, answers).read_text().splitlines()]
    assert len(rows) == 30 and {r["probe"] for r in rows} == {0, 1, 2}


def test_curves_and_keys():
    cs = curves([A, B, "engaged-difficulty"])
    assert [c.kind for c in cs] == ["stance"] * 3 + ["pair"] * 3
    assert cs[3].blend(0.25) == {A: 0.75, B: 0.25}
    assert blend_key({A: 0.0, B: 1.0}) == ((B, 1.0),) and blend_key({}) == ()
    with pytest.raises(ValueError):
        curves([A, A])


def test_spearman_matches_hand_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks 1,2,3,4; y = [1, 2, 2, 3] ranks 1, 2.5, 2.5, 4 -> r = 4.5 / sqrt(5 * 4.5)
    assert spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_bootstrap_and_sweep_rho():
    b = bootstrap_mean([1.0, 2.0, 3.0, float("nan")], resamples=500)
    assert b["mean"] == pytest.approx(2.0) and b["n"] == 3 and 1.0 <= b["ci"][0] < 2.0 < b["ci"][1] <= 3.0
    assert paired_delta([2, 3, 4], [1, 1, 1], resamples=100)["mean"] == pytest.approx(2.0)
    xs = [-1, 0, 1, 2]
    rising = np.array([[0.0, 0.1, 0.2], [1.0, 1.1, 1.2], [2.0, 2.1, 2.2], [3.0, 3.1, 3.2]])
    r = sweep_rho(xs, rising, resamples=200)
    assert r["rho_means"] == pytest.approx(1.0) and r["ci_means"] == [pytest.approx(1.0)] * 2
    assert r["rho_answers"] > 0.9
    assert sweep_rho(xs, -rising, resamples=50)["rho_means"] == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        sweep_rho(xs, rising[:3])


def test_cli_sweep_writes_json_pngs_report(tmp_path):
    """``stanceserve eval --sweep`` end to end on a saved tiny base model: every output file in --out."""
    from typer.testing import CliRunner

    from tests.factories import save_tiny_base
    from training.cli import app

    base = save_tiny_base(tmp_path / "base")
    store = tmp_path / "store"
    write_peft_adapter(store / A, "llama", rank=4, seed=21, scale=0.6)
    write_peft_adapter(store / B, "llama", rank=4, seed=22, scale=0.6)
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROBES[:2]))
    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, [
        "eval", "--sweep", "--stances", f"{A},{B}", "--probes", str(probes), "--base", str(base),
        "--adapters-dir", str(store), "--weights=-1,0,1", "--ts", "0,0.5,1", "--max-tokens", "4",
        "--resamples", "50", "--no-likelihood", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert set(summary["spearman"]) == {A, B, f"{A}+{B}"}
    data = json.loads((out / "sweep.json").read_text())
    assert data["scorers"] == ["marker"] and data["probes"] == 2
    assert sorted(p.name for p in out.glob("*.png")) == sorted(curve_filename(n) for n in (A, B, f"{A}+{B}"))
    assert "## Anti-stance (negative weight)" in (out / "sweep_report.md").read_text()
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2 * (1 + 2 + 2 + 1)


@pytest.mark.slow
def test_cli_sweep_against_a_live_server(tmp_path):
    """``stanceserve eval --sweep --url``: every row is a live-blend request to a real server process (tiny Llama).

    The adapters exist only in the server's store, so nothing could be generated locally; the answers written are
    the server's own greedy answers to the same blends, asked again directly.
    """
    import httpx
    from typer.testing import CliRunner

    from tests.factories import BASE_MODEL
    from tests.server import start_server
    from training.cli import app

    write_peft_adapter(tmp_path / "server" / "store" / A, "llama", rank=4, seed=21, scale=0.6)
    write_peft_adapter(tmp_path / "server" / "store" / B, "llama", rank=4, seed=22, scale=0.6)
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROBES[:2]))
    out = tmp_path / "sweep"
    with start_server(tmp_path / "server") as server:
        res = CliRunner().invoke(app, [
            "eval", "--sweep", "--url", server.base, "--stances", f"{A},{B}", "--probes", str(probes),
            "--adapters-dir", str(tmp_path / "empty"), "--weights=-1,0,1", "--ts", "0,0.5,1", "--max-tokens", "4",
            "--resamples", "50", "--no-likelihood", "--quiet", "--out", str(out)])
        assert res.exit_code == 0, res.output + server.log_tail()
        rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        mid = {A: 0.5, B: 0.5}
        direct = [httpx.post(f"{server.base}/v1/chat/completions", timeout=60, json={
            "model": BASE_MODEL, "stances": mid, "messages": [{"role": "user", "content": p}], "max_tokens": 4,
            "temperature": 0}).json()["choices"][0]["message"]["content"].strip() for p in PROBES[:2]]
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["json"] == str(out / "sweep.json") and set(summary["spearman"]) == {A, B, f"{A}+{B}"}
    data = json.loads((out / "sweep.json").read_text())
    assert data["schema_version"] == 1 and data["base_model"] == BASE_MODEL  # the server's name, from /v1/models
    assert (data["probes"], data["max_tokens"], data["scorers"]) == (2, 4, ["marker"])
    # distinct blends: base, 2 non-zero weights per stance, the pair's midpoint (its ends are the single stances)
    assert data["generations"] == 2 * (1 + 2 + 2 + 1) and len(rows) == data["generations"]
    assert [c["name"] for c in data["curves"]] == [A, B, f"{A}+{B}"]
    for c in data["curves"]:
        assert [p["x"] for p in c["points"]] == ([-1.0, 0.0, 1.0] if c["kind"] == "stance" else [0.0, 0.5, 1.0])
        for p in c["points"]:
            assert set(p["scores"]) == set(c["members"]) and 0.0 <= p["fraction_different"] <= 1.0
            assert all(set(p["scores"][s]["marker"]) == {"mean", "ci", "n"} for s in c["members"])
        assert (out / c["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.glob("*.png")) == sorted(curve_filename(n) for n in (A, B, f"{A}+{B}"))
    assert [r["answer"] for r in rows if r["blend"] == mid] == direct
    # and the server did blend: the random adapters change some answers (else the check above proves little)
    assert any(p["fraction_different"] > 0 for c in data["curves"] for p in c["points"])
    assert (out / "sweep_report.md").is_file()
