"""Shared fixtures: the test tokenizer, tiny random models of each supported architecture and the built C++ CPU
kernels.

Fixtures only; what they hand out is built by :mod:`tests.factories`. Nothing is downloaded (the
tokenizer is vendored in ``tests/fixtures/stories260k``; see :mod:`tests.factories.models`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from tests.factories import EXTRA_ARCHS, build_extra_model, build_tiny_model, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# No test writes to the real user data folder: the default adapter store is $XDG_DATA_HOME/stanceserve/adapters
# (app.config.default_adapters_dir), seeded on first start. Servers the tests start inherit this too.
_XDG_DATA_HOME = tempfile.mkdtemp(prefix="stanceserve-tests-xdg-")
os.environ["XDG_DATA_HOME"] = _XDG_DATA_HOME
atexit.register(shutil.rmtree, _XDG_DATA_HOME, ignore_errors=True)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def cpu_ext():
    """The built C++ CPU kernels' module (:func:`app.engine.cpu_kernels.extension`). Skips (saying why) where they
    cannot be built on this host, and fails there instead with ``STANCESERVE_REQUIRE_CPU_KERNEL=1`` (``.ci/run``
    sets it)."""
    from app.engine import cpu_kernels  # lazy: only kernel tests need the engine package

    ext = cpu_kernels.extension()
    if ext is None:
        if os.environ.get("STANCESERVE_REQUIRE_CPU_KERNEL") == "1":
            pytest.fail("the C++ CPU kernels did not build and STANCESERVE_REQUIRE_CPU_KERNEL=1: install g++ "
                        "and ninja (deploy/docker/system-deps.sh)")
        pytest.skip("the C++ CPU kernels cannot be built on this host (see the logged warning)")
    return ext


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "phi"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch):
    return build_tiny_model(arch)


@pytest.fixture(params=["llama", "qwen2", "phi", *EXTRA_ARCHS])
def any_model(request):
    """A tiny random model of every architecture the engine's forward pass serves."""
    arch = request.param
    return build_extra_model(arch) if arch in EXTRA_ARCHS else build_tiny_model(arch)
