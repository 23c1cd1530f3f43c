"""evaluate_stance: scores, summaries and the reference calibration, on fixed answers.

A stub generator returns fixed answers, so every number can be recomputed from the scorers
directly; the tiny random Llama serves only as the likelihood scorer's model.
"""

from __future__ import annotations

import pytest

from tests.factories import build_tiny_model, load_tokenizer
from training.evaluate import BASE, evaluate_stance
from training.scoring import LikelihoodScorer, marker_score, summarize

STANCE = "curious-uncertainty"
PROBES = ["Why is the sky blue?", "How do magnets work?", "What is a prime number?"]
BASE_ANSWERS = ["Because of scattering.", "Magnets have fields.", "A number with two divisors."]
ADAPTER_ANSWERS = ["I wonder if it is scattering?", "Maybe fields? I'm not sure.", "Perhaps two divisors?"]
REFERENCE = [("Why?", "Hmm, I wonder. What do you think?"), ("How?", "It might be, perhaps, fields."),
             ("What?", "It is a number.")]  # fmt: skip


class StubGenerator:
    base_name = "stub-base"

    def generate(self, prompts: list[str], model: str, max_tokens: int) -> list[str]:
        assert prompts == PROBES
        return list(BASE_ANSWERS if model == BASE else ADAPTER_ANSWERS)


@pytest.fixture(scope="module")
def scorer_model():
    return build_tiny_model("llama").eval(), load_tokenizer()


def test_reference_answers_are_scored_against_the_base_distribution(scorer_model, tmp_path):
    model, tok = scorer_model
    res = evaluate_stance(StubGenerator(), "my-adapter", PROBES, STANCE, report_path=tmp_path / "r.md",
                          likelihood_model=model, likelihood_tokenizer=tok, reference=REFERENCE)
    m_base = [marker_score(a, STANCE) for a in BASE_ANSWERS]
    m_ref = [marker_score(a, STANCE) for _, a in REFERENCE]
    want = summarize(m_base, m_ref)
    assert res["marker"]["reference"] == {"n": 3, "mean": pytest.approx(want["adapter_mean"]),
                                          "above_base_p90": want["adapter_above_base_p90"],
                                          "separated": want["separated"]}  # fmt: skip
    assert res["marker"]["reference"]["mean"] > 0 and res["marker"]["reference"]["above_base_p90"] == pytest.approx(2 / 3)

    scorer = LikelihoodScorer(model, tok)
    l_base = scorer.score(PROBES, BASE_ANSWERS, STANCE)
    l_ref = scorer.score([p for p, _ in REFERENCE], [a for _, a in REFERENCE], STANCE)
    lik = res["likelihood"]
    assert lik["base_mean"] == pytest.approx(summarize(l_base, l_base)["base_mean"], abs=1e-5)
    assert lik["reference"]["n"] == 3
    assert lik["reference"]["mean"] == pytest.approx(summarize(l_base, l_ref)["adapter_mean"], abs=1e-5)
    report = (tmp_path / "r.md").read_text()
    assert "| marker score: reference answers mean (3 written in the stance) |" in report
    assert "| likelihood score: reference answers above base p90 |" in report


def test_without_reference_no_reference_fields(tmp_path):
    res = evaluate_stance(StubGenerator(), "my-adapter", PROBES, STANCE, report_path=tmp_path / "r.md")
    assert res["likelihood"] is None and "reference" not in res["marker"]
    assert res["fraction_different"] == 1.0
    assert "reference answers" not in (tmp_path / "r.md").read_text()
