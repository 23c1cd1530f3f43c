"""What ``train --register`` sends: the admin key from a file or the environment, and public provenance only."""

from __future__ import annotations

import json

import pytest

from training.register import RegistrationError, admin_key_from, provenance


def test_admin_key_file_wins_and_is_read_to_its_first_line(tmp_path):
    f = tmp_path / "key"
    f.write_text("from-file-key\nignored\n")
    assert admin_key_from("from-env", f) == "from-file-key"
    assert admin_key_from("from-env", None) == "from-env"
    assert admin_key_from(None, None) is None


def test_admin_key_file_missing_or_empty_is_a_clear_error(tmp_path):
    with pytest.raises(RegistrationError, match="cannot read"):
        admin_key_from(None, tmp_path / "nope")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(RegistrationError, match="is empty"):
        admin_key_from(None, tmp_path / "empty")


def test_provenance_leaves_out_the_command_and_local_paths(tmp_path):
    metrics = {"summary": {"method": "dpo", "final_loss": 0.5}, "hyperparameters": {"rank": 8},
               "dataset": {"path": "/home/alice/private/data.jsonl", "sha256": "ab" * 32, "rows": 12},
               "machine": {"device": "cpu", "dtype": "bfloat16", "python": "3.11"},
               "command": "stanceserve train --data /home/alice/private/data.jsonl --admin-key leaked-key"}
    (tmp_path / "training_metrics.json").write_text(json.dumps(metrics))
    p = provenance(tmp_path)
    text = json.dumps(p)
    assert "leaked-key" not in text and "/home/alice" not in text and "command" not in p
    assert p["dataset"] == {"sha256": "ab" * 32, "rows": 12, "file": "data.jsonl"}
    assert p["training"]["method"] == "dpo" and p["machine"] == {"device": "cpu", "dtype": "bfloat16"}
