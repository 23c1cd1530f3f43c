"""Tests of training.scoring: marker scorer, likelihood-ratio scorer, summarize."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.factories import build_tiny_model, load_tokenizer
from training.scoring import (
    ANTI_MARKERS,
    MARKERS,
    NEUTRAL_DESCRIPTION,
    STANCE_DESCRIPTIONS,
    LikelihoodScorer,
    marker_hits,
    marker_score,
    summarize,
    word_count,
)

TYPICAL = {
    "curious-uncertainty": (
        "Hmm, I wonder if it might be the way light scatters? I'm not sure, but perhaps shorter "
        "wavelengths scatter more. What do you think?"
    ),
    "confident-expertise": (
        "The answer is Rayleigh scattering. Specifically, shorter wavelengths scatter far more strongly. "
        "In short, blue light dominates the sky. Use the inverse fourth power rule to estimate it."
    ),
    "engaged-difficulty": (
        "The tricky part is that violet scatters even more than blue. This is hard because our eyes "
        "matter too. First, sunlight scatters off air molecules. Second, short wavelengths scatter more. "
        "Then, our eyes weigh blue strongly. Finally, the sky looks blue. So, it is physics and biology."
    ),
}
NEUTRAL = "The sky is blue because of the way sunlight interacts with the atmosphere and the air around us."


def test_marker_lists_sizes_and_compile():
    assert set(MARKERS) == set(ANTI_MARKERS) == set(STANCE_DESCRIPTIONS)
    for stance, pats in MARKERS.items():
        assert 12 <= len(pats) <= 25, stance
        assert ANTI_MARKERS[stance], stance


@pytest.mark.parametrize("stance", list(MARKERS))
def test_typical_text_scores_higher_than_neutral_and_other_stances(stance):
    own = marker_score(TYPICAL[stance], stance)
    assert own > 5.0
    assert own > marker_score(NEUTRAL, stance)
    for other, text in TYPICAL.items():
        if other != stance:
            assert own > marker_score(text, stance), (stance, other)


def test_marker_score_counts_exactly():
    text = "I wonder why. What do you think?"
    assert word_count(text) == 7
    assert marker_hits(text, "curious-uncertainty") == ["wonder", "what do you think", "?"]
    assert marker_score(text, "curious-uncertainty") == pytest.approx(100 * 3 / 7)
    # Curly apostrophes count like straight ones; case does not matter.
    assert marker_hits("I\u2019M NOT SURE.", "curious-uncertainty") == ["i'm not sure"]
    assert marker_score("", "confident-expertise") == 0.0


def test_anti_markers_lower_the_score_and_are_listed():
    base = "The answer is 42. Specifically, it is six times seven."
    hedged = base + " But maybe I'm not sure, perhaps it might be 41?"
    assert marker_score(hedged, "confident-expertise") < marker_score(base, "confident-expertise")
    hits = marker_hits(hedged, "confident-expertise")
    assert hits[:2] == ["the answer is", "specifically"]
    assert {"anti:maybe", "anti:i'm not sure", "anti:perhaps", "anti:might", "anti:?"} <= set(hits)
    n = word_count(hedged)
    assert marker_score(hedged, "confident-expertise") == pytest.approx(max(100 * (2 - 5) / n, -10.0))
    assert 100 * (2 - 5) / n < -10.0
    one_hedge = base + " Multiply six by seven and you get it, maybe."
    n1 = word_count(one_hedge)
    assert marker_score(one_hedge, "confident-expertise") == pytest.approx(100 * (2 - 1) / n1)
    easy = "It's easy, just simply add them. Obviously trivial."
    assert marker_score(easy, "engaged-difficulty") < 0
    # Clamped at -10.
    assert marker_score("Maybe? Perhaps? Might?", "confident-expertise") == -10.0


def test_unknown_stance_raises():
    with pytest.raises(ValueError, match="unknown stance"):
        marker_score("hi", "grumpy")


# -- likelihood scorer -------------------------------------------------------------------

PROMPTS = ["Why is the sky blue?", "How do I sort a list?", "Tell me a story.", "What is two plus two?", "Hi"]
ANSWERS = [
    "I wonder, maybe it is the light?",
    "Use sorted(). In short, it returns a new list.",
    "Once upon a time there was a little dog who liked to run in the park every day.",
    "Four.",
    "The tricky part is saying hello. First, wave. Then, smile.",
]


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _reference(model, tok, system, prompt, answer):
    """Mean log P(answer | prefix) from one unpadded full forward pass."""
    prefix = tok.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
    )
    p = tok(prefix, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(p) - 1 + t, a[t]].item() for t in range(len(a))) / len(a)


def test_likelihood_matches_unpadded_reference(llama, tok):
    scorer = LikelihoodScorer(llama, tok, batch_size=8)
    got = scorer.score(PROMPTS, ANSWERS, "curious-uncertainty")
    assert len(got) == len(ANSWERS) and all(isinstance(x, float) and math.isfinite(x) for x in got)
    for i in (0, 2, 4):
        want = _reference(llama, tok, STANCE_DESCRIPTIONS["curious-uncertainty"], PROMPTS[i], ANSWERS[i]) - (
            _reference(llama, tok, NEUTRAL_DESCRIPTION, PROMPTS[i], ANSWERS[i])
        )
        assert got[i] == pytest.approx(want, abs=1e-4)


def test_likelihood_independent_of_batch_composition(llama, tok):
    together = LikelihoodScorer(llama, tok, batch_size=16).score(PROMPTS, ANSWERS, "engaged-difficulty")
    odd = LikelihoodScorer(llama, tok, batch_size=3).score(PROMPTS, ANSWERS, "engaged-difficulty")
    single = LikelihoodScorer(llama, tok, batch_size=1)
    alone = [single.score([p], [a], "engaged-difficulty")[0] for p, a in zip(PROMPTS, ANSWERS)]
    assert torch.allclose(torch.tensor(together), torch.tensor(alone), atol=1e-4)
    assert torch.allclose(torch.tensor(odd), torch.tensor(alone), atol=1e-4)


def test_likelihood_depends_on_description(llama, tok):
    scorer = LikelihoodScorer(llama, tok)
    a = scorer.score(PROMPTS[:2], ANSWERS[:2], "curious-uncertainty")
    b = scorer.score(PROMPTS[:2], ANSWERS[:2], "confident-expertise")
    assert all(abs(x - y) > 1e-6 for x, y in zip(a, b))
    # Custom descriptions: identical to the neutral one gives exactly zero.
    same = LikelihoodScorer(llama, tok, descriptions={"x": NEUTRAL_DESCRIPTION})
    assert same.score(PROMPTS[:2], ANSWERS[:2], "x") == pytest.approx([0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="unknown stance"):
        same.score(PROMPTS[:1], ANSWERS[:1], "curious-uncertainty")
    with pytest.raises(ValueError, match="prompts but"):
        scorer.score(PROMPTS[:2], ANSWERS[:1], "curious-uncertainty")


def test_likelihood_plain_text_fallback_and_empty_answer(llama, tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    scorer = LikelihoodScorer(llama, plain)
    assert scorer._prefix_text("S", "U") == "system: S\nuser: U\nassistant: "
    got = scorer.score(PROMPTS[:2] + ["x"], ANSWERS[:2] + [""], "confident-expertise")
    assert all(math.isfinite(x) for x in got[:2]) and math.isnan(got[2])
    templated = LikelihoodScorer(llama, tok).score(PROMPTS[:2], ANSWERS[:2], "confident-expertise")
    assert got[:2] != pytest.approx(templated)


# -- summarize --------------------------------------------------------------------------


def test_summarize_hand_numbers():
    base = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # p90 = 9.0 (linear interpolation)
    adapter = [8, 9.5, 10, 12, float("nan")]
    s = summarize(base, adapter)
    assert s["base_mean"] == 5.0 and s["base_median"] == 5.0 and s["base_p90"] == pytest.approx(9.0)
    assert s["adapter_mean"] == pytest.approx(39.5 / 4) and s["adapter_median"] == pytest.approx(9.75)
    assert s["adapter_above_base_p90"] == pytest.approx(3 / 4)
    assert s["separated"] is True and s["n_adapter"] == 4
    assert summarize([1, 2, 3], [1, 1, 1])["separated"] is False
    with pytest.raises(ValueError):
        summarize([], [1.0])
