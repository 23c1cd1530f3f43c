"""The meeting-room sweep trace, its strict parser, the held-out scoring and report, and the train/test split."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from training.tasks import scheduling_eval as se
from training.tasks.scheduling import Problem, generate, max_concurrent
from training.tasks.sweep_trace import events, parse_final_answer, to_trace_sft_rows, trace_answer, trace_errors

# --- the trace ----------------------------------------------------------------------------------


def test_trace_of_a_hand_problem():
    # 09:00-10:00, 10:00-11:00 touch (no overlap); 09:30-10:30 overlaps both.
    p = Problem.from_meetings([(540, 600), (600, 660), (570, 630)], rooms=1, difficulty="easy")
    assert trace_answer(p) == (
        "Rooms: 1. Sweep, an end before a start at the same time:\n"
        "09:00 start 1: 1\n"
        "09:30 start 3: 2 > 1\n"
        "Answer: no"
    )
    p2 = Problem.from_meetings([(540, 600), (600, 660), (570, 630)], rooms=2, difficulty="easy")
    assert trace_answer(p2) == (
        "Rooms: 2. Sweep, an end before a start at the same time:\n"
        "09:00 start 1: 1\n"
        "09:30 start 3: 2\n"
        "10:00 end 1: 1\n"  # the end at 10:00 comes before the start at 10:00
        "10:00 start 2: 2\n"
        "10:30 end 3: 1\n"
        "11:00 end 2: 0\n"
        "Never more than 2 at once\n"
        "Answer: yes"
    )


def test_trace_agrees_with_the_ground_truth_on_many_problems():
    problems = generate(600, seed=42) + generate(300, seed=7)
    for p in problems:
        text = trace_answer(p)
        lines = text.splitlines()
        assert parse_final_answer(text) is p.answer
        counts = [int(ln.split(": ")[1].split()[0]) for ln in lines[1:-1] if ln[0].isdigit()]  # event lines
        assert max(counts) == (p.max_overlap if p.answer else p.rooms + 1)
        assert (" > " in text) is (not p.answer)
        if p.answer:  # a full sweep: every event, back to zero
            assert len(lines) == 2 * len(p.meetings) + 3 and counts[-1] == 0
        assert trace_errors(text, p) == {"first_wrong_line": None, "events_ok": True}


def test_events_put_ends_before_starts_at_equal_times():
    p = Problem.from_meetings([(600, 660), (540, 600), (600, 630)], rooms=2)
    assert events(p) == [(540, "start", 2), (600, "end", 2), (600, "start", 1), (600, "start", 3),
                         (630, "end", 3), (660, "end", 1)]
    assert max_concurrent(p.meetings) == 2


def test_trace_errors_finds_the_first_wrong_line():
    p = Problem.from_meetings([(540, 600), (600, 660), (570, 630)], rooms=2, difficulty="easy")
    good = trace_answer(p)
    bad = good.replace("10:00 end 1: 1\n10:00 start 2: 2", "10:00 start 2: 3 > 2")
    assert trace_errors(bad, p)["first_wrong_line"] == 2
    assert trace_errors("\n".join(good.splitlines()[:3]), p)["first_wrong_line"] == 2  # stops early


def test_sft_rows_carry_question_and_trace():
    p = generate(3, seed=42)
    rows = to_trace_sft_rows(p)
    assert rows[1]["messages"] == [{"role": "user", "content": p[1].question()},
                                   {"role": "assistant", "content": trace_answer(p[1])}]


# --- strict parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("Answer: yes", True),
    ("Answer: no", False),
    ("...\n10:00 start 2: 3 > 2\nAnswer: no\n\n", False),
    ("  Answer: yes  ", True),
    ("answer: yes", None),            # case matters
    ("**Answer:** yes", None),        # no markdown
    ("Answer: yes.", None),           # nothing after the word
    ("Answer: yes\nI think so.", None),  # only the last line counts
    ("Answer: no\nAnswer: maybe", None),
    ("yes", None),
    ("", None),
])
def test_parse_final_answer_is_strict(text, expected):
    assert parse_final_answer(text) is expected


# --- train/test split ---------------------------------------------------------------------------


def test_training_seeds_never_overlap_the_held_out_set():
    test = generate(se.TEST_N, se.TEST_SEED)
    for seed in (42, 43, 44):
        se.check_disjoint(generate(2000, seed), test)
    with pytest.raises(ValueError, match="held-out"):
        se.check_disjoint(generate(20, seed=5) + [test[7]], test)
    # the key ignores meeting order
    shuffled = Problem.from_meetings(list(reversed(test[0].meetings)), test[0].rooms, test[0].difficulty)
    with pytest.raises(ValueError):
        se.check_disjoint([shuffled], test)


def test_scheduling_data_cli_writes_traces_and_refuses_the_test_seed(tmp_path):
    from training.cli import app

    runner = CliRunner()
    out = tmp_path / "d.jsonl"
    r = runner.invoke(app, ["scheduling-data", "--n", "6", "--seed", "42", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == to_trace_sft_rows(generate(6, 42))
    r = runner.invoke(app, ["scheduling-data", "--n", "6", "--seed", "123", "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 1 and "held-out" in r.output
    r = runner.invoke(app, ["scheduling-data", "--n", "2", "--style", "worked", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and "Answer:" in out.read_text()


# --- scoring and report -------------------------------------------------------------------------


def test_score_answers_strict_lenient_batches_and_difficulties():
    problems = generate(30, seed=42)
    answers = [trace_answer(p) for p in problems]
    answers[0] = "Answer: " + ("no" if problems[0].answer else "yes")       # wrong
    answers[1] = "the answer is " + ("yes" if problems[1].answer else "no")  # lenient only
    answers[14] = ""                                                         # unparsable
    r = se.score_answers(answers, problems)
    assert r["n"] == 30 and r["accuracy"] == pytest.approx(27 / 30)
    assert r["lenient_accuracy"] == pytest.approx(28 / 30)
    assert r["unparsable"] == pytest.approx(2 / 30)
    assert r["batches"] == [pytest.approx(0.8), pytest.approx(0.9), 1.0]
    # difficulties cycle: problem 0 is easy, 1 medium, 14 hard
    assert {d: v["accuracy"] for d, v in r["by_difficulty"].items()} == {
        "easy": pytest.approx(0.9), "medium": pytest.approx(0.9), "hard": pytest.approx(0.9)}
    assert r["by_difficulty"]["medium"]["lenient_accuracy"] == 1.0
    assert r["trace_ok"] == pytest.approx(27 / 30)
    with pytest.raises(ValueError):
        se.score_answers(answers[:3], problems)


class _Oracle:
    """A fake generator: the true trace for the adapter, a bare lenient 'yes' for the base."""

    base_name = "oracle"

    def generate(self, prompts, model, max_tokens):
        by_q = {p.question(): p for p in generate(se.TEST_N, se.TEST_SEED)}
        return [trace_answer(by_q[q]) if model == "ad" else "yes" for q in prompts]


def test_run_and_report(tmp_path):
    gen = _Oracle()
    ad, base = se.run(gen, "ad"), se.run(gen, "__base__")
    assert ad["accuracy"] == 1.0 and len(ad["batches"]) == 15 and ad["answers"][0] == trace_answer(
        generate(150, 123)[0])
    assert base["accuracy"] == 0.0 and 0.3 < base["lenient_accuracy"] < 0.7
    tries = [{"try": "T1", "config": "trace, 100 problems", "train_n": 100, "train_s": "10 s", "accuracy": "100%"}]
    path = se.write_report(tmp_path / "eval_report.md", adapter=ad, base=base, tries=tries, command="stanceserve ...")
    text = path.read_text()
    assert "| adapter | 100.0% |" in text and "| base | 0.0% |" in text
    assert "## Batch by batch (15 x 10, strict)" in text and "| T1 | trace, 100 problems |" in text
    assert text.count("### Problem") >= 3


# --- the larger-base path, on a tiny random Qwen2 -----------------------------------------------


def test_trace_training_and_eval_on_a_tiny_qwen2(tmp_path):
    """``--base Qwen/Qwen2.5-0.5B-Instruct`` is the same code path: train on traces, evaluate on the held-out set."""
    from tests.factories import save_tiny_base
    from training.evaluate import LocalGenerator
    from training.tasks.scheduling import write_jsonl
    from training.trainers import TrainConfig, train_adapter

    base = save_tiny_base(tmp_path / "qwen2", arch="qwen2")
    data = tmp_path / "train.jsonl"
    write_jsonl(to_trace_sft_rows(generate(4, seed=42, difficulties=("easy",))), data)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    cfg = TrainConfig(method="sft", rank=4, alpha=8, targets=targets, epochs=1, batch_size=1, grad_accum=2,
                      lr=1e-2, max_length=256, save_dtype="float32")
    res = train_adapter(data, "meeting-scheduler", tmp_path / "ad", cfg, base=str(base), progress=False)
    cfg_json = json.loads((res.out_dir / "adapter_config.json").read_text())
    assert set(cfg_json["target_modules"]) == set(targets) and cfg_json["r"] == 4
    assert len(res.metrics["steps"]) == 2
    gen = LocalGenerator(str(base))
    try:
        r = se.run(gen, str(res.out_dir), n=3, max_tokens=6)
    finally:
        gen.close()
    assert r["n"] == 3 and len(r["answers"]) == 3 and len(r["batches"]) == 1 and r["generation_s"] >= 0


def test_eval_cli_writes_the_scheduling_report(tmp_path):
    """``stanceserve eval --task scheduling --out X.md``: base and adapter, strict scoring, the Markdown report."""
    from tests.factories import save_tiny_base, write_peft_adapter
    from training.cli import app

    base = save_tiny_base(tmp_path / "base")
    adapter = write_peft_adapter(tmp_path / "ad")
    report = tmp_path / "report.md"
    r = CliRunner().invoke(app, ["eval", "--task", "scheduling", "--base", str(base), "--adapter", str(adapter),
                                 "--n", "10", "--out", str(report)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["n"] == 10 and set(res) >= {"base", "adapter"} and res["adapter"]["batches"] == [
        res["adapter"]["accuracy"]]
    text = report.read_text()
    assert "## Batch by batch (1 x 10, strict)" in text and "| base |" in text and "| adapter |" in text
