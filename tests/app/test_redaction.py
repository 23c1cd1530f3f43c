"""Secret command-line options and their redaction (:mod:`app.redaction`)."""

from __future__ import annotations

import pytest

from app.redaction import REDACTED, contains_secret, is_secret_option, redact_argv, redact_json, redact_text


@pytest.mark.parametrize("option", ["--admin-key", "--admin-key=x", "--api-key", "--hf-token", "--db-password",
                                    "--client-secret", "--admin_key"])
def test_secret_options(option):
    assert is_secret_option(option)


@pytest.mark.parametrize("option", ["--admin-key-file", "--max-tokens", "--name", "--register", "--keys", "--out"])
def test_options_that_are_not_secret(option):
    assert not is_secret_option(option)


def test_redact_argv_hides_both_forms_and_known_values():
    argv = ["stanceserve", "train", "--quiet", "--admin-key", "k-123456", "--name", "x", "--hf-token=abcdef",
            "--admin-key-file", "/etc/key", "--description", "uses k-123456"]
    out = redact_argv(argv, secrets=["k-123456"])
    assert out == ["stanceserve", "train", "--quiet", "--admin-key", REDACTED, "--name", "x", f"--hf-token={REDACTED}",
                   "--admin-key-file", "/etc/key", "--description", f"uses {REDACTED}"]


def test_redact_text_reads_recorded_commands():
    text = "stanceserve train --data d.jsonl --quiet --admin-key newcomer-secret-123 --register http://h:8000 " \
           "--api-key='two words' --name n"
    out = redact_text(text)
    assert "newcomer-secret-123" not in out and "two words" not in out
    assert "--admin-key ***" in out and "--register http://h:8000" in out and "--name n" in out


def test_redact_json_walks_values_and_secret_keys():
    meta = {"command": "x --admin-key s3cret-value y", "admin_key": "whatever", "nested": [{"note": "key s3cret-value"}],
            "rank": 4, "token": None}
    out = redact_json(meta, secrets=["s3cret-value"])
    assert not contains_secret(out, ["s3cret-value", "whatever"])
    assert out["rank"] == 4 and out["admin_key"] == REDACTED and out["token"] is None
    assert out["nested"][0]["note"] == f"key {REDACTED}"
    assert meta["admin_key"] == "whatever"  # a copy: the input is unchanged


def test_short_secrets_are_not_searched_in_text():
    assert redact_text("a b c", secrets=["a"]) == "a b c"
