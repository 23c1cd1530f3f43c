"""Meeting-room scheduling: a synthetic yes/no reasoning task with an exact ground truth.

A problem is a list of meetings ``(start, end)`` and a number of rooms; the
question is whether every meeting can get a room, a room holding one meeting at a
time. Meetings are half-open intervals ``[start, end)``: a meeting ending at
10:00 and one starting at 10:00 do not overlap and can share a room. The answer
is yes exactly when the largest number of meetings in progress at once
(:func:`max_concurrent`, a sweep line) is at most the number of rooms.

What this module does:

* generates reproducible problems (:func:`generate`) in three difficulties, with
  yes/no answers balanced roughly 50/50 and, for ``hard``, touching endpoints
  and near-capacity cases (rooms equal to the peak overlap or one less);
* renders a question and a short worked answer ending in ``Answer: yes|no``;
* converts problems to SFT rows (chat ``messages``) and eval rows, writes JSONL;
* parses a model's free-text answer (:func:`parse_answer`) and scores a batch of
  answers (:func:`evaluate`);
* offers an independent exact check by backtracking
  (:func:`brute_force_feasible`), exponential in the worst case and meant for
  tests on small problems.

What it does not do: load models, generate answers, tokenize, or provide a CLI.
Times of generated problems are minutes since midnight on a 30-minute grid
between 08:00 and 18:00; :func:`max_concurrent` and
:func:`brute_force_feasible` accept any integer unit (hours work too).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

Meeting = tuple[int, int]

DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")

#: Number of meetings per difficulty, inclusive bounds.
SIZES: dict[str, tuple[int, int]] = {"easy": (3, 4), "medium": (5, 7), "hard": (8, 12)}

DAY_START = 8 * 60  #: 08:00, earliest start of a generated meeting (minutes since midnight).
DAY_END = 18 * 60  #: 18:00, latest end of a generated meeting.
GRID = 30  #: generated times are multiples of this many minutes.
MAX_ROOMS = 4  #: generated problems have 1..MAX_ROOMS rooms.
_MAX_DURATION = {"easy": 120, "medium": 120, "hard": 150}
_MAX_ATTEMPTS = 10_000


def _check_meetings(meetings: Iterable[Sequence[int]]) -> tuple[Meeting, ...]:
    """Return the meetings as a tuple of ``(start, end)`` int pairs; ValueError unless ``start < end``."""
    out = []
    for m in meetings:
        start, end = m
        if int(start) != start or int(end) != end:
            raise ValueError(f"meeting times must be integers, got {m!r}")
        if not start < end:
            raise ValueError(f"a meeting must end after it starts, got {m!r}")
        out.append((int(start), int(end)))
    return tuple(out)


def max_concurrent(meetings: Iterable[Sequence[int]]) -> int:
    """Largest number of half-open meetings ``[start, end)`` in progress at the same time.

    Sweep line, O(n log n): sort the start (+1) and end (-1) events by time, an
    end before a start at equal times (so touching meetings do not overlap), and
    track the running count. Returns 0 for no meetings; ValueError for a meeting
    with ``end <= start``.
    """
    events: list[tuple[int, int]] = []
    for start, end in _check_meetings(meetings):
        events.append((start, 1))
        events.append((end, -1))
    events.sort()  # (t, -1) sorts before (t, +1): ends first.
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def brute_force_feasible(meetings: Iterable[Sequence[int]], rooms: int) -> bool:
    """Whether the meetings fit in ``rooms`` rooms, by backtracking over room assignments.

    Independent of the sweep line: takes the meetings in the given order, tries
    each room for each meeting and checks that no two meetings in one room
    overlap (half-open intervals). Empty rooms are interchangeable, so only the
    first empty room is tried. Exact but exponential in the worst case: meant
    for small problems (tests), not for generation.
    """
    ms = _check_meetings(meetings)
    if not ms:
        return True
    if rooms < 1:
        return False
    assigned: list[list[Meeting]] = [[] for _ in range(rooms)]

    def fits(room: list[Meeting], m: Meeting) -> bool:
        return all(not (m[0] < other[1] and other[0] < m[1]) for other in room)

    def place(i: int) -> bool:
        if i == len(ms):
            return True
        tried_empty = False
        for room in assigned:
            if not room:
                if tried_empty:
                    continue
                tried_empty = True
            if fits(room, ms[i]):
                room.append(ms[i])
                if place(i + 1):
                    return True
                room.pop()
        return False

    return place(0)


def _fmt_time(t: int) -> str:
    """Minutes since midnight as ``HH:MM``."""
    h, m = divmod(t, 60)
    return f"{h:02d}:{m:02d}"


def _join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _peak(meetings: Sequence[Meeting]) -> tuple[int, list[int]]:
    """First time the overlap is largest, and the 1-based numbers of the meetings in progress then."""
    best_count, best_t = -1, meetings[0][0]
    for t in sorted({s for s, _ in meetings}):  # the count only rises at a start
        count = sum(1 for s, e in meetings if s <= t < e)
        if count > best_count:
            best_count, best_t = count, t
    active = [i + 1 for i, (s, e) in enumerate(meetings) if s <= best_t < e]
    return best_t, active


def _touching_pairs(meetings: Sequence[Meeting]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` (0-based) where meeting ``j`` starts exactly when meeting ``i`` ends."""
    return [
        (i, j) for i, a in enumerate(meetings) for j, b in enumerate(meetings) if i != j and b[0] == a[1]
    ]


@dataclass(frozen=True)
class Problem:
    """One scheduling problem: meetings (minutes since midnight, ``[start, end)``) and a room count.

    ``answer`` (can all meetings be scheduled?) and ``max_overlap`` are the ground
    truth; they are checked against the meetings at construction (ValueError if
    inconsistent). :meth:`from_meetings` computes them.
    """

    meetings: tuple[tuple[int, int], ...]
    rooms: int
    difficulty: str
    answer: bool
    max_overlap: int

    def __post_init__(self) -> None:
        meetings = _check_meetings(self.meetings)
        if not meetings:
            raise ValueError("a problem needs at least one meeting")
        if self.rooms < 1:
            raise ValueError(f"rooms must be >= 1, got {self.rooms}")
        object.__setattr__(self, "meetings", meetings)
        peak = max_concurrent(meetings)
        if self.max_overlap != peak:
            raise ValueError(f"max_overlap={self.max_overlap} but the meetings overlap at most {peak} at once")
        if self.answer != (peak <= self.rooms):
            raise ValueError(f"answer={self.answer} contradicts max_overlap={peak}, rooms={self.rooms}")

    @classmethod
    def from_meetings(cls, meetings: Iterable[Sequence[int]], rooms: int, difficulty: str = "custom") -> Problem:
        """Build a problem, computing ``max_overlap`` and ``answer`` from the meetings."""
        ms = _check_meetings(meetings)
        peak = max_concurrent(ms)
        return cls(meetings=ms, rooms=rooms, difficulty=difficulty, answer=peak <= rooms, max_overlap=peak)

    def question(self) -> str:
        """The problem in natural language, one ``Meeting k: HH:MM-HH:MM`` line per meeting, asking for yes or no."""
        lines = [f"Meeting {i}: {_fmt_time(s)}-{_fmt_time(e)}" for i, (s, e) in enumerate(self.meetings, 1)]
        rooms = f"{self.rooms} room" if self.rooms == 1 else f"{self.rooms} rooms"
        return (
            f"There are {len(self.meetings)} meetings today:\n"
            + "\n".join(lines)
            + f"\nThere {'is' if self.rooms == 1 else 'are'} {rooms}, and each room holds one meeting at a time. "
            "A meeting runs from its start time up to its end time, so a meeting that ends at 10:00 and one "
            "that starts at 10:00 can use the same room.\n"
            "Can all meetings be scheduled? Answer yes or no."
        )

    def worked_answer(self) -> str:
        """A short worked answer (2-4 sentences) ending with the line ``Answer: yes`` or ``Answer: no``."""
        t, active = _peak(self.meetings)
        names = _join([str(k) for k in active])
        label = "Meeting" if len(active) == 1 else "Meetings"
        parts = ["Sort the start and end times; when one meeting ends exactly as another starts, they do not overlap."]
        # Mention a touching pair, preferably one at the peak time (where counting it as an overlap would mislead).
        touching = sorted(_touching_pairs(self.meetings), key=lambda ij: self.meetings[ij[0]][1] != t)
        if touching:
            i, j = touching[0]
            parts.append(
                f"For example, Meeting {i + 1} ends at {_fmt_time(self.meetings[i][1])} "
                f"just as Meeting {j + 1} starts, so they can share a room."
            )
        peak = self.max_overlap
        parts.append(
            f"The most meetings in progress at once is {peak}, at {_fmt_time(t)} ({label} {names}), "
            f"and there {'is' if self.rooms == 1 else 'are'} {self.rooms} room{'' if self.rooms == 1 else 's'}."
        )
        if self.answer:
            parts.append("That is no more than the number of rooms, so every meeting can get a room.")
        else:
            parts.append("That is more than the number of rooms, so not every meeting can get a room.")
        return " ".join(parts) + f"\nAnswer: {'yes' if self.answer else 'no'}"


def _random_meeting(rng: random.Random, max_duration: int) -> Meeting:
    """A meeting on the grid inside [DAY_START, DAY_END], 30 to ``max_duration`` minutes long."""
    start = rng.randrange(DAY_START, DAY_END, GRID)
    longest = min(max_duration, DAY_END - start)
    duration = rng.randrange(GRID, longest + 1, GRID)
    return start, start + duration


def _candidate(rng: random.Random, difficulty: str) -> tuple[Meeting, ...]:
    """Random meetings for one difficulty; hard ones get 1-3 follow-on meetings touching an earlier one."""
    lo, hi = SIZES[difficulty]
    n = rng.randint(lo, hi)
    max_duration = _MAX_DURATION[difficulty]
    if difficulty != "hard":
        return tuple(_random_meeting(rng, max_duration) for _ in range(n))
    followers = rng.randint(1, 3)
    meetings = [_random_meeting(rng, max_duration) for _ in range(n - followers)]
    for _ in range(followers):
        candidates = [m for m in meetings if m[1] < DAY_END]
        if not candidates:
            meetings.append(_random_meeting(rng, max_duration))
            continue
        start = rng.choice(candidates)[1]
        longest = min(max_duration, DAY_END - start)
        meetings.append((start, start + rng.randrange(GRID, longest + 1, GRID)))
    rng.shuffle(meetings)
    return tuple(meetings)


def _closed_overlap(meetings: Sequence[Meeting]) -> int:
    """Peak overlap if touching meetings were (wrongly) counted as overlapping."""
    events = sorted([(s, 0) for s, _ in meetings] + [(e, 1) for _, e in meetings])  # starts first
    best = current = 0
    for _, kind in events:
        current += 1 if kind == 0 else -1
        best = max(best, current)
    return best


def _make_problem(rng: random.Random, difficulty: str) -> Problem:
    """One problem with a randomly drawn target answer; rooms = peak (yes) or peak - 1 (no), within 1..MAX_ROOMS."""
    want_yes = rng.random() < 0.5
    prefer_trap = difficulty == "hard" and want_yes and rng.random() < 0.75
    for attempt in range(_MAX_ATTEMPTS):
        meetings = _candidate(rng, difficulty)
        peak = max_concurrent(meetings)
        rooms = peak if want_yes else peak - 1
        if not 1 <= rooms <= MAX_ROOMS:
            continue
        if difficulty == "hard":
            if not _touching_pairs(meetings):
                continue
            # Mostly traps for yes: the answer would flip to no if touching meetings were counted as overlapping.
            if prefer_trap and attempt < 200 and _closed_overlap(meetings) <= peak:
                continue
        return Problem(meetings=meetings, rooms=rooms, difficulty=difficulty, answer=want_yes, max_overlap=peak)
    raise RuntimeError(f"could not generate a {difficulty} problem in {_MAX_ATTEMPTS} attempts")


def generate(n: int, seed: int, difficulties: Sequence[str] = DIFFICULTIES) -> list[Problem]:
    """``n`` problems, reproducible for a given ``seed`` (a private ``random.Random``, no global state).

    Difficulties cycle in the given order (problem ``i`` has
    ``difficulties[i % len(difficulties)]``). easy: 3-4 meetings; medium: 5-7;
    hard: 8-12, always with at least one meeting starting exactly when another
    ends (about three quarters of hard yes-problems would turn into no if
    touching meetings were wrongly counted as overlapping). Times lie on a
    30-minute grid between 08:00 and 18:00; rooms are 1-4 and equal the peak
    overlap (answer yes) or one less (answer no), drawn 50/50.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not difficulties:
        raise ValueError("difficulties must not be empty")
    unknown = [d for d in difficulties if d not in SIZES]
    if unknown:
        raise ValueError(f"unknown difficulties {unknown}; choose from {list(SIZES)}")
    rng = random.Random(seed)
    problems = [_make_problem(rng, difficulties[i % len(difficulties)]) for i in range(n)]
    logger.debug(
        "generated %d scheduling problems (seed=%d, %d yes)", len(problems), seed, sum(p.answer for p in problems)
    )
    return problems


def to_sft_rows(problems: Iterable[Problem]) -> list[dict]:
    """Chat rows for supervised fine-tuning: ``{"messages": [user question, assistant worked answer]}``."""
    return [
        {
            "messages": [
                {"role": "user", "content": p.question()},
                {"role": "assistant", "content": p.worked_answer()},
            ]
        }
        for p in problems
    ]


def to_eval_rows(problems: Iterable[Problem]) -> list[dict]:
    """Eval rows: ``{"prompt": question, "answer": "yes"|"no", "difficulty": ...}``."""
    return [
        {"prompt": p.question(), "answer": "yes" if p.answer else "no", "difficulty": p.difficulty}
        for p in problems
    ]


_ANSWER_LINE = re.compile(r"\banswer\s*\**\s*[:\uff1a]\s*\**\s*(yes|no)\b", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_answer(text: str) -> bool | None:
    """Read a yes/no from a model's free-text answer: True for yes, False for no, None if there is none.

    The last ``Answer: yes|no`` (any case, markdown bold allowed) wins; otherwise
    the last standalone word ``yes`` or ``no``.
    """
    if not text:
        return None
    matches = _ANSWER_LINE.findall(text) or _YES_NO.findall(text)
    if not matches:
        return None
    return matches[-1].lower() == "yes"


def evaluate(answers: Sequence[str], problems: Sequence[Problem]) -> dict:
    """Score model answers against problems (same order); unparsable answers count as wrong.

    Returns ``{"n", "accuracy", "unparsable", "by_difficulty": {d: {"n", "accuracy"}}}``,
    fractions in [0, 1] (0.0 when there are no problems); difficulties appear in
    order of first occurrence.
    """
    if len(answers) != len(problems):
        raise ValueError(f"{len(answers)} answers for {len(problems)} problems")
    correct = unparsable = 0
    per: dict[str, list[int]] = {}
    for text, problem in zip(answers, problems):
        parsed = parse_answer(text)
        ok = parsed is not None and parsed == problem.answer
        unparsable += parsed is None
        correct += ok
        stats = per.setdefault(problem.difficulty, [0, 0])
        stats[0] += 1
        stats[1] += ok
    n = len(problems)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "unparsable": unparsable / n if n else 0.0,
        "by_difficulty": {d: {"n": total, "accuracy": good / total} for d, (total, good) in per.items()},
    }


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write rows as JSON lines (UTF-8), creating parent folders; returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
