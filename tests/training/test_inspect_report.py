"""Tests of training.inspect_adapter (LoRA update norms, table, heatmap) and training.report."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from tests.factories import TARGETS, build_tiny_model, edit_config, edit_tensors, key, write_peft_adapter
from training.inspect_adapter import adapter_update_norms, lora_update_norm, norms_table, plot_heatmap
from training.report import fraction_different, write_eval_report


def _peft_dense_norms(model, adapter_dir) -> dict[str, float]:
    """||delta W||_F per module from peft itself (get_delta_weight includes the scaling)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir)
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            delta = module.get_delta_weight("default")
            out[name.removeprefix("base_model.model.")] = float(torch.linalg.matrix_norm(delta.double()))
    return out


def test_gram_identity_matches_dense_product():
    gen = torch.Generator().manual_seed(0)
    for r, d_in, d_out in [(1, 5, 7), (4, 64, 32), (16, 40, 300)]:
        A = torch.randn(r, d_in, generator=gen)
        B = torch.randn(d_out, r, generator=gen)
        dense = float(torch.linalg.matrix_norm(0.7 * B.double() @ A.double()))
        assert lora_update_norm(A, B, 0.7) == pytest.approx(dense, rel=1e-9)
    with pytest.raises(ValueError):
        lora_update_norm(torch.zeros(3, 4), torch.zeros(5, 2))


@pytest.mark.parametrize("arch,rslora", [("llama", False), ("phi", False), ("llama", True)])
def test_adapter_update_norms_equal_peft_dense(tmp_path, arch, rslora):
    model = build_tiny_model(arch)
    d = write_peft_adapter(tmp_path / "a", arch, model=model, rank=4, alpha=16.0, use_rslora=rslora)
    rows = adapter_update_norms(d)
    want = _peft_dense_norms(model, d)
    assert {r["module"] for r in rows} == set(want)
    assert len(rows) == 2 * len(TARGETS[arch])
    for row in rows:
        assert row["norm"] == pytest.approx(want[row["module"]], rel=1e-5)
        assert row["rank"] == 4
        assert row["scaling"] == pytest.approx(16.0 / 2.0 if rslora else 16.0 / 4)
        assert row["layer"] == int(re.search(r"layers\.(\d+)\.", row["module"]).group(1))
        assert row["projection"] == row["module"].rsplit(".", 1)[-1]
    assert [r["layer"] for r in rows] == sorted(r["layer"] for r in rows)


def test_adapter_update_norms_rank_and_alpha_pattern(tmp_path):
    model = build_tiny_model("llama")
    write_peft_adapter(
        tmp_path, model=model, rank=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 32}, task_type=None,
        init_lora_weights=False, seed=None,  # peft's own random non-zero B
    )
    rows = {r["module"]: r for r in adapter_update_norms(tmp_path)}
    want = _peft_dense_norms(model, tmp_path)
    for module, row in rows.items():
        assert row["norm"] == pytest.approx(want[module], rel=1e-5)
    assert rows["model.layers.0.self_attn.v_proj"]["rank"] == 2
    assert rows["model.layers.0.self_attn.v_proj"]["scaling"] == pytest.approx(4.0)
    assert rows["model.layers.1.self_attn.q_proj"]["scaling"] == pytest.approx(8.0)
    assert rows["model.layers.0.self_attn.q_proj"]["scaling"] == pytest.approx(2.0)


def test_adapter_update_norms_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        adapter_update_norms(tmp_path)


def test_inspect_reads_only_through_the_registry_reader(tmp_path, monkeypatch):
    """training.inspect_adapter parses no file itself: app.registry.peft_reader reads the adapter, once."""
    import inspect as pyinspect

    import app.registry.peft_reader as peft_reader
    import training.inspect_adapter as inspect_adapter

    source = pyinspect.getsource(inspect_adapter)
    for own_reading in ("safetensors import", "safe_open", "load_file", "json.load", "import json", "read_bytes", "open("):
        assert own_reading not in source, own_reading

    d = write_peft_adapter(tmp_path / "a", "llama", model=build_tiny_model("llama"))
    calls = []

    def spy(path, **kw):
        calls.append(path)
        return peft_reader.read_peft_adapter(path, **kw)

    monkeypatch.setattr(inspect_adapter, "read_peft_adapter", spy)
    rows = adapter_update_norms(d)
    assert calls == [d] and len(rows) == 2 * len(TARGETS["llama"])


def test_adapter_update_norms_refuses_what_the_server_refuses(tmp_path):
    from app.errors import AdapterValidationError

    d = write_peft_adapter(tmp_path / "a", "llama", model=build_tiny_model("llama"))
    q0 = "model.layers.0.self_attn.q_proj"
    edit_tensors(d, lambda t: t.pop(key(q0, "lora_B")))
    with pytest.raises(ValueError, match="no matching lora_B"):
        adapter_update_norms(d)
    edit_config(d, use_dora=True)
    with pytest.raises(AdapterValidationError, match="use_dora"):
        adapter_update_norms(d)


def test_table_and_heatmap(tmp_path):
    model = build_tiny_model("phi")
    d = write_peft_adapter(tmp_path / "a", "phi", model=model)
    rows = adapter_update_norms(d)
    table = norms_table(rows)
    assert table.row_count == 2  # layers 0 and 1
    assert [c.header for c in table.columns] == ["layer", "q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    cell = list(table.columns[1].cells)[1]
    q1 = next(r for r in rows if r["layer"] == 1 and r["projection"] == "q_proj")
    assert cell == f"{q1['norm']:.4g}"
    # A module not targeted in one layer shows "-".
    partial = norms_table([r for r in rows if not (r["layer"] == 0 and r["projection"] == "fc2")])
    assert list(partial.columns[-1].cells)[0] == "-"

    png = plot_heatmap(rows, tmp_path / "plots" / "norms.png", "phi adapter")
    assert png == tmp_path / "plots" / "norms.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError):
        plot_heatmap([], tmp_path / "x.png", "empty")


# -- report ------------------------------------------------------------------------------


def test_fraction_different():
    assert fraction_different(["a", " b\n", "c", "d"], ["a ", "b", "C", "x"]) == 0.5
    with pytest.raises(ValueError):
        fraction_different(["a"], [])
    with pytest.raises(ValueError):
        fraction_different([], [])


def test_write_eval_report(tmp_path):
    probes = ["Why is the sky blue?", "Sort | a list?", "Say hi"]
    base = ["Because of scattering.", "Use sorted().", "Hi"]
    adapter = ["I wonder... maybe scattering?", "Hmm, ```code``` maybe sorted()?", "Hi "]
    marker = {
        "n_base": 3, "n_adapter": 3, "base_mean": 0.125, "base_median": 0.0, "base_p90": 1.5,
        "adapter_mean": 23.456, "adapter_median": 20.0, "adapter_above_base_p90": 2 / 3, "separated": True,
    }  # fmt: skip
    likelihood = dict(marker, base_mean=-0.031, adapter_mean=0.777, separated=False,
                      reference={"n": 12, "mean": 0.5, "above_base_p90": 0.25, "separated": False})
    per_answer = [
        {"base_marker": 0.0, "adapter_marker": 50.0, "base_hits": [], "adapter_hits": ["wonder", "maybe", "?"],
         "base_likelihood": -0.1, "adapter_likelihood": 0.25},
        {"base_marker": 0.0, "adapter_marker": 40.0, "base_hits": ["anti:use"], "adapter_hits": ["hmm"]},
        {"base_marker": 0.0, "adapter_marker": 0.0},
    ]  # fmt: skip
    out = write_eval_report(
        tmp_path / "r" / "report.md", adapter="curious-v1", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        probes=probes, base_answers=base, adapter_answers=adapter, stance="curious-uncertainty",
        marker=marker, likelihood=likelihood, per_answer=per_answer, examples=2,
    )  # fmt: skip
    text = out.read_text()
    assert text.startswith("# Stance evaluation: `curious-v1`")
    assert "SmolLM2-135M-Instruct" in text and "greedy" in text and "Probes: 3" in text
    assert "| answers that differ from base | 67% (2/3) |" in text
    assert "| marker score: adapter mean | 23.456 |" in text
    assert "| marker score: base p90 | 1.500 |" in text
    assert "| marker score: adapter answers above base p90 | 67% |" in text
    assert "| likelihood score: adapter mean | 0.777 |" in text
    assert "| likelihood score: separated (adapter mean > base p90) | no |" in text
    assert "| likelihood score: reference answers mean (12 written in the stance) | 0.500 |" in text
    assert "| likelihood score: reference answers above base p90 | 25% |" in text
    assert "marker score: reference" not in text  # only the summaries that have one
    assert "*Reference answers* are answers written in the stance" in text
    assert "How the scores work" in text
    # Two examples only, side by side with scores and hits.
    assert "### Probe 1" in text and "### Probe 2" in text and "### Probe 3" not in text
    assert "| marker hits | none | wonder, maybe, ? |" in text
    assert "| likelihood score | -0.100 | 0.250 |" in text
    assert "| likelihood score | n/a | n/a |" in text
    assert "I wonder... maybe scattering?" in text and "Because of scattering." in text
    # A backtick run in an answer gets a longer fence.
    assert "````text\nHmm, ```code``` maybe sorted()?\n````" in text
    # Without likelihood: no likelihood rows.
    no_lik = write_eval_report(
        tmp_path / "b.md", adapter="a", base_model="m", probes=probes, base_answers=base, adapter_answers=adapter,
        stance="curious-uncertainty", marker=marker, likelihood=None, per_answer=[{}, {}, {}],
    )  # fmt: skip
    assert "likelihood score" not in no_lik.read_text()
    with pytest.raises(ValueError, match="lengths differ"):
        write_eval_report(
            tmp_path / "c.md", adapter="a", base_model="m", probes=probes, base_answers=base[:2],
            adapter_answers=adapter, stance="s", marker=marker, likelihood=None, per_answer=per_answer,
        )  # fmt: skip
