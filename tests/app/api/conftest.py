"""Fixtures of the HTTP API tests (builders live in :mod:`tests.factories`)."""

from __future__ import annotations

import pytest

from tests.factories import calm_and_bold


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory):
    """The ``calm`` and ``bold`` tiny-Llama adapters (:func:`tests.factories.calm_and_bold`), one pair per module."""
    return calm_and_bold(tmp_path_factory.mktemp("peft"))
