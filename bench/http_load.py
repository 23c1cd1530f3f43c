"""Load a running stanceserve over HTTP and print TTFT, inter-token latency and throughput as JSON.

Usage::

    python bench/http_load.py --url http://127.0.0.1:8000 --concurrency 1 8 --requests 8 --max-tokens 32 \
        [--model NAME] [--stances '{"a": 0.5, "b": 0.5}']

Each request streams a chat completion (greedy, ``ignore_eos`` so every request
makes exactly ``--max-tokens`` tokens). Bounded: ``--requests`` per
concurrency level, loopback only by default. Times are client-side, in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

PROMPTS = [
    "Explain why the sky is blue.",
    "Give me three tips for learning to cook.",
    "What is a prime number?",
    "Describe a good morning routine.",
    "Why do cats purr?",
    "How does a bicycle stay upright?",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery.",
]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    times: list[float] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": times[0] - t0 if times else float("nan"), "itl": [b - a for a, b in zip(times, times[1:])],
            "latency": end - t0, "chunks": len(times)}


async def measure(url: str, bodies: list[dict], concurrency: int | None = None) -> dict:
    """Stream every request of ``bodies`` (chat completion bodies with ``ignore_eos``), at most ``concurrency`` at
    once (default: all), and measure: wall time, output tok/s (each request makes its ``max_tokens``), per-request
    tok/s p50, TTFT and inter-token latency p50/p99 (seconds, client-side; ``None`` without two tokens)."""
    sem = asyncio.Semaphore(concurrency or len(bodies))
    async with httpx.AsyncClient() as client:

        async def run(body: dict) -> dict:
            async with sem:
                return await one(client, url, body)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(run(b) for b in bodies))
        wall = time.perf_counter() - t0
    tokens = sum(b["max_tokens"] for b in bodies)
    ttft = [r["ttft"] for r in res]
    itl = [x for r in res for x in r["itl"]]
    return {
        "requests": len(bodies), "output_tokens": tokens, "wall_s": round(wall, 3),
        "output_tok_per_s": round(tokens / wall, 2),
        "per_request_tok_per_s_p50": round(statistics.median(b["max_tokens"] / r["latency"]
                                                             for b, r in zip(bodies, res)), 2),
        "ttft_s_p50": round(pct(ttft, 0.5), 4), "ttft_s_p99": round(pct(ttft, 0.99), 4),
        "itl_s_p50": round(pct(itl, 0.5), 4) if itl else None, "itl_s_p99": round(pct(itl, 0.99), 4) if itl else None,
    }


async def level(url: str, model: str, stances: dict | None, conc: int, n: int, max_tokens: int) -> dict:
    bodies = []
    for i in range(n):
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        if stances:
            body["stances"] = stances
        bodies.append(body)
    return {"concurrency": conc, "max_tokens": max_tokens, **await measure(url, bodies, conc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="default: the server's base model")
    ap.add_argument("--stances", default=None, help="JSON blend")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    model = a.model or httpx.get(f"{a.url}/v1/models").json()["data"][0]["id"]
    stances = json.loads(a.stances) if a.stances else None
    out = {"url": a.url, "model": model, "stances": stances, "levels": []}
    for c in a.concurrency:
        out["levels"].append(asyncio.run(level(a.url, model, stances, c, max(a.requests, c), a.max_tokens)))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
