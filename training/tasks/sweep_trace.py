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

A second style, :func:`grid_answer` (``--style grid``), needs no sorting at
all: it walks the half-hour grid 08:00, 08:30, ..., 17:30 (every time a
generated meeting can start) and, at each time, lists the meetings that end
there and then those that start there, each with the running count::

    Rooms: 2. Each half hour, ends before starts:
    08:00 start 2: 1
    08:30: 1
    09:00 start 1: 2
    09:30 end 2: 1
    10:00 start 3: 2, start 4: 3 > 2
    Answer: no

The times come in a fixed order the model can count through; what it must do
at each line is find the exact string ``-10:00`` / ``10:00-`` in the
question (an exact-match lookup, which small transformers do well) and add or
subtract one. The price is length: every grid time gets a line (up to 20).

What this module does not do: generate problems, compute the ground truth
(:mod:`training.tasks.scheduling` does both), tokenize or train.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from training.tasks.scheduling import DAY_END, DAY_START, GRID, Problem

_FINAL = re.compile(r"Answer: (yes|no)")
_EVENT = re.compile(r"(\d\d:\d\d) (start|end) (\d+): (\d+)( > \d+)?")
_STEP = r"(?:end|start) \d+: \d+(?: > \d+)?"
_GRID_LINE = re.compile(rf"\d\d:\d\d(?:: \d+| {_STEP}(?:, {_STEP})*)")


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


def grid_answer(problem: Problem) -> str:
    """The ``grid`` completion: rooms line, one line per half hour 08:00-17:30 up to the first overflow, verdict.

    A line is ``HH:MM: COUNT`` when nothing starts or ends then, else ``HH:MM``
    followed by ``end K: COUNT`` for each meeting ending then and ``start K: COUNT``
    for each one starting (ends first, each group by meeting number, joined by
    ``, ``), the count updated after each. The first start that takes the count
    above the rooms gets `` > ROOMS`` and ends the trace (``Answer: no``);
    otherwise ``Never more than ROOMS at once`` and ``Answer: yes`` follow the
    17:30 line (ends at 18:00 cannot raise the count). Times are assumed on the
    generator's 30-minute grid (:data:`training.tasks.scheduling.GRID`).

    Raises:
        ValueError: a meeting starts off the grid or outside 08:00-17:30.
    """
    slots = range(DAY_START, DAY_END, GRID)
    if any(s not in slots for s, _ in problem.meetings):
        raise ValueError("grid traces need every meeting to start on the 30-minute grid between 08:00 and 17:30")
    rooms, count = problem.rooms, 0
    lines = [f"Rooms: {rooms}. Each half hour, ends before starts:"]
    for t in slots:
        ends = [i for i, (_, e) in enumerate(problem.meetings, 1) if e == t]
        starts = [i for i, (s, _) in enumerate(problem.meetings, 1) if s == t]
        if not ends and not starts:
            lines.append(f"{_hhmm(t)}: {count}")
            continue
        steps = []
        for k in ends:
            count -= 1
            steps.append(f"end {k}: {count}")
        for k in starts:
            count += 1
            if count > rooms:
                steps.append(f"start {k}: {count} > {rooms}")
                lines += [f"{_hhmm(t)} " + ", ".join(steps), "Answer: no"]
                return "\n".join(lines)
            steps.append(f"start {k}: {count}")
        lines.append(f"{_hhmm(t)} " + ", ".join(steps))
    lines += [f"Never more than {rooms} at once", "Answer: yes"]
    return "\n".join(lines)


#: Trace style -> (completion writer, regex of its step lines, the lines :func:`trace_errors` compares).
_STYLES = {"sweep": (trace_answer, _EVENT), "grid": (grid_answer, _GRID_LINE)}
#: The trace styles' names.
STYLES = tuple(_STYLES)


def _style(style: str):
    try:
        return _STYLES[style]
    except KeyError:
        raise ValueError(f"unknown trace style {style!r}; expected one of {STYLES}") from None


def answer_for(problem: Problem, style: str = "sweep") -> str:
    """The completion of ``problem`` in ``style`` (one of :data:`STYLES`); ValueError for another style."""
    return _style(style)[0](problem)


def to_trace_sft_rows(problems: Iterable[Problem], style: str = "sweep") -> list[dict]:
    """Chat rows for SFT: ``{"messages": [user question, assistant trace in style]}``."""
    return [
        {"messages": [{"role": "user", "content": p.question()},
                      {"role": "assistant", "content": answer_for(p, style)}]}
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


def trace_errors(text: str, problem: Problem, style: str = "sweep") -> dict:
    """Where a model's trace departs from the true one: a diagnosis for reports, not a score.

    Returns ``{"first_wrong_line": int | None, "events_ok": bool}``: the 0-based
    index (among step lines: event lines for ``sweep``, time lines for ``grid``)
    of the first line that differs from :func:`answer_for`'s, None when every
    step line matches and none is missing or extra.

    Raises:
        ValueError: ``style`` is not one of :data:`STYLES`.
    """
    write, step = _style(style)
    want = [ln for ln in write(problem).splitlines() if step.fullmatch(ln)]
    got = [ln.strip() for ln in text.splitlines() if step.fullmatch(ln.strip())]
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is None and len(got) != len(want):
        first = min(len(got), len(want))
    return {"first_wrong_line": first, "events_ok": first is None}
