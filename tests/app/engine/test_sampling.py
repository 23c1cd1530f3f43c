"""Sampling: filters, penalties, logit_bias, min_tokens, logprobs and per-row fault isolation.

Each feature is checked against an independent reference on the same random logits: a
Python loop of OpenAI's penalty formula, HF's ``RepetitionPenaltyLogitsProcessor``, and
``torch.log_softmax`` / ``torch.topk`` for logprobs.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from app.engine.sampling import SamplingParams, TokenChoice, choose_tokens, filter_logits, process_logits
from app.errors import GenerationError

CPU = torch.device("cpu")
V = 40  # vocabulary of the random-logit tests


def rand_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def choose(logits, params, prompts=None, outputs=None, eos=frozenset(), gens=None):
    """choose_tokens with fresh generators (from each row's seed) and empty histories by default."""
    n = len(params)
    gens = gens if gens is not None else [p.make_generator(CPU) for p in params]
    return choose_tokens(logits, params, gens, prompts or [[]] * n, outputs or [[]] * n, eos)


def ids(results) -> list[int]:
    assert all(isinstance(r, TokenChoice) for r in results), results
    return [r.token_id for r in results]


def test_top_k_keeps_k_best():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = filter_logits(probs.log(), 1.0, 0, 0.75)  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: keep two
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    out = filter_logits(probs.log(), 1.0, 0, 0.4)  # the top token alone already reaches 0.4
    assert torch.isfinite(out).tolist() == [True, False, False, False]


def test_temperature_scales_and_greedy_is_argmax():
    logits = torch.tensor([0.0, 2.0])
    assert math.isclose(float(filter_logits(logits, 0.5, 0, 1.0)[1]), 4.0)
    rows = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert choose(rows, [SamplingParams(temperature=0)] * 2) == [TokenChoice(1), TokenChoice(0)]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    p = SamplingParams(temperature=1.0, seed=7)

    def draws():
        g = p.make_generator(CPU)
        return [ids(choose_tokens(logits, [p], [g], [[]], [[]]))[0] for _ in range(400)]

    a, b = draws(), draws()
    assert a == b
    assert 0.68 < sum(a) / len(a) < 0.82


def openai_penalties(row: torch.Tensor, output: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's formula, one token at a time."""
    ref = row.clone()
    for j in range(ref.numel()):
        c = output.count(j)
        ref[j] -= c * frequency + (1.0 if c > 0 else 0.0) * presence
    return ref


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 0.7), (0.5, -0.4), (-2.0, 2.0)])
def test_presence_and_frequency_penalties_match_openai_formula(presence, frequency):
    logits = rand_logits(1, seed=1)
    top = torch.topk(logits[0], 3).indices.tolist()
    output = [top[0], top[0], top[0], top[1], 7, 7, 12]  # the favourites repeat, so greedy moves
    prompt = [top[2], 3]  # the prompt does not count for these penalties
    p = SamplingParams(temperature=0, presence_penalty=presence, frequency_penalty=frequency)
    ref = openai_penalties(logits[0], output, presence, frequency)
    got = process_logits(logits[0].clone(), p, prompt, output)
    torch.testing.assert_close(got, ref)
    assert ids(choose(logits, [p], [prompt], [output])) == [int(ref.argmax())]


def test_frequency_penalty_changes_the_greedy_choice():
    logits = rand_logits(1, seed=2)
    best = int(logits[0].argmax())
    p = SamplingParams(temperature=0, frequency_penalty=2.0)
    assert ids(choose(logits, [p], outputs=[[best] * 10])) != [best]
    assert ids(choose(logits, [p], prompts=[[best] * 10])) == [best]  # prompt tokens are not counted


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf_over_prompt_and_output(penalty):
    logits = rand_logits(1, seed=3)
    pos = (logits[0] > 0).nonzero()[:, 0].tolist()
    neg = (logits[0] < 0).nonzero()[:, 0].tolist()
    prompt, output = [pos[0], neg[0], pos[1], pos[0]], [neg[1], pos[2], neg[1]]  # both signs, both sources
    p = SamplingParams(temperature=0, repetition_penalty=penalty)
    hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone())[0]
    got = process_logits(logits[0].clone(), p, prompt, output)
    torch.testing.assert_close(got, hf)
    changed = (got != logits[0]).nonzero()[:, 0].tolist()
    assert sorted(changed) == sorted(set(prompt + output))
    assert ids(choose(logits, [p], [prompt], [output])) == [int(hf.argmax())]


def test_repetition_penalty_moves_greedy_off_a_prompt_token():
    logits = torch.tensor([[4.0, 3.0, -1.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert ids(choose(logits, [p], prompts=[[0]])) == [1]  # 4 / 2 = 2 < 3
    assert ids(choose(logits, [p], outputs=[[0]])) == [1]


def test_logit_bias_adds_and_forces_a_token():
    logits = rand_logits(1, seed=4)
    worst = int(logits[0].argmin())
    bias = {worst: 100.0, 5: -3.5, 9: 2.25}
    ref = logits[0].clone()
    for j, b in bias.items():
        ref[j] += b
    torch.testing.assert_close(process_logits(logits[0].clone(), SamplingParams(logit_bias=bias), [], []), ref)
    assert ids(choose(logits, [SamplingParams(temperature=0, logit_bias={worst: 100.0})])) == [worst]
    sampled = SamplingParams(temperature=1.0, seed=3, logit_bias={worst: 100.0})
    g = sampled.make_generator(CPU)
    draws = [ids(choose(logits, [sampled], gens=[g]))[0] for _ in range(50)]
    assert draws == [worst] * 50
    # without the bias the same seeded row does not always draw it
    plain = SamplingParams(temperature=1.0, seed=3)
    g = plain.make_generator(CPU)
    assert {ids(choose(logits, [plain], gens=[g]))[0] for _ in range(50)} != {worst}


def test_min_tokens_bans_eos_and_stop_ids_then_releases_them():
    logits = torch.tensor([[0.0, 1.0, 9.0, 2.0, 0.5, 0.0, 0.0, 8.0]])  # eos 2, stop id 7 are the favourites
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7])
    for n in range(3):
        out = [1] * n
        assert ids(choose(logits, [p], outputs=[out], eos={2})) == [3]
        x = process_logits(logits[0].clone(), p, [], out, {2})
        assert x[2] == float("-inf") and x[7] == float("-inf") and x[3] == 2.0
    assert ids(choose(logits, [p], outputs=[[1] * 3], eos={2})) == [2]
    assert ids(choose(logits, [p], outputs=[[1] * 3], eos={9})) == [2]  # unrelated eos id
    # sampled rows too: never an eos or stop id before min_tokens
    s = SamplingParams(temperature=1.0, seed=0, min_tokens=2, stop_token_ids=[7])
    g = s.make_generator(CPU)
    assert all(ids(choose(logits, [s], outputs=[[1]], eos={2}, gens=[g]))[0] not in (2, 7) for _ in range(50))
    # with ignore_eos the EOS id is an ordinary token and is not banned; stop ids still are
    q = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7], ignore_eos=True)
    assert ids(choose(logits, [q], eos={2})) == [2]
    q.logit_bias = {2: -50.0}
    assert ids(choose(logits, [q], eos={2})) == [3]


@pytest.mark.parametrize("k", [0, 5])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_raw_log_softmax(k, temperature):
    logits = rand_logits(3, seed=5).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=temperature, seed=1, logprobs=k),
        # penalties and bias change the choice, not the (raw) logprobs
        SamplingParams(temperature=temperature, seed=2, logprobs=k, frequency_penalty=2.0,
                       repetition_penalty=1.5, logit_bias={3: 5.0}),
        SamplingParams(temperature=temperature, seed=3),
    ]
    res = choose(logits, params, prompts=[[1, 2]] * 3, outputs=[[4, 4, 6]] * 3)
    ref = torch.log_softmax(logits.float(), dim=-1)
    for i in range(2):
        r = res[i]
        assert isinstance(r, TokenChoice)
        assert r.logprob == pytest.approx(float(ref[i, r.token_id]), abs=1e-6)
        vals, idx = torch.topk(ref[i], k)
        assert [t for t, _ in r.top_logprobs] == idx.tolist()
        assert [v for _, v in r.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-6)
        assert [v for _, v in r.top_logprobs] == sorted((v for _, v in r.top_logprobs), reverse=True)
        assert len(r.top_logprobs) == k
    assert res[2].logprob is None and res[2].top_logprobs == []


def test_logprobs_out_of_range_is_that_rows_error():
    logits = rand_logits(2, seed=6)
    res = choose(logits, [SamplingParams(temperature=0, logprobs=21), SamplingParams(temperature=0)])
    assert isinstance(res[0], GenerationError) and "logprobs" in res[0].message
    assert res[1] == TokenChoice(int(logits[1].argmax()))


MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.9, seed=11),
    SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5),
    SamplingParams(temperature=1.2, seed=12, top_k=8, top_p=0.9, repetition_penalty=1.4, logit_bias={0: 4.0}),
    SamplingParams(temperature=0.7, seed=13, logprobs=3, min_tokens=4, stop_token_ids=[5]),
    SamplingParams(temperature=0, logprobs=0, repetition_penalty=0.8),
]


def decode(params, steps=6, seed=7):
    """A few steps of decoding: each row's tokens feed its history; returns each row's choices."""
    gens = [p.make_generator(CPU) for p in params]
    prompts = [[(3 * r + j) % V for j in range(5)] for r in range(len(params))]
    outs: list[list[int]] = [[] for _ in params]
    hist: list[list[TokenChoice]] = [[] for _ in params]
    for step in range(steps):
        logits = rand_logits(8, seed=seed + step)[: len(params)]  # row r's logits do not depend on the batch
        res = choose_tokens(logits, params, gens, prompts, outs, frozenset({1}))
        for r, c in enumerate(res):
            assert isinstance(c, TokenChoice), c
            outs[r].append(c.token_id)
            hist[r].append(c)
    return hist


def test_mixed_batch_rows_match_each_row_alone():
    together = decode(MIXED)
    for r, p in enumerate(MIXED):
        gen = p.make_generator(CPU)
        prompt = [(3 * r + j) % V for j in range(5)]
        out: list[int] = []
        for step, want in enumerate(together[r]):
            row = rand_logits(8, seed=7 + step)[r : r + 1]
            (got,) = choose_tokens(row, [p], [gen], [prompt], [out], frozenset({1}))
            assert isinstance(got, TokenChoice)
            assert got.token_id == want.token_id
            assert (got.logprob is None) == (want.logprob is None)
            if got.logprob is not None:
                assert got.logprob == pytest.approx(want.logprob, abs=1e-6)
                assert [t for t, _ in got.top_logprobs] == [t for t, _ in want.top_logprobs]
                assert [v for _, v in got.top_logprobs] == pytest.approx([v for _, v in want.top_logprobs], abs=1e-6)
            out.append(got.token_id)


def test_seeded_sampling_with_penalties_is_reproducible():
    params = [SamplingParams(temperature=1.0, seed=5, presence_penalty=0.8, frequency_penalty=0.6,
                             repetition_penalty=1.2, logit_bias={2: 1.0}, min_tokens=2, stop_token_ids=[4])]
    a = [c.token_id for c in decode(params, steps=20)[0]]
    b = [c.token_id for c in decode(params, steps=20)[0]]
    c = [c.token_id for c in decode(params + [SamplingParams(temperature=1.0)], steps=20)[0]]
    assert a == b == c
    assert len(set(a)) > 3  # really sampled


def test_bad_rows_get_an_error_and_the_others_their_tokens():
    logits = rand_logits(7, seed=8)
    logits[1, 4] = float("nan")
    logits[2] = float("-inf")  # no finite entry
    logits[3, 6] = float("inf")
    logits[4] = float("-inf")
    logits[4, 9] = 1.0  # the only finite entry, then biased away
    params = [
        SamplingParams(temperature=0, frequency_penalty=1.0),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logit_bias={9: float("-inf")}),
        SamplingParams(temperature=0.8, seed=2, logprobs=2),
        SamplingParams(temperature=0, logit_bias={V + 3: 1.0}),  # not in the vocabulary
    ]
    outputs = [[0, 0], [], [], [], [], [1], []]
    clean = logits.clone()
    res = choose(logits, params, outputs=outputs)
    torch.testing.assert_close(logits, clean, equal_nan=True)  # the caller's logits are not modified
    for i in (1, 2, 3, 4, 6):
        assert isinstance(res[i], GenerationError), (i, res[i])
    assert "non-finite" in res[1].message and "non-finite" in res[4].message and "vocabulary" in res[6].message
    for i in (0, 5):
        alone = choose(logits[i : i + 1], [params[i]], outputs=[outputs[i]])
        assert res[i] == alone[0] and isinstance(alone[0], TokenChoice)
    assert res[0].token_id == int(openai_penalties(logits[0], [0, 0], 0.0, 1.0).argmax())


def test_a_sampling_failure_is_that_rows_error():
    logits = rand_logits(2, seed=9)
    res = choose_tokens(logits, [SamplingParams(temperature=1.0), SamplingParams(temperature=0)],
                        ["not a generator", None], [[], []], [[], []])
    assert isinstance(res[0], GenerationError) and "sampling failed" in res[0].message
    assert res[1] == TokenChoice(int(logits[1].argmax()))


def test_overflowing_temperature_still_samples_the_top_token():
    logits = torch.tensor([[3e38, 1e38, 0.0]])
    p = SamplingParams(temperature=1e-6, seed=0)
    assert ids(choose(logits, [p])) == [0]


def test_tiny_top_p_keeps_the_top_token():
    """A top_p that rounds to 0 in float32 (5e-324) still keeps the most likely token: never an all -inf row."""
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    out = filter_logits(logits, 1.0, 0, 5e-324)
    assert torch.isfinite(out).tolist() == [False, True, False, False]
