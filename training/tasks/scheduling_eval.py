"""Meeting-room accuracy of a model, and its report: overall, by difficulty, batch by batch, base vs adapter.

:func:`score_answers` scores generated answers against the problems with the
strict trace parser (:func:`training.tasks.sweep_trace.parse_final_answer`,
the official score) and, for comparison with free-text answers, the lenient
parser (:func:`training.tasks.scheduling.parse_answer`). :func:`run` asks a
generator (anything with ``generate(prompts, model, max_tokens)``, see
:mod:`training.evaluate`) for greedy answers and scores them, timing the
generation. :func:`write_report` writes the Markdown ``eval_report.md``
(summary table, per-difficulty table, the 15 x 10 batch table, the table of
tries and a few answers side by side).

:func:`check_disjoint` refuses a training set that shares a problem with the
held-out set (150 problems of seed 123).

What it does not do: load models or train; generation and batching are the
generator's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.report import runtime_lines
from training.tasks.scheduling import DIFFICULTIES, Problem, generate, parse_answer
from training.tasks.sweep_trace import parse_final_answer, trace_errors

#: Problems per batch in the batch-by-batch table (150 held-out problems = 15 batches of 10).
BATCH = 10
#: Held-out set: 150 problems from seed 123; training sets must not share a problem with it.
TEST_N, TEST_SEED = 150, 123


def problem_key(p: Problem) -> tuple:
    """What makes two problems the same question: the meetings as a multiset and the room count."""
    return tuple(sorted(p.meetings)), p.rooms


def check_disjoint(train: Sequence[Problem], test: Sequence[Problem] | None = None) -> None:
    """Raise ValueError if a training problem is also in ``test`` (default: the held-out seed-123 set).

    Problems are compared by :func:`problem_key` (meeting order does not matter).
    """
    test_keys = {problem_key(p) for p in (generate(TEST_N, TEST_SEED) if test is None else test)}
    shared = [i for i, p in enumerate(train) if problem_key(p) in test_keys]
    if shared:
        raise ValueError(f"{len(shared)} training problems are in the held-out set (first: index {shared[0]})")


def score_answers(answers: Sequence[str], problems: Sequence[Problem], style: str = "sweep") -> dict[str, Any]:
    """Accuracy of ``answers`` (same order as ``problems``), strict and lenient.

    Returns ``{"n", "accuracy", "unparsable", "lenient_accuracy", "by_difficulty": {d: {"n", "accuracy",
    "lenient_accuracy"}}, "batches": [accuracy of problems 0-9, 10-19, ...], "trace_ok",
    "per_problem": [{"difficulty", "truth", "strict", "lenient", "correct", "first_wrong_line"}]}``.
    ``accuracy`` uses the strict parser (unparsable counts as wrong); fractions lie in [0, 1];
    ``trace_ok`` is the fraction of answers whose every step line is the true one in ``style``
    (:data:`training.tasks.sweep_trace.STYLES`); the answer itself is scored the same in every style.

    Raises:
        ValueError: ``answers`` and ``problems`` differ in length.
    """
    if len(answers) != len(problems):
        raise ValueError(f"{len(answers)} answers for {len(problems)} problems")
    rows = []
    for text, p in zip(answers, problems):
        strict, lenient = parse_final_answer(text), parse_answer(text)
        rows.append({"difficulty": p.difficulty, "truth": p.answer, "strict": strict, "lenient": lenient,
                     "correct": strict is not None and strict == p.answer,
                     "first_wrong_line": trace_errors(text, p, style)["first_wrong_line"]})
    n = len(rows)

    def frac(sel: list[dict], key: str = "correct") -> float:
        if not sel:
            return 0.0
        if key == "lenient":
            return sum(r["lenient"] is not None and r["lenient"] == r["truth"] for r in sel) / len(sel)
        return sum(bool(r[key]) for r in sel) / len(sel)

    by = {}
    for d in [d for d in DIFFICULTIES if any(r["difficulty"] == d for r in rows)]:
        sel = [r for r in rows if r["difficulty"] == d]
        by[d] = {"n": len(sel), "accuracy": frac(sel), "lenient_accuracy": frac(sel, "lenient")}
    return {
        "n": n, "accuracy": frac(rows), "lenient_accuracy": frac(rows, "lenient"),
        "unparsable": sum(r["strict"] is None for r in rows) / n if n else 0.0,
        "by_difficulty": by,
        "batches": [frac(rows[i:i + BATCH]) for i in range(0, n, BATCH)],
        "trace_ok": sum(r["first_wrong_line"] is None for r in rows) / n if n else 0.0,
        "per_problem": rows,
    }


def run(gen: Any, model: str, *, n: int = TEST_N, seed: int = TEST_SEED, max_tokens: int = 360,
        style: str = "sweep") -> dict[str, Any]:
    """Greedy answers of ``model`` (an adapter, or :data:`training.evaluate.BASE`) on ``n`` problems of ``seed``.

    ``max_tokens`` (tokens per answer) must cover the longest trace: 325 tokens for
    the seed-123 set with the SmolLM2 tokenizer (``sweep``), 333 (``grid``). ``style`` is
    the trace style the model was trained on (only the ``trace_ok`` diagnosis reads it). Returns :func:`score_answers`'s
    dict plus ``"model"``, ``"seed"``, ``"answers"`` and ``"generation_s"`` (wall seconds).
    """
    problems = generate(n, seed)
    t0 = time.perf_counter()
    answers = gen.generate([p.question() for p in problems], model, max_tokens)
    out = score_answers(answers, problems, style)
    out.update(model=model, seed=seed, answers=answers, generation_s=round(time.perf_counter() - t0, 1))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_report(path: Path, *, adapter: dict, base: dict | None = None, tries: list[dict] | None = None,
                 training: dict | None = None, command: str | None = None, runtime: dict | None = None) -> Path:
    """Write the Markdown report of one adapter (and optionally the base model) on the held-out set.

    Args:
        adapter, base: :func:`run` results (``base`` may be a lenient-parser free-text run, and may be a
            saved summary without ``answers``/``per_problem``: its answers are then left out of the side by side).
        tries: rows ``{"try", "config", "train_n", "train_s", "accuracy", "easy", "medium", "hard"}``
            for the table of all tries, in the order they were run.
        training: ``training_metrics.json`` content of the adapter (time, steps, hyperparameters).
        command: the commands that reproduce the adapter.
        runtime: :func:`training.evaluate.runtime_of` of the run (device and dtype it generated with).
    """
    lines = [f"# meeting-scheduler: meeting-room task, {adapter['n']} held-out problems (seed {adapter['seed']})", ""]
    if runtime is not None:
        lines += [runtime_lines(runtime)[0], ""]
    if command:
        lines += ["Reproduce:", "", "```bash", command, "```", ""]
    cols = [("adapter", adapter)] + ([("base", base)] if base else [])
    lines += ["## Accuracy", "",
              "Strict: only a last line that is exactly `Answer: yes` or `Answer: no` counts "
              "(`training/tasks/sweep_trace.py`, `parse_final_answer`). Lenient: the last `Answer: yes|no`, "
              "else the last standalone yes/no anywhere (`training/tasks/scheduling.py`, `parse_answer`).", "",
              "| model | strict | lenient | unparsable (strict) | trace all correct | generation time |",
              "|---|---|---|---|---|---|"]
    for name, r in cols:
        lines.append(f"| {name} | {_pct(r['accuracy'])} | {_pct(r['lenient_accuracy'])} | {_pct(r['unparsable'])} "
                     f"| {_pct(r['trace_ok'])} | {r.get('generation_s', '?')} s |")
    lines += ["", "## By difficulty (strict; lenient in brackets)", "",
              "| difficulty | n | " + " | ".join(n for n, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for d, s in adapter["by_difficulty"].items():
        cells = [f"{_pct(r['by_difficulty'][d]['accuracy'])} ({_pct(r['by_difficulty'][d]['lenient_accuracy'])})"
                 for _, r in cols]
        lines.append(f"| {d} | {s['n']} | " + " | ".join(cells) + " |")
    nb = len(adapter["batches"])
    lines += ["", f"## Batch by batch ({nb} x {BATCH}, strict)", "",
              "| batch | " + " | ".join(str(i + 1) for i in range(nb)) + " |", "|---|" + "---|" * nb]
    for name, r in cols:
        lines.append(f"| {name} | " + " | ".join(f"{round(100 * b)}" for b in r["batches"]) + " |")
    lo, hi = min(adapter["batches"]), max(adapter["batches"])
    lines += ["", f"Adapter batches range {round(100 * lo)}-{round(100 * hi)}%."]
    if training:
        hp = training.get("hyperparameters", {})
        lines += ["", "## Training", "",
                  f"{training['dataset']['rows']} problems, {hp.get('epochs')} epochs, lr {hp.get('lr')}, rank "
                  f"{hp.get('rank')} (alpha {hp.get('alpha')}) on {', '.join(hp.get('targets', []))}; "
                  f"{len(training.get('steps', []))} optimizer steps in {training['total_time_s']} s on "
                  f"{training['machine']['device']} ({training['machine']['threads']} thread(s), "
                  f"{training['machine']['dtype']}); {training['parameters']['trainable']:,} trainable parameters."]
    if tries:
        lines += ["", "## All tries (strict accuracy on the held-out set)", "",
                  "| try | configuration | training problems | training time | accuracy | easy | medium | hard |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in tries:
            lines.append(f"| {t['try']} | {t['config']} | {t.get('train_n', '')} | {t.get('train_s', '')} "
                         f"| {t['accuracy']} | {t.get('easy', '')} | {t.get('medium', '')} | {t.get('hard', '')} |")
    problems = generate(adapter["n"], adapter["seed"])
    lines += ["", "## Answers side by side", "",
              "The first problem of each difficulty, and the first one of each the adapter gets wrong.", ""]
    for d in DIFFICULTIES:
        idx = [i for i, p in enumerate(problems) if p.difficulty == d]
        wrong = [i for i in idx if not adapter["per_problem"][i]["correct"]]
        for i in sorted(set(idx[:1] + wrong[:1])):
            p = problems[i]
            lines += [f"### Problem {i + 1} ({d}, truth: {'yes' if p.answer else 'no'})", "", "```", p.question(),
                      "```", ""]
            for name, r in cols:
                if "answers" not in r:
                    continue
                ok = "correct" if r["per_problem"][i]["correct"] else "wrong"
                lines += [f"**{name}** ({ok}):", "", "```", r["answers"][i], "```", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def save(result: dict, path: Path) -> Path:
    """Write a :func:`run` result as JSON (answers included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return path
