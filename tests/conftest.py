"""Shared fixtures: the test tokenizer and tiny random models of each supported architecture.

Fixtures only; what they hand out is built by :mod:`tests.factories`. Nothing is downloaded (the
tokenizer is vendored in ``tests/fixtures/stories260k``; see :mod:`tests.factories.models`).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.factories import build_tiny_model, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "phi"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch):
    return build_tiny_model(arch)
