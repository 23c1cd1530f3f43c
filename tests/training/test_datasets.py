"""Dataset loaders reject malformed rows naming file, line and field; the shipped stance data is well formed."""

from __future__ import annotations

import json

import pytest

from training.datasets import STANCES, DatasetError, load_dataset, load_probes, load_reference_answers, stance_files


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_dpo_rows_become_conversational(tmp_path):
    p = write(tmp_path, [{"prompt": "Why?", "chosen": "I wonder.", "rejected": "Because."}, ""])
    ds = load_dataset(p, "dpo")
    assert len(ds) == 1 and len(ds.sha256) == 64
    assert ds.rows[0] == {
        "prompt": [{"role": "user", "content": "Why?"}],
        "chosen": [{"role": "assistant", "content": "I wonder."}],
        "rejected": [{"role": "assistant", "content": "Because."}],
    }


def test_sft_formats(tmp_path):
    p = write(tmp_path, [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "p", "completion": "c"},
    ])
    rows = load_dataset(p, "sft").rows
    assert rows[0]["completion"] == [{"role": "assistant", "content": "a"}] and len(rows[0]["prompt"]) == 2
    assert rows[1] == {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]}


@pytest.mark.parametrize(
    ("method", "bad", "field", "text"),
    [
        ("dpo", {"prompt": "p", "chosen": "c"}, "rejected", "missing field 'rejected'"),
        ("dpo", {"prompt": "p", "chosen": "", "rejected": "r"}, "chosen", "non-empty string"),
        ("dpo", {"prompt": 3, "chosen": "c", "rejected": "r"}, "prompt", "non-empty string"),
        ("sft", {"messages": [{"role": "user", "content": "u"}]}, "messages", "last message"),
        ("sft", {"messages": [{"role": "robot", "content": "u"}, {"role": "assistant", "content": "a"}]}, "messages[0].role", "role"),
        ("sft", {"prompt": "p"}, "completion", "missing field 'completion'"),
        ("sft", {"text": "x"}, "messages", "needs 'messages'"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, method, bad, field, text):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"} if method == "dpo" else {"prompt": "p", "completion": "c"}
    p = write(tmp_path, [good, good, bad])
    with pytest.raises(DatasetError) as e:
        load_dataset(p, method)
    assert e.value.line == 3 and e.value.field == field
    assert f"{p}:3" in str(e.value) and text in str(e.value)


def test_reference_answers_from_dpo_and_sft_rows(tmp_path):
    p = write(tmp_path, [
        {"prompt": "Why?", "chosen": "Because of X.", "rejected": "Maybe."},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "a2"}]},
        {"prompt": "p", "completion": "c"},
    ])
    assert load_reference_answers(p) == [("Why?", "Because of X."), ("u2", "a2"), ("p", "c")]
    with pytest.raises(DatasetError, match=r":2: .*missing field 'rejected'"):
        load_reference_answers(write(tmp_path, [{"prompt": "p", "completion": "c"}, {"prompt": "p", "chosen": "c"}], "b.jsonl"))


def test_invalid_json_and_empty_file(tmp_path):
    p = write(tmp_path, ['{"prompt": "p", "chosen": "c", "rejected": "r"}', '{"prompt": '])
    with pytest.raises(DatasetError, match=r":2: invalid JSON"):
        load_dataset(p, "dpo")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(write(tmp_path, [""], "e.jsonl"), "dpo")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(tmp_path / "missing.jsonl", "dpo")


@pytest.mark.parametrize("stance", STANCES)
def test_shipped_stance_data(stance):
    train, probes = stance_files(stance)
    ds = load_dataset(train, "dpo")
    assert len(ds) >= 120
    prompts = load_probes(probes)
    assert len(prompts) >= 30
    seen = {r["prompt"][0]["content"].strip().lower() for s in STANCES for r in load_dataset(stance_files(s)[0], "dpo").rows}
    assert not {p.strip().lower() for p in prompts} & seen  # probes never appear in any stance's training set
    assert all(r["chosen"] != r["rejected"] for r in ds.rows)
