"""Fixtures of the registry tests (builders live in :mod:`tests.factories`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import adapter_bytes, write_peft_adapter


@pytest.fixture
def llama_adapter(tmp_path) -> Path:
    return write_peft_adapter(tmp_path / "llama_adapter", "llama")


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> dict[str, bytes]:
    """The two files of a valid llama adapter, as bytes."""
    return adapter_bytes(write_peft_adapter(tmp_path_factory.mktemp("adapter"), "llama"))
