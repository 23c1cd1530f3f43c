"""The event loop stays responsive: /health p99 under 50 ms while heavy requests are handled.

Against a real server process (the tiny random Llama of tests/server.py), a separate prober
process sends ``GET /health`` every 10 ms, open loop (a stalled loop yields many slow samples,
not one), and the test checks the p99 of the latencies of the probes sent during each phase:

(a) a chat request whose user message is 4 MiB (answered 400 ``context_length_exceeded``);
(b) the upload of a 78 MB adapter (a valid peft LoRA of rank 9522 on every linear of the tiny
    model, so ``max_lora_rank`` and ``max_adapter_bytes`` are raised);
(c) that adapter loading cold: with ``max_cpu_loras=0`` no parsed adapter stays in CPU memory,
    so each request on it reads and validates the 78 MB from disk, and the first one also
    copies it into a device slot (growing every slot to rank 9522).

Each phase is its own claim, checked separately; an idle phase is measured first for reference.
Only probes sent while a phase's request is in flight count for that phase. A phase whose p99 is
over the bound is tried again (up to 3 tries, every try printed): a saturated shared host stalls
even an idle server at times, a stall the app causes comes back every time. Every route is hit
once before the phases: FastAPI builds a router's routes on the event loop at their first request
(a one-off stall of ~50-80 ms measured on a busy 2-core box), printed but not asserted. Run with
``-s`` to see the numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.factories import BASE_MODEL, adapter_files, build_tiny_model, metric, write_peft_adapter
from tests.server import AUTH, percentile, start_probe, start_server

pytestmark = pytest.mark.slow

P99_BOUND_S = 0.050
MIB = 1024 * 1024
#: rank giving a ~78 MB safetensors on the tiny Llama: 2 layers x 7 linears, sum(d_in + d_out) = 2048 per rank,
#: fp32 -> 8192 bytes per rank
BIG_RANK = 9522
MIN_SAMPLES = 20
#: Scheduling priority of the server and the prober: on a small shared machine, other processes' CPU load
#: otherwise delays them by tens of ms whatever the app does (measured: idle p99 10-15 ms, max 94 ms at load
#: average 6 on 2 cores). Raising it (root only; ignored otherwise) leaves the app's own threads - engine,
#: worker threads, the GIL they share with the event loop - as the only competitors of the event loop.
NICENESS = -10
#: Tries per phase: the box's own stalls (an idle server shows a p99 of 90 ms at times on a saturated shared
#: 2-core machine) are intermittent, a stall the app causes is not; a phase passes if one try is under the bound.
ATTEMPTS = 3


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory) -> Path:
    d = write_peft_adapter(tmp_path_factory.mktemp("big") / "big", "llama", model=build_tiny_model("llama"),
                          rank=BIG_RANK, alpha=16, seed=3, scale=0.01)
    size = (d / "adapter_model.safetensors").stat().st_size
    assert 77e6 < size < 79e6, size
    return d


def stats(samples: list[tuple[float, float, int]], windows: list[tuple[float, float]]) -> dict:
    """Latency statistics of the probes sent inside any of ``windows`` (``(t0, t1)`` in ``time.monotonic()``)."""
    mine = [s for s in samples if any(t0 <= s[0] <= t1 for t0, t1 in windows)]
    lat = [s[1] for s in mine]
    return {
        "n": len(mine), "errors": sum(1 for s in mine if s[2] != 200), "seconds": sum(t1 - t0 for t0, t1 in windows),
        "p50": percentile(lat, 50) if lat else float("nan"), "p99": percentile(lat, 99) if lat else float("nan"),
        "max": max(lat) if lat else float("nan"),
    }


def test_health_p99_under_50ms_during_big_prompt_big_upload_and_cold_load(tmp_path: Path, big_adapter: Path):
    env = {
        "STANCESERVE_MAX_LORA_RANK": str(BIG_RANK),
        "STANCESERVE_MAX_ADAPTER_BYTES": str(100 * 1000 * 1000),
        "STANCESERVE_MAX_CPU_LORAS": "0",
        "STANCESERVE_MAX_LORAS": "2",
    }
    # bodies built before any phase, so the test process does no heavy work while probing
    sentence = "Once upon a time there was a little dog who liked to run in the park. "
    content = (sentence * (4 * MIB // len(sentence) + 1))[: 4 * MIB]
    big_prompt = json.dumps({"model": BASE_MODEL, "messages": [{"role": "user", "content": content}],
                             "max_tokens": 8}).encode()
    files = adapter_files(big_adapter)
    upload_mb = sum(len(f[1][1]) for f in files) / 1e6
    chat = {"model": "big", "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}

    with start_server(tmp_path, env, niceness=NICENESS) as srv, httpx.Client(base_url=srv.base, timeout=120) as client:
        probe = start_probe(f"{srv.base}/health", tmp_path / "probe.json", interval=0.01, niceness=NICENESS)
        #: (phase, attempt) -> the windows during which its requests were in flight; only probes sent inside count
        windows: dict[tuple[str, int], list[tuple[float, float]]] = {}
        samples: list[tuple[float, float, int]] = []

        def timed(key: tuple[str, int], send):
            t0 = time.monotonic()
            r = send()
            windows.setdefault(key, []).append((t0, time.monotonic()))
            return r

        def upload(replace: bool):
            return client.post(f"/v1/adapters?replace={str(replace).lower()}", data={"name": "big"}, files=files,
                               headers=AUTH)

        def slot_loads() -> float:
            return metric(client.get("/metrics").text, "stanceserve_adapter_load_seconds_count")

        def phase_a(key):
            for _ in range(30):
                r = timed(key, lambda: client.post("/v1/chat/completions", content=big_prompt,
                                                   headers={"content-type": "application/json"}))
                assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:500]
                time.sleep(0.05)

        def phase_b(key):
            r = timed(key, lambda: upload(replace=key[1] > 0))
            assert r.status_code == 201, r.text
            assert r.json()["rank"] == BIG_RANK and r.json()["version"] == key[1] + 1

        def phase_c(key):
            if key[1] > 0:  # a new version (not measured): its first use is a cold slot load again
                assert upload(replace=True).status_code == 201
            before = slot_loads()
            texts = []
            for _ in range(3):
                r = timed(key, lambda: client.post("/v1/chat/completions", json=chat))
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 8
                texts.append(r.json()["choices"][0]["message"]["content"])
                time.sleep(0.1)
            assert len(set(texts)) == 1
            assert slot_loads() == before + 1  # the first request loaded it into a slot, the others hit

        def fresh_samples():
            # the prober only reports when stopped: restart it to read what it has so far
            nonlocal probe
            samples.extend(probe.stop())
            probe = start_probe(f"{srv.base}/health", tmp_path / "probe.json", interval=0.01, niceness=NICENESS)
            time.sleep(0.5)

        results: dict[str, list[dict]] = {}
        try:
            time.sleep(1.0)  # the prober's connections are up
            timed(("idle", 0), lambda: time.sleep(1.5))
            # FastAPI builds a router's routes (dependants, pydantic schemas, endpoint source lookup) on the
            # event loop at the first request that reaches them: a one-off stall per route, measured and
            # printed here but not part of the claims, which are about the heavy requests themselves
            r = timed(("cold routes", 0), lambda: client.post("/v1/chat/completions", json={**chat, "model": "x"}))
            assert r.status_code == 404, r.text
            r = timed(("cold routes", 0), lambda: client.post("/v1/adapters", data={"name": "x"}, headers=AUTH))
            assert r.status_code == 422 and r.json()["error"]["param"] == "files", r.text
            time.sleep(0.3)
            fresh_samples()
            for name, run in (("(a) 4 MiB prompt x30", phase_a), (f"(b) {upload_mb:.0f} MB upload", phase_b),
                              ("(c) cold adapter load x3", phase_c)):
                for attempt in range(ATTEMPTS):
                    run((name, attempt))
                    time.sleep(0.2)
                    fresh_samples()
                    s = stats(samples, windows[(name, attempt)])
                    results.setdefault(name, []).append(s)
                    if s["p99"] < P99_BOUND_S and s["n"] >= MIN_SAMPLES and not s["errors"]:
                        break
        finally:
            samples.extend(probe.stop())

    print()
    for name in ("idle", "cold routes"):
        s = stats(samples, windows[(name, 0)])
        print(f"[event-loop] {name + ' (not asserted)':<30} in flight {s['seconds']:5.2f} s  /health n={s['n']:4d}  "
              f"p50 {s['p50'] * 1e3:5.1f} ms  p99 {s['p99'] * 1e3:5.1f} ms  max {s['max'] * 1e3:6.1f} ms")
    for name, attempts in results.items():
        for i, s in enumerate(attempts):
            print(f"[event-loop] {name:<24} try {i + 1} in flight {s['seconds']:5.2f} s  /health n={s['n']:4d}  "
                  f"p50 {s['p50'] * 1e3:5.1f} ms  p99 {s['p99'] * 1e3:5.1f} ms  max {s['max'] * 1e3:6.1f} ms  "
                  f"errors {s['errors']}")
    for name, attempts in results.items():
        s = attempts[-1]
        assert s["errors"] == 0, (name, s)
        assert s["n"] >= MIN_SAMPLES, (name, s)
        assert s["p99"] < P99_BOUND_S, (
            f"{name}: /health p99 {s['p99'] * 1e3:.1f} ms >= {P99_BOUND_S * 1e3:.0f} ms in all {len(attempts)} tries"
        )
