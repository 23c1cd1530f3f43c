"""Fixtures of the registry tests (helpers live in :mod:`tests.app.registry.helpers`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.registry.helpers import make_adapter


@pytest.fixture
def llama_adapter(tmp_path) -> Path:
    return make_adapter(tmp_path / "llama_adapter", "llama")
