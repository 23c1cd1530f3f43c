"""The meeting-room answer as a sweep-line trace a small model can copy, and its strict parser.

A 135M model does not learn the meeting-room task from a free-text explanation
(45% on a yes/no question, see ``adapters/meeting-scheduler/eval_report.md``).
This module writes the completion as the sweep line itself, one short line per
step, so every token the model emits follows from the question and the lines
before it by one local operation (find the next event, add or subtract one,
keep the larger of two numbers, compare two numbers)::

    Rooms: 2. Sweep, an end before a start at the same time:
    08:00 start 2: 1
    09:00 start 1: 2
    09:30 end 2: 1
    10:00 start 3: 2
    10:00 start 4: 3 > 2
    Answer: no

* the first line copies the number of rooms from the question;
* events are sorted by time, an end before a start at the same time (meetings
  are half-open ``[start, end)``, so touching meetings do not overlap), then by
  meeting number; each line names the meeting (``start 3``: the model can see
  which events it has already written) and the running count of meetings in
  progress;
* the first time the count exceeds the rooms, that line ends with
  ``> ROOMS`` and the sweep stops (answer no: the count never has to be
  compared with anything but the one number in the first line); when every
  event passes, a line ``Never more than ROOMS at once`` follows (answer yes);
* the last line is ``Answer: yes`` or ``Answer: no``.

:func:`parse_final_answer` is the strict parser used to score traces: only the
last non-blank line counts, and it must be exactly ``Answer: yes`` or
``Answer: no`` (surrounding spaces ignored, nothing else). Anything else is
unparsable and scored wrong, so a model gets no credit for a ``yes`` that
happens to appear somewhere in its text.

What this module does not do: generate problems, compute the ground truth
(:mod:`training.tasks.scheduling` does both), tokenize or train.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from training.tasks.scheduling import Problem

_FINAL = re.compile(r"Answer: (yes|no)")
_EVENT = re.compile(r"(\d\d:\d\d) (start|end) (\d+): (\d+)( > \d+)?")


def _hhmm(t: int) -> str:
    """Minutes since midnight as ``HH:MM`` (the question's format)."""
    return f"{t // 60:02d}:{t % 60:02d}"


def events(problem: Problem) -> list[tuple[int, str, int]]:
    """The sweep's events ``(minutes, "start"|"end", meeting number 1-based)`` in trace order.

    Order: time, then ends before starts (half-open intervals), then meeting number.
    """
    ev = [(s, "start", i) for i, (s, _) in enumerate(problem.meetings, 1)]
    ev += [(e, "end", i) for i, (_, e) in enumerate(problem.meetings, 1)]
    return sorted(ev, key=lambda x: (x[0], x[1] == "start", x[2]))


def trace_answer(problem: Problem) -> str:
    """The completion for ``problem``: rooms line, event lines up to the first overflow, verdict, ``Answer: yes|no``.

    The count goes above ``problem.rooms`` exactly when ``problem.max_overlap >
    problem.rooms`` (same sweep as :func:`training.tasks.scheduling.max_concurrent`).
    About 12 tokens per event line with the SmolLM2 tokenizer (digits are single
    tokens); at most ``2 * len(problem.meetings) + 3`` lines.
    """
    rooms = problem.rooms
    lines = [f"Rooms: {rooms}. Sweep, an end before a start at the same time:"]
    count = 0
    for t, kind, k in events(problem):
        count += 1 if kind == "start" else -1
        if count > rooms:
            lines.append(f"{_hhmm(t)} {kind} {k}: {count} > {rooms}")
            lines.append("Answer: no")
            return "\n".join(lines)
        lines.append(f"{_hhmm(t)} {kind} {k}: {count}")
    lines.append(f"Never more than {rooms} at once")
    lines.append("Answer: yes")
    return "\n".join(lines)


def to_trace_sft_rows(problems: Iterable[Problem]) -> list[dict]:
    """Chat rows for SFT: ``{"messages": [user question, assistant sweep trace]}``."""
    return [
        {"messages": [{"role": "user", "content": p.question()}, {"role": "assistant", "content": trace_answer(p)}]}
        for p in problems
    ]


def parse_final_answer(text: str) -> bool | None:
    """Strict: True / False when the last non-blank line is exactly ``Answer: yes`` / ``Answer: no``, else None.

    Leading and trailing whitespace of that line is ignored; case, markdown,
    punctuation and any other words are not (``answer: Yes``, ``**Answer:** yes``
    and ``Answer: yes.`` are all None). Earlier lines are never read.
    """
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return None
    m = _FINAL.fullmatch(lines[-1])
    return None if m is None else m.group(1) == "yes"


def trace_errors(text: str, problem: Problem) -> dict:
    """Where a model's trace departs from the true one: a diagnosis for reports, not a score.

    Returns ``{"first_wrong_line": int | None, "events_ok": bool}``: the 0-based
    index (among event lines) of the first line that differs from
    :func:`trace_answer`'s, None when every event line matches and none is
    missing or extra.
    """
    want = [ln for ln in trace_answer(problem).splitlines() if _EVENT.fullmatch(ln)]
    got = [ln.strip() for ln in text.splitlines() if _EVENT.fullmatch(ln.strip())]
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is None and len(got) != len(want):
        first = min(len(got), len(want))
    return {"first_wrong_line": first, "events_ok": first is None}
