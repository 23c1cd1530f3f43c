"""Meeting-room scheduling task: ground truth, generator, answer parsing and scoring."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from training.tasks.scheduling import (
    DAY_END,
    DAY_START,
    GRID,
    SIZES,
    Problem,
    brute_force_feasible,
    evaluate,
    generate,
    max_concurrent,
    parse_answer,
    to_eval_rows,
    to_sft_rows,
    write_jsonl,
)


def _random_cases(n: int, seed: int) -> list[tuple[list[tuple[int, int]], int]]:
    """Random small cases on a coarse grid (0..12), so touching endpoints and ties are frequent."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        meetings = []
        for _ in range(rng.randint(1, 9)):
            if meetings and rng.random() < 0.3:  # start exactly when an earlier meeting ends
                start = rng.choice(meetings)[1]
            else:
                start = rng.randint(0, 11)
            meetings.append((start, start + rng.randint(1, 4)))
        cases.append((meetings, rng.randint(1, 4)))
    return cases


def _touches(meetings) -> bool:
    return any(b[0] == a[1] for a in meetings for b in meetings if a is not b)


def _closed_sweep(meetings) -> int:
    """A wrong sweep (starts before ends at equal times): counts touching meetings as overlapping."""
    events = sorted([(s, 0) for s, _ in meetings] + [(e, 1) for _, e in meetings])
    best = cur = 0
    for _, kind in events:
        cur += 1 if kind == 0 else -1
        best = max(best, cur)
    return best


# --- ground truth -------------------------------------------------------------------------------


def test_sweep_line_agrees_with_brute_force_on_500_random_cases():
    cases = _random_cases(500, seed=1234)
    assert sum(_touches(m) for m, _ in cases) > 150  # the set really exercises touching endpoints
    answers = Counter()
    for meetings, rooms in cases:
        truth = brute_force_feasible(meetings, rooms)
        assert (max_concurrent(meetings) <= rooms) == truth, (meetings, rooms)
        answers[truth] += 1
    assert answers[True] > 50 and answers[False] > 50


def test_random_cases_would_catch_a_sweep_that_counts_touching_as_overlap():
    # The comparison above is discriminating: a closed-interval sweep disagrees with brute force somewhere.
    cases = _random_cases(500, seed=1234)
    wrong = [(m, r) for m, r in cases if (_closed_sweep(m) <= r) != brute_force_feasible(m, r)]
    assert len(wrong) > 10


def test_hand_cases():
    assert brute_force_feasible([(9, 10), (10, 11)], 1) is True
    assert max_concurrent([(9, 10), (10, 11)]) == 1
    assert brute_force_feasible([(9, 11), (10, 12)], 1) is False
    assert max_concurrent([(9, 11), (10, 12)]) == 2
    assert brute_force_feasible([(9, 11), (10, 12)], 2) is True
    # Three meetings overlap pairwise only at different times: peak 2, not 3.
    assert max_concurrent([(1, 3), (2, 5), (4, 6)]) == 2
    assert brute_force_feasible([(1, 3), (2, 5), (4, 6)], 2) is True
    # Brute force must backtrack: greedy in the given order puts (1,2) and (3,4) in room 1, then fails.
    assert brute_force_feasible([(1, 2), (3, 4), (1, 4), (2, 3)], 2) is True
    assert max_concurrent([]) == 0
    assert brute_force_feasible([], 1) is True


@pytest.mark.parametrize("bad", [[(10, 10)], [(11, 10)]])
def test_meetings_must_end_after_they_start(bad):
    with pytest.raises(ValueError):
        max_concurrent(bad)
    with pytest.raises(ValueError):
        brute_force_feasible(bad, 1)


def test_problem_rejects_inconsistent_ground_truth():
    p = Problem.from_meetings([(540, 600), (600, 660)], rooms=1)
    assert p.answer is True and p.max_overlap == 1
    with pytest.raises(ValueError):
        Problem(meetings=((540, 660), (600, 720)), rooms=1, difficulty="easy", answer=True, max_overlap=2)
    with pytest.raises(ValueError):
        Problem(meetings=((540, 660), (600, 720)), rooms=2, difficulty="easy", answer=True, max_overlap=1)


# --- generator ----------------------------------------------------------------------------------


def test_generate_is_reproducible_and_seed_dependent():
    a, b, c = generate(60, seed=7), generate(60, seed=7), generate(60, seed=8)
    assert a == b
    assert a != c
    state = random.getstate()
    generate(10, seed=1)
    assert random.getstate() == state  # no global random state used


def test_generate_sizes_grid_rooms_and_difficulty_cycle():
    problems = generate(90, seed=3)
    assert [p.difficulty for p in problems[:6]] == ["easy", "medium", "hard"] * 2
    assert Counter(p.difficulty for p in problems) == {"easy": 30, "medium": 30, "hard": 30}
    for p in problems:
        lo, hi = SIZES[p.difficulty]
        assert lo <= len(p.meetings) <= hi
        assert 1 <= p.rooms <= 4
        for s, e in p.meetings:
            assert DAY_START <= s < e <= DAY_END
            assert s % GRID == 0 and e % GRID == 0
        assert p.max_overlap == max_concurrent(p.meetings)
        assert p.answer == brute_force_feasible(p.meetings, p.rooms)
        assert p.max_overlap in (p.rooms, p.rooms + 1)  # near capacity
    assert [p.difficulty for p in generate(4, seed=0, difficulties=("hard",))] == ["hard"] * 4
    with pytest.raises(ValueError):
        generate(3, seed=0, difficulties=("impossible",))


def test_hard_problems_have_touching_endpoints():
    hard = [p for p in generate(150, seed=11) if p.difficulty == "hard"]
    assert sum(_touches(p.meetings) for p in hard) >= 0.9 * len(hard)
    # Touching matters: for many hard yes-problems a closed-interval count would say no.
    traps = [p for p in hard if p.answer and _closed_sweep(p.meetings) > p.rooms]
    assert len(traps) >= 0.3 * sum(p.answer for p in hard)


def test_yes_no_balance():
    problems = generate(300, seed=5)
    assert 0.35 <= sum(p.answer for p in problems) / len(problems) <= 0.65
    for d in ("easy", "medium", "hard"):
        sub = [p for p in problems if p.difficulty == d]
        assert 0.3 <= sum(p.answer for p in sub) / len(sub) <= 0.7, d


# --- rendering and rows -------------------------------------------------------------------------


def test_question_format():
    p = Problem.from_meetings([(540, 630), (600, 660)], rooms=1, difficulty="easy")
    q = p.question()
    assert "Meeting 1: 09:00-10:30" in q and "Meeting 2: 10:00-11:00" in q
    assert "1 room" in q
    assert q.endswith("Can all meetings be scheduled? Answer yes or no.")


def test_worked_answer_parses_back_to_ground_truth():
    problems = generate(200, seed=21)
    for p in problems:
        w = p.worked_answer()
        assert parse_answer(w) is p.answer
        assert w.splitlines()[-1] == ("Answer: yes" if p.answer else "Answer: no")
        assert str(p.max_overlap) in w


def test_worked_answer_names_the_peak():
    p = Problem.from_meetings([(540, 660), (600, 720), (660, 720), (570, 630)], rooms=2, difficulty="easy")
    w = p.worked_answer()
    assert "is 3, at 10:00 (Meetings 1, 2 and 4)" in w
    assert "Meeting 1 ends at 11:00 just as Meeting 3 starts" in w
    assert w.endswith("\nAnswer: no")


def test_rows_and_write_jsonl(tmp_path):
    problems = generate(6, seed=2)
    sft = to_sft_rows(problems)
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant"]
    assert sft[0]["messages"][0]["content"] == problems[0].question()
    assert sft[0]["messages"][1]["content"] == problems[0].worked_answer()
    ev = to_eval_rows(problems)
    assert ev[0] == {
        "prompt": problems[0].question(),
        "answer": "yes" if problems[0].answer else "no",
        "difficulty": "easy",
    }
    path = tmp_path / "sub" / "eval.jsonl"
    assert write_jsonl(ev, path) == 6
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == ev


# --- parsing and scoring ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: No", False),
        ("answer: yes", True),
        ("yes.", True),
        ("No", False),
        ("I think the answer is no", False),
        ("Yes, at first glance... but no, two meetings overlap.", False),
        ("Three meetings overlap, so no.\nAnswer: no", False),
        ("No wait, they touch, so one room is enough.\nAnswer: yes", True),
        ("**Answer:** Yes", True),
        ("Answer: yes\nThere is no overlap.", True),  # the Answer line wins over a later 'no'
        ("Not enough information to know.", None),
        ("", None),
        ("The meetings fit nowhere; yesterday's schedule is unknown.", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) is expected


def test_evaluate_small_example():
    yes = Problem.from_meetings([(540, 600), (600, 660)], rooms=1, difficulty="easy")
    no = Problem.from_meetings([(540, 660), (600, 720)], rooms=1, difficulty="hard")
    problems = [yes, no, yes, no]
    answers = ["Answer: yes", "Answer: yes", "I can't tell", "so no"]
    result = evaluate(answers, problems)
    assert result == {
        "n": 4,
        "accuracy": 0.5,
        "unparsable": 0.25,
        "by_difficulty": {"easy": {"n": 2, "accuracy": 0.5}, "hard": {"n": 2, "accuracy": 0.5}},
    }
    with pytest.raises(ValueError):
        evaluate(["yes"], problems)
    assert evaluate([], [])["n"] == 0
