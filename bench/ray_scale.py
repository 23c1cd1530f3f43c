"""Ray Serve scale-out: throughput and TTFT of 1 vs N engine replicas over mixed stances, printed as JSON.

Usage (from a checkout, with the ``[ray]`` and ``[bench]`` extras)::

    python bench/ray_scale.py --replicas 1 2 --concurrency 8 --requests 48 --max-tokens 32

For each replica count it starts a local Ray cluster on loopback (:func:`app.ray_serve.cluster.start_ray`),
deploys ``stanceserve`` with that many replicas (``--cpus-per-replica`` CPUs reserved and
``--torch-threads`` torch threads each) on a copy of ``--adapters`` (default: the shipped ``adapters/``), warms
each stance once, then streams ``--requests`` chat completions (greedy, ``ignore_eos``, exactly
``--max-tokens`` tokens each) at ``--concurrency``, cycling through every adapter, the base model and a blend
of the first two adapters (mixed stances). Then it stops Ray. Times are client-side seconds
(:func:`bench.http_load.one`); ``output_tok_per_s`` is all generated tokens over the wall time; ``by_replica``
counts which replica answered (``x-stanceserve-replica``). Loopback only; nothing is downloaded except the
embedded model on first use (``stanceserve fetch-model`` caches it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import EMBEDDED_MODEL, Settings
from app.ray_serve import cluster
from bench.http_load import PROMPTS, pct  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def stances_of(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))


def bodies(names: list[str], base: str, n: int, max_tokens: int) -> list[dict]:
    """``n`` streaming chat bodies cycling through each adapter, the base model and a blend of the first two."""
    kinds: list[dict] = [{"model": s} for s in names] + [{"model": base}]
    if len(names) >= 2:
        kinds.append({"model": base, "stances": {names[0]: 0.7, names[1]: 0.3}})
    return [
        {**kinds[i % len(kinds)], "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
         "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        for i in range(n)
    ]


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        replica = r.headers.get("x-stanceserve-replica")
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):  # the first token's text, not the role chunk
                    first = time.perf_counter()
    return {"ttft": (first or time.perf_counter()) - t0, "latency": time.perf_counter() - t0, "replica": replica}


async def load(url: str, work: list[dict], conc: int) -> tuple[float, list[dict]]:
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient() as client:

        async def run(body: dict) -> dict:
            async with sem:
                return await stream_one(client, url, body)

        t0 = time.perf_counter()
        res = await asyncio.gather(*(run(b) for b in work))
        return time.perf_counter() - t0, res


def measure(args: argparse.Namespace, replicas: int, store: Path) -> dict:
    port = args.port
    settings = Settings(
        model=args.model, adapters_dir=store, host="127.0.0.1", port=port, replicas=replicas,
        ray_replica_cpus=args.cpus_per_replica, torch_threads=args.torch_threads, max_batch_size=args.max_batch_size,
    )
    t0 = time.perf_counter()
    cluster.start_ray(None, num_cpus=max(args.cpus_per_replica * replicas, 1.0))
    try:
        cluster.deploy(settings)
        startup = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}"
        base = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
        names = stances_of(store)
        warm = bodies(names, base, len(names) + 2, 4)
        asyncio.run(load(url, warm, 1))
        time.sleep(2.0)  # the routers learn each stance's home (see tests/ray)
        wall, res = asyncio.run(load(url, bodies(names, base, args.requests, args.max_tokens), args.concurrency))
    finally:
        cluster.shutdown()
    ttft = [r["ttft"] for r in res]
    return {
        "replicas": replicas, "startup_s": round(startup, 1), "requests": len(res), "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "wall_s": round(wall, 2),
        "output_tok_per_s": round(len(res) * args.max_tokens / wall, 2),
        "ttft_s_p50": round(pct(ttft, 0.5), 3), "ttft_s_p99": round(pct(ttft, 0.99), 3),
        "latency_s_p50": round(statistics.median(r["latency"] for r in res), 3),
        "by_replica": dict(Counter(r["replica"] for r in res)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--adapters", type=Path, default=REPO / "adapters", help="copied to a temporary store")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--port", type=int, default=8765)
    a = ap.parse_args()
    if a.model is None:
        a.model = EMBEDDED_MODEL
    out = {"model": a.model, "adapters": str(a.adapters), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        shutil.copytree(a.adapters, store, ignore=shutil.ignore_patterns("*.md"))
        for n in a.replicas:
            out["runs"].append(measure(a, n, store))
            print(json.dumps(out["runs"][-1]), file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
