"""Sampling filters: top-k and top-p keep exactly the tokens they should."""

from __future__ import annotations

import math

import torch

from app.engine.sampling import SamplingParams, choose_tokens, filter_logits


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
    assert choose_tokens(rows, [SamplingParams(temperature=0)] * 2, [None, None]) == [1, 0]


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    p = SamplingParams(temperature=1.0, seed=7)
    a = [choose_tokens(logits, [p], [g])[0] for g in [p.make_generator(torch.device("cpu"))] for _ in range(400)]
    b = [choose_tokens(logits, [p], [g])[0] for g in [p.make_generator(torch.device("cpu"))] for _ in range(400)]
    assert a == b
    assert 0.68 < sum(a) / len(a) < 0.82
