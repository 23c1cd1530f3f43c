"""A real stanceserve server process on a tiny random Llama, for load and latency tests.

Two entry points, both run as ``python -m tests.server``:

* ``python -m tests.server serve --port N``: the service (``create_app`` + uvicorn, as
  ``stanceserve serve`` runs it) on the tiny 2-layer Llama of :mod:`tests.factories` with the
  vendored stories260k tokenizer (nothing downloaded, start-up in a few seconds). Every other
  setting comes from the ``STANCESERVE_*`` environment variables.
* ``python -m tests.server probe --url URL --interval S --out FILE``: an open-loop prober that
  sends ``GET URL`` every ``S`` seconds (whether or not earlier probes have returned, so a
  stalled server yields many slow samples rather than one) until its stdin closes, then
  writes ``[[t_send, latency_s, status], ...]`` (``time.monotonic()`` seconds, which is
  system-wide on Linux, so comparable with the test process's clock) as JSON to ``FILE``.
  Run in its own process so the test process's own work never inflates the latencies.

The test-side helpers (:func:`start_server`, :func:`start_probe`, :func:`rss`, :func:`upload`,
:func:`percentile`) start, drive and measure these processes; start-up, ready wait and tear-down are
:func:`tests.factories.run_server`'s. All traffic is to 127.0.0.1. :mod:`tests.factories` (and so torch) is
imported inside the functions that need it, so the prober process starts light.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.factories import Server

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "load-test-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


# ---------------------------------------------------------------------------- the server process
def serve(host: str, port: int) -> None:
    import logging

    import torch
    import uvicorn

    from app.config import Settings
    from app.main import create_app
    from tests.factories import tiny_factory

    # One intra-op thread: the tiny model gains nothing from more, and on a small shared machine OpenMP
    # threads spinning against other processes make every step ~10x slower (measured: 200 tokens in 0.5 s
    # with 1 thread, 4.5 s with 2, on 2 busy cores). TEST_SERVER_TORCH_THREADS overrides it.
    torch.set_num_threads(int(os.environ.get("TEST_SERVER_TORCH_THREADS", "1")))
    settings = Settings()
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    uvicorn.run(
        create_app(settings, model_factory=tiny_factory), host=host, port=port, proxy_headers=False,
        log_level=settings.log_level.lower(), access_log=False,
    )


# ---------------------------------------------------------------------------- the prober process
def probe(url: str, interval: float, out: Path, timeout: float = 10.0) -> None:
    import asyncio
    import threading

    import httpx

    stop = threading.Event()

    def wait_stdin() -> None:  # the test closes our stdin (or dies) -> stop
        try:
            sys.stdin.read()
        finally:
            stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    samples: list[list[float]] = []

    async def main() -> None:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

            async def one() -> None:
                t0 = time.monotonic()
                try:
                    status = (await client.get(url)).status_code
                except httpx.HTTPError:
                    status = -1
                samples.append([t0, time.monotonic() - t0, status])

            tasks: set[asyncio.Task] = set()
            nxt = time.monotonic()
            while not stop.is_set():
                t = asyncio.create_task(one())
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                nxt += interval
                delay = nxt - time.monotonic()
                if delay < 0:  # we fell behind (our own process was starved): skip the missed ticks
                    nxt = time.monotonic()
                    delay = 0
                await asyncio.sleep(delay)
            if tasks:
                await asyncio.wait(tasks, timeout=timeout + 1)

    asyncio.run(main())
    out.write_text(json.dumps(sorted(samples)))


# ---------------------------------------------------------------------------- test-side helpers
@contextlib.contextmanager
def start_server(
    workdir: Path, env: dict[str, str] | None = None, ready_timeout: float = 120.0, niceness: int | None = None
) -> Iterator[Server]:
    """Run ``python -m tests.server serve`` on a free port until the ``with`` block ends (see :func:`run_server`).

    Args:
        workdir: holds the server log (``server.log``) and, unless ``env`` names another, the adapter store.
        env: extra environment variables (``STANCESERVE_*`` settings).
        niceness: scheduling priority of the server process (best effort; see :func:`tests.factories.preexec`).
    """
    from tests.factories import run_server

    workdir.mkdir(parents=True, exist_ok=True)
    full_env = {
        "STANCESERVE_ADMIN_KEY": ADMIN_KEY,
        "STANCESERVE_ADAPTERS_DIR": str(workdir / "store"),
        "STANCESERVE_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": os.environ.get("TEST_SERVER_TORCH_THREADS", "1"),  # see serve()
        **(env or {}),
    }
    with run_server(["-m", "tests.server", "serve"], workdir / "server.log", full_env, ready_timeout, niceness) as srv:
        yield srv


@dataclass
class Probe:
    proc: subprocess.Popen
    out: Path

    def stop(self, timeout: float = 30.0) -> list[tuple[float, float, int]]:
        """Stop probing; the samples ``(t_send, latency_s, status)``, ``t_send`` in ``time.monotonic()`` seconds."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(timeout)
        return [tuple(s) for s in json.loads(self.out.read_text())]


def start_probe(url: str, out: Path, interval: float = 0.01, niceness: int | None = None) -> Probe:
    """Start ``python -m tests.server probe`` against ``url`` (stop it with :meth:`Probe.stop`)."""
    from tests.factories import preexec

    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.server", "probe", "--url", url, "--interval", str(interval), "--out", str(out)],
        stdin=subprocess.PIPE, cwd=REPO, preexec_fn=preexec(niceness),
    )
    return Probe(proc, out)


def rss(pid: int) -> int:
    """Resident set size of process ``pid``, in bytes."""
    import psutil

    return psutil.Process(pid).memory_info().rss


def upload(base: str, name: str, adapter_dir: Path, timeout: float = 120.0):
    """``POST /v1/adapters`` of the peft folder ``adapter_dir`` as ``name``; returns the httpx response."""
    import httpx

    from tests.factories import adapter_files

    return httpx.post(f"{base}/v1/adapters", data={"name": name}, files=adapter_files(adapter_dir), headers=AUTH,
                      timeout=timeout)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank, ``0 < q <= 100``) of ``values``."""
    import math

    v = sorted(values)
    return v[max(0, math.ceil(q / 100 * len(v)) - 1)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.server")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the service on the tiny model (settings from STANCESERVE_*)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    p = sub.add_parser("probe", help="GET --url every --interval seconds until stdin closes")
    p.add_argument("--url", required=True)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.host, args.port)
    else:
        probe(args.url, args.interval, args.out)


if __name__ == "__main__":
    main()
