"""The half-hour grid trace (``--style grid``), its scoring, the data command, and checkpoints of one training run."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from training.tasks import scheduling_eval as se
from training.tasks.scheduling import Problem, generate
from training.tasks.sweep_trace import answer_for, grid_answer, parse_final_answer, to_trace_sft_rows, trace_errors

# 09:00-10:00, 10:00-11:00 touch (no overlap); 09:30-10:30 overlaps both.
HAND = [(540, 600), (600, 660), (570, 630)]


def _empty(times: list[str], count: int) -> list[str]:
    return [f"{t}: {count}" for t in times]


def test_grid_trace_of_a_hand_problem():
    p = Problem.from_meetings(HAND, rooms=2, difficulty="easy")
    morning = [f"{h:02d}:{m:02d}" for h in range(8, 9) for m in (0, 30)] + ["09:00"]
    lines = grid_answer(p).splitlines()
    assert lines[0] == "Rooms: 2. Each half hour, ends before starts:"
    assert lines[1:3] == _empty(morning[:2], 0)
    assert lines[3:8] == ["09:00 start 1: 1", "09:30 start 3: 2",
                          "10:00 end 1: 1, start 2: 2",  # the end at 10:00 is counted before the start
                          "10:30 end 3: 1", "11:00 end 2: 0"]
    later = [f"{h:02d}:{m:02d}" for h in range(11, 18) for m in (0, 30)][1:]
    assert lines[8:-2] == _empty(later, 0)  # every half hour up to 17:30
    assert lines[-2:] == ["Never more than 2 at once", "Answer: yes"]

    no = grid_answer(Problem.from_meetings(HAND, rooms=1)).splitlines()
    assert no[-2:] == ["09:30 start 3: 2 > 1", "Answer: no"] and len(no) == 6  # stops at the first overflow


def test_grid_trace_agrees_with_the_ground_truth_on_many_problems():
    for p in generate(600, seed=42) + generate(300, seed=7):
        text = grid_answer(p)
        assert parse_final_answer(text) is p.answer
        assert (" > " in text) is (not p.answer)
        counts = [int(c) for c in re.findall(r": (\d+)", text)[1:]]  # every count after "Rooms: N"
        assert max(counts) == (p.max_overlap if p.answer else p.rooms + 1)
        if p.answer:
            assert len(text.splitlines()) == 1 + 20 + 2  # header, 08:00..17:30, verdict, answer
        assert trace_errors(text, p, "grid") == {"first_wrong_line": None, "events_ok": True}


def test_grid_trace_errors_and_bad_input():
    p = Problem.from_meetings(HAND, rooms=2)
    good = grid_answer(p)
    bad = good.replace("10:00 end 1: 1, start 2: 2", "10:00 start 2: 3 > 2")
    assert trace_errors(bad, p, "grid")["first_wrong_line"] == 4  # 08:00, 08:30, 09:00, 09:30 are right
    assert trace_errors(good, p, "sweep")["events_ok"] is False  # a grid trace is not a sweep trace
    with pytest.raises(ValueError, match="grid"):
        grid_answer(Problem.from_meetings([(545, 600)], rooms=1))  # 09:05 is off the grid
    with pytest.raises(ValueError, match="style"):
        answer_for(p, "zigzag")
    with pytest.raises(ValueError, match="style"):
        trace_errors(good, p, "zigzag")


def test_scheduling_data_grid_style_and_scoring_with_it(tmp_path):
    from training.cli import app

    out = tmp_path / "g.jsonl"
    r = CliRunner().invoke(app, ["scheduling-data", "--n", "5", "--seed", "42", "--style", "grid", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == to_trace_sft_rows(generate(5, 42), "grid")
    assert rows[0]["messages"][1]["content"] == grid_answer(generate(5, 42)[0])

    problems = generate(20, seed=42)
    answers = [grid_answer(q) for q in problems]
    answers[3] = answers[3].replace(": 1", ": 2", 1)  # one wrong count, right answer
    grid = se.score_answers(answers, problems, "grid")
    assert grid["accuracy"] == 1.0 and grid["trace_ok"] == pytest.approx(19 / 20)
    # scored as sweep traces, only those whose every line has one event and that stop early match
    assert se.score_answers(answers, problems)["trace_ok"] < 0.5


def test_scheduling_eval_without_the_base_run(tmp_path):
    """``eval --task scheduling --no-with-base --trace-style grid``: the adapter alone, its JSON."""
    from training.cli import _scheduling_eval

    class Grid:
        def __init__(self):
            self.models = []

        def generate(self, prompts, model, max_tokens):
            self.models.append(model)
            by_q = {q.question(): q for q in generate(10, se.TEST_SEED)}
            return [grid_answer(by_q[q]) for q in prompts]

    gen = Grid()
    res = _scheduling_eval(gen, "ad", n=10, seed=se.TEST_SEED, max_tokens=400, out=tmp_path / "r.json",
                           style="grid", with_base=False)
    assert gen.models == ["ad"] and "base" not in res and res["style"] == "grid"
    assert res["adapter"]["accuracy"] == 1.0 and res["adapter"]["trace_ok"] == 1.0
    assert json.loads((tmp_path / "r.json").read_text())["adapter"]["n"] == 10


def test_checkpoints_every_n_steps_on_a_tiny_llama(tmp_path):
    """``--save-every 2``: an adapter folder every second optimiser step (none between), each loadable and moving on."""
    from safetensors.torch import load_file

    from tests.factories import save_tiny_base
    from training.tasks.scheduling import write_jsonl
    from training.trainers import TrainConfig, train_adapter

    base = save_tiny_base(tmp_path / "llama", arch="llama")
    data = tmp_path / "train.jsonl"
    write_jsonl(to_trace_sft_rows(generate(8, seed=42, difficulties=("easy",)), "grid"), data)
    cfg = TrainConfig(method="sft", rank=4, alpha=8, epochs=1, batch_size=1, grad_accum=1, lr=1e-2,
                      max_length=256, save_dtype="float32", save_every=2)
    res = train_adapter(data, "m", tmp_path / "ad", cfg, base=str(base), progress=False)
    ckpts = sorted((res.out_dir / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-2", "step-4"]  # 4 steps (the rows that fit max_length)
    w1, w2 = (load_file(c / "adapter_model.safetensors") for c in ckpts)
    final = load_file(res.out_dir / "adapter_model.safetensors")
    assert w1.keys() == final.keys()
    assert any(not (w1[k] == w2[k]).all() for k in w1)  # steps 3-4 moved the weights
    assert all((w2[k] == final[k]).all() for k in final)  # the last checkpoint is the final adapter
    cfg0, cfg_final = (json.loads((d / "adapter_config.json").read_text()) for d in (ckpts[0], res.out_dir))
    assert cfg0 == cfg_final and cfg0["r"] == 4


def test_report_with_a_saved_base_summary(tmp_path):
    """A base result saved without its answers (an earlier run's eval_summary.json) still fills the tables."""
    problems = generate(se.TEST_N, se.TEST_SEED)
    ad = se.score_answers([grid_answer(q) for q in problems], problems, "grid")
    ad.update(n=se.TEST_N, seed=se.TEST_SEED, answers=[grid_answer(q) for q in problems])
    base = {k: v for k, v in se.score_answers(["yes"] * len(problems), problems).items()
            if k not in ("per_problem",)}
    text = se.write_report(tmp_path / "r.md", adapter=ad, base=base).read_text()
    assert "| adapter | 100.0% |" in text and "| base | 0.0% |" in text
    assert "**adapter** (correct)" in text and "**base**" not in text
