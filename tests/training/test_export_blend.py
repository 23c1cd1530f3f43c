"""export-blend: the exported peft adapter against the server's live blend, on the tiny random Llama.

The live side is the engine's public path (a blend stance, greedy, with logprobs); the exported side is
plain peft (``PeftModel.from_pretrained``) teacher-forced on the engine's tokens. ``cat`` must agree to
float rounding; ``svd`` at a lower rank is reported and bounded.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from app.engine.sampling import SamplingParams
from tests.factories import FakeStore, base_model, load_tokenizer, make_engine, write_peft_adapter
from training.export_blend import export_blend, parse_stances

BLEND = {"calm": 0.6, "bold": -0.4}
PROMPT = [1, 45, 67, 89, 23, 11, 5]
STEPS = 12


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    return {"calm": write_peft_adapter(root / "calm", "llama", rank=4, seed=11, scale=0.5),
            # different rank, alpha and targets: cat must handle modules that only one member adapts
            "bold": write_peft_adapter(root / "bold", "llama", rank=8, alpha=16, seed=12, scale=0.5,
                                       targets=["q_proj", "v_proj", "down_proj"], use_rslora=True)}


@pytest.fixture(scope="module")
def live(members):
    """Greedy tokens and per-step logprobs ``[STEPS, V']`` of the engine's live blend (top-20 per step)."""
    eng = make_engine(base_model("llama"), load_tokenizer(), FakeStore(members))

    try:
        params = SamplingParams(max_tokens=STEPS, temperature=0, logprobs=20, ignore_eos=True)
        [done] = eng.generate_batch([PROMPT], eng.resolve_stance("tiny", BLEND), params)
        steps = [t for t in done.tokens if not t.ends]
        return [t.token_id for t in steps], [dict(t.top_logprobs) for t in steps]
    finally:
        eng.stop()


def _peft_logprobs(folder, tokens):
    """Log-softmax of plain peft with the exported adapter, teacher-forced on PROMPT + tokens: ``[STEPS, V]``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model("llama")), str(folder)).eval()
    ids = torch.tensor([PROMPT + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(PROMPT) - 1: len(PROMPT) - 1 + len(tokens)]
    return torch.log_softmax(logits.float(), dim=-1)


def _divergence(live_tokens, live_tops, lp):
    """Max |logprob difference| over each step's live top-20, and whether peft's argmax follows the live tokens."""
    diff = max(abs(lp[i, t].item() - v) for i, top in enumerate(live_tops) for t, v in top.items())
    same = lp.argmax(-1).tolist() == live_tokens
    return diff, same


def test_cat_export_matches_the_live_blend(members, live, tmp_path):
    summary = export_blend(base_model("llama"), members, BLEND, tmp_path / "cat", method="cat")
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 8 and summary["rank"] == 12 and cfg["peft_type"] == "LORA"
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert summary["max_rel_error"] < 1e-5 and summary["modules"] == 14
    tokens, tops = live
    lp = _peft_logprobs(tmp_path / "cat", tokens)
    diff, same = _divergence(tokens, tops, lp)
    print(json.dumps({"cat_max_logprob_diff": diff, "cat_max_rel_update_error": summary["max_rel_error"]}))
    assert same and diff < 1e-4, diff
    # and it is the blend, not a member or the base model
    base = _peft_logprobs(members["calm"], tokens)
    assert _divergence(tokens, tops, base)[0] > 100 * max(diff, 1e-6)


def test_svd_export_divergence_is_reported_and_bounded(members, live, tmp_path):
    """svd's error is the Eckart-Young bound: per module, the norm of the dropped singular values of the blended
    update (relative), so it shrinks as the rank grows and vanishes at the blend's own rank (12 here)."""
    from peft import PeftModel

    from training.export_blend import blend_deltas

    tokens, tops = live
    res = {r: export_blend(base_model("llama"), members, BLEND, tmp_path / f"svd{r}", method="svd", rank=r)
           for r in (2, 6, 12)}
    assert [res[r]["rank"] for r in (2, 6, 12)] == [2, 6, 12]
    # the bound, recomputed from the blend's own singular values
    model = PeftModel.from_pretrained(copy.deepcopy(base_model("llama")), str(members["calm"]), adapter_name="m0")
    model.load_adapter(str(members["bold"]), adapter_name="m1")
    for path, delta in blend_deltas(model, ["m0", "m1"], list(BLEND.values())).items():
        sv = torch.linalg.svdvals(delta.double())
        for r in (2, 6):
            bound = float(sv[r:].norm() / sv.norm())
            assert res[r]["per_module"][path] == pytest.approx(bound, rel=1e-3, abs=1e-5)
    assert res[12]["max_rel_error"] < 1e-4
    assert res[2]["mean_rel_error"] > res[6]["mean_rel_error"] > res[12]["mean_rel_error"]
    d = {r: _divergence(tokens, tops, _peft_logprobs(tmp_path / f"svd{r}", tokens))[0] for r in (2, 6, 12)}
    print(json.dumps({f"svd_rank{r}": {"max_logprob_diff": d[r], "mean_rel_update_error": res[r]["mean_rel_error"]}
                      for r in d}))
    assert d[12] < 1e-3 and d[2] > d[12] and math.isfinite(d[2])


def test_parse_stances_and_refusals(members, tmp_path):
    assert parse_stances("a=0.6, b=-0.4") == {"a": 0.6, "b": -0.4}
    for bad in ("a", "a=x", "a=1,a=2", ""):
        with pytest.raises(ValueError):
            parse_stances(bad)
    with pytest.raises(ValueError, match="svd only"):
        export_blend(base_model("llama"), members, BLEND, tmp_path / "x", method="cat", rank=4)
    with pytest.raises(ValueError, match="method"):
        export_blend(base_model("llama"), members, BLEND, tmp_path / "x", method="ties")
