"""The app in-process on the tiny Llama (TestClient), and small readers of what it answers.

:func:`make_client` builds the app with :func:`tests.factories.models.tiny_factory`; entering the
client runs the lifespan, :func:`wait_ready` then waits for the model to load.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.factories.models import tiny_factory
from tests.factories.payloads import chat_body

#: The admin key of in-process apps, and the header that carries it.
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_client(tmp_path: Path, *, raise_server_exceptions: bool = True, model_factory=None, **settings):
    """A (not yet entered) TestClient of the app on the tiny Llama with its store in ``tmp_path / "store"``.

    ``settings`` are :class:`Settings` fields; ``admin_key`` defaults to :data:`KEY` and ``max_loras`` to 4.
    ``model_factory`` replaces :func:`tiny_factory` (e.g. the same model in another dtype).
    """
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app

    settings.setdefault("admin_key", KEY)
    settings.setdefault("max_loras", 4)
    app = create_app(Settings(adapters_dir=tmp_path / "store", **settings), model_factory=model_factory or tiny_factory)
    return TestClient(app, raise_server_exceptions=raise_server_exceptions)


def wait_ready(client, timeout=30.0):
    """Poll ``GET /ready`` until 200 (its JSON returned); AssertionError after ``timeout`` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = client.get("/ready")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready: {r.json()}")


def chat(client, model, content="Once upon a time", **extra):
    """``POST /v1/chat/completions`` of :func:`chat_body` (greedy, 8 tokens unless ``extra`` says otherwise)."""
    return client.post("/v1/chat/completions", json=chat_body(model, content, **extra))


def metric(text: str, sample: str, **labels: str) -> float:
    """Sum of the samples named ``sample`` with ``labels`` in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )
