"""Load, queue overflow and soak tests against a real server process (the tiny random Llama of tests/server.py).

* 200 concurrent streaming clients over the base model, two uploaded adapters and a blend, with
  10% bad requests: every good stream yields exactly the text the same request gave alone, every
  bad one its 4xx with the JSON error contract, nothing >= 500, and the gauges and the server's RSS
  come back afterwards.
* Queue overflow: max_waiting 4, max_batch_size 2, a burst of 40: the overflow gets 429 +
  Retry-After + ``queue_full``, the accepted requests finish.
* Soak: 20,000 generated tokens with no /metrics scrape in between; RSS growth after warm-up stays
  bounded and a final scrape works and counts every token.

Numbers (latencies, RSS, status counts) are printed; run with ``-s`` to see them. All traffic goes
to 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.factories import BASE_MODEL, calm_and_bold, chat_body as one_message_chat, metric
from tests.server import percentile, rss, start_server, upload

pytestmark = pytest.mark.slow

MB = 1024 * 1024
PROMPTS = ["Once upon a time", "Tom and Lily went to the park"]
N_TOKENS = 8
N_CLIENTS = 200
#: Bound on the server's RSS after the 200-client load minus its steady level after a warm-up (a quarter
#: of the same mix). Measured on a shared 2-core box: about +11 MB (RSS ~455 MB).
LOAD_RSS_BOUND = 64 * MB
#: Bound on the server's RSS growth over the 20,000-token soak, after a warm-up of the same shape
#: (16 x 500 tokens, 8 concurrent). Measured: +0.1 to +0.9 MB whatever the number of rounds (no trend), and
#: on 2026-12-02 the same code (ee6510d) gave +0.32 MB and +8.02 MB in two runs back to back: a one-off step of
#: 8 MiB (the allocator taking a new region, not a trend), which the old 8 MB bound failed on. So the bound
#: allows one such step: this catches a leak of >= ~630 B/token, not the old gauge's 88 B/token (1.8 MB over
#: 20,000 tokens); the gauge's own bound is unit-tested in tests/app/test_metrics.py.
SOAK_RSS_BOUND = 12 * MB


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    return calm_and_bold(tmp_path_factory.mktemp("load-adapters"))


# ---------------------------------------------------------------------------- helpers
def chat_body(model: str, prompt: str, **extra) -> dict:
    return one_message_chat(model, prompt, max_tokens=N_TOKENS, temperature=0, ignore_eos=True, **extra)


#: good request kinds: name -> body (streaming is added when sent)
GOOD = {
    f"{kind}/{i}": chat_body(
        BASE_MODEL if kind in ("base", "blend") else kind, prompt,
        **({"stances": {"calm": 0.7, "bold": 0.3}} if kind == "blend" else {}),
    )
    for i, prompt in enumerate(PROMPTS)
    for kind in ("base", "calm", "bold", "blend")
}

#: bad request kinds: name -> (body, expected status, expected code, expected param)
BAD = {
    "blend-weight-1e30": (chat_body(BASE_MODEL, PROMPTS[0], stances={"calm": 1e30, "bold": 0.5}),
                          422, "invalid_blend", "stances.calm"),
    "seed-2**64+1": (chat_body(BASE_MODEL, PROMPTS[0], seed=2**64 + 1), 422, "invalid_request", "seed"),
    "unknown-model": (chat_body("no-such-stance", PROMPTS[0]), 404, "adapter_not_found", "model"),
    "functions": (chat_body(BASE_MODEL, PROMPTS[0], functions=[{"name": "f"}]),
                  400, "unsupported_parameter", "functions"),
    "bad-regex": (chat_body(BASE_MODEL, PROMPTS[0], guided_regex="a(b"), 400, "invalid_constraint", "guided_regex"),
    "over-context": (chat_body(BASE_MODEL, "hello world " * 400), 400, "context_length_exceeded", "messages"),
}


async def stream_chat(client: httpx.AsyncClient, base: str, body: dict) -> dict:
    """POST a streaming chat; the outcome: status, headers, text (200) or error body (else), timings."""
    t0 = time.monotonic()
    out: dict = {"t0": t0}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        out["status"] = r.status_code
        out["headers"] = dict(r.headers)
        if r.status_code != 200:
            raw = await r.aread()
            out["latency"] = time.monotonic() - t0
            try:
                out["error"] = json.loads(raw)
            except ValueError:
                out["error"] = {"unparsed": raw.decode(errors="replace")}
            return out
        parts, finish, usage, done, errors, ttft = [], [], None, False, [], None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                errors.append(chunk["error"])
                continue
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                content = c.get("delta", {}).get("content")
                if content:
                    ttft = ttft if ttft is not None else time.monotonic() - t0
                    parts.append(content)
                if c.get("finish_reason"):
                    finish.append(c["finish_reason"])
    out.update(text="".join(parts), finish=finish, usage=usage, done=done, errors=errors, ttft=ttft,
               latency=time.monotonic() - t0)
    return out


def check_error_contract(res: dict, status: int, code: str, param: str | None) -> None:
    assert res["status"] == status, res
    assert res["headers"].get("content-type", "").startswith("application/json"), res["headers"]
    err = res["error"].get("error")
    assert isinstance(err, dict), res["error"]
    assert {"message", "type", "code", "param"} <= err.keys(), err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str) and err["type"], err
    assert (err["code"], err["param"]) == (code, param), err


def scrape(base: str) -> str:
    r = httpx.get(f"{base}/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def wait_idle(base: str, timeout: float = 30.0) -> str:
    """Poll /metrics until the running and waiting gauges are both 0; returns that scrape."""
    t0 = time.monotonic()
    while True:
        text = scrape(base)
        running = metric(text, "stanceserve_requests_running")
        waiting = metric(text, "stanceserve_requests_waiting")
        if running == 0 and waiting == 0:
            return text
        assert time.monotonic() - t0 < timeout, f"gauges stuck: running={running} waiting={waiting}"
        time.sleep(0.1)


def settled_rss(pid: int, seconds: float = 2.0) -> int:
    """The server's RSS after ``seconds`` of quiet (the last of a few samples)."""
    end = time.monotonic() + seconds
    value = rss(pid)
    while time.monotonic() < end:
        time.sleep(0.25)
        value = rss(pid)
    return value


class RSSSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def ms(x: float) -> str:
    return f"{x * 1e3:.0f} ms"


# ---------------------------------------------------------------------------- 1. 200 concurrent streaming clients
def test_200_streaming_clients_mixed_with_bad_requests(tmp_path: Path, adapter_dirs):
    with start_server(tmp_path, {"STANCESERVE_MAX_MODEL_LEN": "512"}) as srv:
        for name, d in adapter_dirs.items():
            r = upload(srv.base, name, d)
            assert r.status_code == 201, r.text

        async def run(bodies: list[tuple[str, dict]]) -> list[dict]:
            limits = httpx.Limits(max_connections=N_CLIENTS + 16, max_keepalive_connections=N_CLIENTS + 16)
            async with httpx.AsyncClient(timeout=httpx.Timeout(180, connect=30), limits=limits) as client:
                results = await asyncio.gather(*(stream_chat(client, srv.base, b) for _, b in bodies))
            return [{**res, "kind": kind} for (kind, _), res in zip(bodies, results)]

        # each good kind alone, one at a time: the reference outputs
        alone = {}
        for kind, body in GOOD.items():
            (res,) = asyncio.run(run([(kind, body)]))
            assert res["status"] == 200 and res["done"] and not res["errors"], res
            assert res["usage"]["completion_tokens"] == N_TOKENS and res["finish"] == ["length"], res
            alone[kind] = res["text"]
        for i in range(len(PROMPTS)):  # the stances really differ, so matching the alone output means something
            assert len({alone[f"{k}/{i}"] for k in ("base", "calm", "bold", "blend")}) == 4, alone

        # the mix: every 10th request is bad (4 of each bad kind), the others cycle over the good kinds
        good_kinds, bad_kinds = list(GOOD), list(BAD)
        mix: list[tuple[str, dict]] = []
        for i in range(N_CLIENTS):
            if i % 10 == 9:
                kind = bad_kinds[(i // 10) % len(bad_kinds)]
                mix.append((kind, BAD[kind][0]))
            else:
                kind = good_kinds[i % len(good_kinds)]
                mix.append((kind, GOOD[kind]))

        # warm-up: a quarter of the mix, then the steady RSS
        asyncio.run(run(mix[: N_CLIENTS // 4]))
        wait_idle(srv.base)
        rss_steady = settled_rss(srv.pid)

        t0 = time.monotonic()
        with RSSSampler(srv.pid) as sampler:
            results = asyncio.run(run(mix))
        wall = time.monotonic() - t0
        idle_scrape = wait_idle(srv.base)
        rss_after = settled_rss(srv.pid)

        by_status = collections.Counter(r["status"] for r in results)
        good = [r for r in results if r["kind"] in GOOD]
        bad = [r for r in results if r["kind"] in BAD]
        lat = [r["latency"] for r in good]
        ttft = [r["ttft"] for r in good if r["ttft"] is not None]
        print(
            f"\n[load] {N_CLIENTS} streaming clients ({len(good)} good, {len(bad)} bad) in {wall:.1f} s; "
            f"status counts {dict(sorted(by_status.items()))}\n"
            f"[load] good requests: latency p50 {ms(percentile(lat, 50))} p99 {ms(percentile(lat, 99))} "
            f"max {ms(max(lat))}; TTFT p50 {ms(percentile(ttft, 50))} p99 {ms(percentile(ttft, 99))}\n"
            f"[load] server RSS: steady after warm-up {rss_steady / MB:.1f} MB, peak during load "
            f"{sampler.peak / MB:.1f} MB, after {rss_after / MB:.1f} MB (delta {(rss_after - rss_steady) / MB:+.1f} MB, "
            f"bound +{LOAD_RSS_BOUND / MB:.0f} MB)"
        )

        assert not [r for r in results if r["status"] >= 500], "5xx responses"
        mismatched = []
        for r in good:
            assert r["status"] == 200 and r["done"] and not r["errors"], r
            assert r["finish"] == ["length"] and r["usage"]["completion_tokens"] == N_TOKENS, r
            if r["text"] != alone[r["kind"]]:
                mismatched.append((r["kind"], r["text"], alone[r["kind"]]))
        assert not mismatched, f"{len(mismatched)} of {len(good)} outputs differ from alone: {mismatched[:5]}"
        for r in bad:
            _, status, code, param = BAD[r["kind"]]
            check_error_contract(r, status, code, param)
        assert metric(idle_scrape, "stanceserve_requests_running") == 0
        assert metric(idle_scrape, "stanceserve_requests_waiting") == 0
        assert rss_after - rss_steady < LOAD_RSS_BOUND


# ---------------------------------------------------------------------------- 2. queue overflow
def test_queue_overflow_gets_429_with_retry_after(tmp_path: Path):
    n, max_tokens = 40, 64
    env = {"STANCESERVE_MAX_WAITING": "4", "STANCESERVE_MAX_BATCH_SIZE": "2"}
    with start_server(tmp_path, env) as srv:

        async def one(client: httpx.AsyncClient, i: int) -> dict:
            body = {**chat_body(BASE_MODEL, PROMPTS[i % 2]), "max_tokens": max_tokens}
            if i % 2:  # half streaming: a 429 must come before any SSE starts
                return {**await stream_chat(client, srv.base, body), "stream": True}
            t0 = time.monotonic()
            r = await client.post(f"{srv.base}/v1/chat/completions", json=body)
            return {"status": r.status_code, "headers": dict(r.headers), "body": r.json(),
                    "error": r.json() if r.status_code != 200 else None, "latency": time.monotonic() - t0,
                    "stream": False}

        async def burst() -> list[dict]:
            limits = httpx.Limits(max_connections=n + 4)
            async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=30), limits=limits) as client:
                return await asyncio.gather(*(one(client, i) for i in range(n)))

        t0 = time.monotonic()
        results = asyncio.run(burst())
        wall = time.monotonic() - t0
        by_status = collections.Counter(r["status"] for r in results)
        retry_after = collections.Counter(r["headers"].get("retry-after") for r in results if r["status"] == 429)
        print(f"\n[overflow] burst of {n} (max_waiting 4, max_batch_size 2) in {wall:.1f} s: status counts "
              f"{dict(sorted(by_status.items()))}; Retry-After values {dict(retry_after)}")

        assert set(by_status) <= {200, 429}, by_status
        assert by_status[429] >= 1 and by_status[200] >= 4, by_status
        if by_status[429] > n // 2:  # then both kinds were refused: a streaming 429 comes before any SSE
            assert {r["stream"] for r in results if r["status"] == 429} == {True, False}
        for r in results:
            if r["status"] == 429:
                check_error_contract(r, 429, "queue_full", None)
                assert r["headers"]["retry-after"].isdigit() and int(r["headers"]["retry-after"]) >= 1, r["headers"]
            elif r["stream"]:
                assert r["done"] and not r["errors"] and r["finish"] == ["length"], r
                assert r["usage"]["completion_tokens"] == max_tokens, r
            else:
                choice = r["body"]["choices"][0]
                assert choice["finish_reason"] == "length" and r["body"]["usage"]["completion_tokens"] == max_tokens
        text = wait_idle(srv.base)
        assert metric(text, "stanceserve_requests_total", status="rejected") == by_status[429]
        assert metric(text, "stanceserve_requests_total", status="length") == by_status[200]
        # and it serves normally afterwards
        r = httpx.post(f"{srv.base}/v1/chat/completions", json=chat_body(BASE_MODEL, PROMPTS[0]), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == N_TOKENS


# ---------------------------------------------------------------------------- 3. soak
def test_soak_20000_tokens_without_scrape_keeps_memory_bounded(tmp_path: Path):
    n_requests, max_tokens, concurrency, warmup = 40, 500, 8, 16
    with start_server(tmp_path) as srv:

        async def run(count: int) -> list[int]:
            sem = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30)) as client:

                async def one() -> int:
                    async with sem:
                        # a completion (no chat template) keeps prompt + 500 tokens inside the tiny model's 512
                        r = await client.post(f"{srv.base}/v1/completions", json={
                            "model": BASE_MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": True,
                        })
                        assert r.status_code == 200, r.text
                        return r.json()["usage"]["completion_tokens"]

                return await asyncio.gather(*(one() for _ in range(count)))

        t0 = time.monotonic()
        assert asyncio.run(run(warmup)) == [max_tokens] * warmup
        t_warm = time.monotonic() - t0
        rss_steady = settled_rss(srv.pid)
        t0 = time.monotonic()
        with RSSSampler(srv.pid, interval=0.5) as sampler:
            assert asyncio.run(run(n_requests)) == [max_tokens] * n_requests
        wall = time.monotonic() - t0
        rss_after = settled_rss(srv.pid)
        tokens = n_requests * max_tokens
        text = scrape(srv.base)  # the first scrape of the server's life
        growth = rss_after - rss_steady
        print(
            f"\n[soak] warm-up {warmup * max_tokens} tokens in {t_warm:.1f} s; soak {tokens} tokens "
            f"({n_requests} x {max_tokens}, {concurrency} concurrent) in {wall:.1f} s ({tokens / wall:.0f} tok/s), "
            f"no scrape in between\n"
            f"[soak] server RSS: after warm-up {rss_steady / MB:.1f} MB, peak {sampler.peak / MB:.1f} MB, after soak "
            f"{rss_after / MB:.1f} MB (growth {growth / MB:+.2f} MB = {growth / tokens:.0f} B/token; "
            f"bound +{SOAK_RSS_BOUND / MB:.0f} MB)"
        )
        assert growth < SOAK_RSS_BOUND
        total = (warmup + n_requests) * max_tokens
        assert metric(text, "stanceserve_generation_tokens_total", stance="base") == total
        assert metric(text, "stanceserve_requests_total", stance="base", status="length") == warmup + n_requests
        assert metric(text, "stanceserve_requests_running") == 0 and metric(text, "stanceserve_requests_waiting") == 0
        assert "stanceserve_generation_tokens_per_second" in text
        assert scrape(srv.base)  # and again
