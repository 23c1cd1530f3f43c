"""A local Ray Serve stanceserve for the tests, and the helpers that drive and observe it.

:func:`start_service` starts Ray on loopback (:func:`app.ray_serve.cluster.start_ray`), writes 8 adapters
``s0``..``s7`` into a fresh shared store and deploys 2 replicas of the tiny Llama
(:func:`tests.factories.tiny_factory`, 1 torch thread and half a CPU each), then tears it all down.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.factories import free_port, tiny_factory, write_peft_adapter

STANCES = [f"s{i}" for i in range(8)]
#: Seconds a replica waits between two metric pushes and two store passes, in these tests.
PUSH_S = 0.5
WATCH_S = 1.0


@dataclass
class RayService:
    base: str
    store: Path
    settings: object

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=timeout)

    def requests_by_replica(self) -> dict[str, dict[str, float]]:
        """``{stance: {replica: finished requests}}`` from the merged ``/metrics`` (every status summed)."""
        text = httpx.get(f"{self.base}/metrics", timeout=30).text
        out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for m in re.finditer(r'^stanceserve_requests_total\{([^}]*)\} (\S+)$', text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[labels["stance"]][labels["replica"]] += float(m.group(2))
        return out


def chat_body(model: str, max_tokens: int = 6, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


@contextlib.contextmanager
def start_service(root: Path, replicas: int = 2) -> Iterator[RayService]:
    import torch

    from app.config import Settings
    from app.ray_serve import cluster

    torch.set_num_threads(1)
    store = root / "adapters"
    for i, name in enumerate(STANCES):
        write_peft_adapter(store / name, seed=i + 1, scale=0.3)
    settings = Settings(
        adapters_dir=store, host="127.0.0.1", port=free_port(), replicas=replicas, ray_replica_cpus=0.5,
        torch_threads=1, max_batch_size=2, store_watch_interval_s=WATCH_S, metrics_push_interval_s=PUSH_S,
    )
    cluster.start_ray(None, num_cpus=2)
    try:
        cluster.deploy(settings, tiny_factory)
        yield RayService(f"http://127.0.0.1:{settings.port}", store, settings)
    finally:
        cluster.shutdown()


def sse_events(lines: Iterator[str]) -> list[dict | str]:
    """The ``data:`` payloads of an SSE stream (JSON decoded, ``"[DONE]"`` as is)."""
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(pred, timeout: float, every: float = 0.2):
    """Poll ``pred()`` until it returns something truthy (returned); ``None`` after ``timeout`` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(every)
    return None
