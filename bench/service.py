"""The service end to end over HTTP, as its clients see it: streamed chat completions against ``stanceserve serve``.

:func:`service_scenario` starts the service of this checkout (``stanceserve serve``, in a child process, on a free
loopback port) over an adapter store of random rank-R adapters, and streams the load of
:mod:`bench.http_load` at it: ``streams`` concurrent chat completions (the load test's short questions, greedy,
``ignore_eos``, ``max_tokens`` each), for each stance mix, the mixes interleaved round by round:

* ``base``: the base model; ``one_adapter``: every request on the first adapter;
* ``distinct_adapters``: request ``i`` on adapter ``i mod adapters``;
* ``blend3``: request ``i`` on an equal blend of adapters ``i``, ``i+1`` and ``i+2`` (mod ``adapters``).

Per mix it reports the median round's output tok/s, and that round's client-side TTFT and inter-token latency p50
and p99, in seconds. The server's peak PSS (proportional set size: its resident memory, shared pages split among
the processes sharing them), sampled every 50 ms over every round, is reported once, in bytes.

Everything a request costs counts here (HTTP, JSON, tokenisation, detokenisation, SSE), unlike the engine scenarios
of :mod:`bench.scenarios`. Only models the service can load run it: the embedded model or a local path, not the
``--dummy-weights`` configs. Nothing here asserts a target; ``stanceserve bench --scenarios service`` prints it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.http_load import PROMPTS, measure
from bench.models import save_peft_folder
from bench.scenarios import sampled_peak

#: the stance mixes, in the order each round runs them
MIXES = ("base", "one_adapter", "distinct_adapters", "blend3")
#: seconds the service may take to start answering (model load, kernel build on a cold cache)
START_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pss(pid: int) -> int:
    """The proportional set size of process ``pid``, in bytes (0 where the OS does not report it)."""
    import psutil  # [bench] extra

    try:
        return int(getattr(psutil.Process(pid).memory_full_info(), "pss", 0))
    except (psutil.Error, OSError):
        return 0


@contextmanager
def running_service(model: str | None, adapters_dir: Path, *, dtype: torch.dtype, device: str,
                    log: Path) -> Iterator[tuple[str, int]]:
    """``stanceserve serve`` of this checkout on a free loopback port, until the block ends.

    Args:
        model: ``--model`` (``None``: the embedded model).
        adapters_dir: its adapter store.
        dtype, device: what it serves in (the benchmark's own).
        log: where its output goes.

    Yields:
        ``(base URL, process id)`` once ``GET /ready`` answers 200.

    Raises:
        RuntimeError: the process ended, its model failed to load, or it was not ready within
            :data:`START_TIMEOUT_S` (its log says why).
    """
    port = _free_port()
    env = dict(os.environ, STANCESERVE_ADAPTERS_DIR=str(adapters_dir), STANCESERVE_DEVICE=device,
               STANCESERVE_DTYPE=str(dtype).removeprefix("torch."),
               PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH")) if p))
    if model is not None:
        env["STANCESERVE_MODEL"] = model
    cmd = [sys.executable, "-c", "from app.cli import main; main()", "serve",
           "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode} before answering; see {log}")
            try:
                r = httpx.get(f"{url}/ready", timeout=2.0)
                if r.status_code == 200:
                    break
                if "failed to load" in r.text:
                    why = r.json()["error"]["message"]
                    raise RuntimeError(f"the service could not load its model ({why}); see {log}")
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not answer within {START_TIMEOUT_S:.0f} s; see {log}")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _body(mix: str, i: int, base: str, names: list[str], max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": base, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    if mix == "one_adapter":
        body["model"] = names[0]
    elif mix == "distinct_adapters":
        body["model"] = names[i % len(names)]
    elif mix == "blend3":
        body["stances"] = {names[(i + k) % len(names)]: 1 / 3 for k in range(3)}
    return body


def service_scenario(bm: Any, adapters: list[Any], *, model: str | None = None, streams: int = 64,
                     max_tokens: int = 32, rank: int = 16, repeats: int = 1,
                     workdir: Path | None = None) -> dict[str, Any]:
    """The service under ``streams`` concurrent chat streams per mix (see the module docstring).

    Args:
        bm: the benchmark's model (:class:`~bench.models.BenchModel`): its dtype and device are the service's.
        adapters: random adapters of ``bm``'s shapes (:func:`~bench.models.random_adapter`), written to the
            service's store as ``a0``, ``a1``...; at least 3 (for the blends).
        model: the service's ``--model`` (``None``: the embedded model); it must be ``bm``'s.
        repeats: rounds; each runs every mix once, and the median round per mix (by tok/s) is reported.

    Returns:
        ``streams``, ``max_tokens``, ``adapters``, ``peak_pss_bytes``, and per mix the median round
        (``output_tok_per_s``, ``ttft_s_p50``/``p99``, ``itl_s_p50``/``p99``, ``wall_s``) with
        ``output_tok_per_s_all``.

    Raises:
        ValueError: fewer than 3 adapters. RuntimeError: the service did not start (see :func:`running_service`).
    """
    if len(adapters) < 3:
        raise ValueError("the blend mix needs at least 3 adapters")
    work = Path(workdir or tempfile.mkdtemp(prefix="stanceserve-service-"))
    store = work / "service-store"
    names = [f"a{i}" for i in range(len(adapters))]
    for name, a in zip(names, adapters):
        save_peft_folder(a, store / name, rank=rank, alpha=2.0 * rank)
    device = "cuda" if bm.device.type == "cuda" else "cpu"
    with running_service(model, store, dtype=bm.dtype, device=device, log=work / "service.log") as (url, pid):
        listed = httpx.get(f"{url}/v1/models").json()["data"]
        base = next(m["id"] for m in listed if not m.get("parent"))
        missing = set(names) - {m["id"] for m in listed}
        if missing:
            raise RuntimeError(f"the service did not register adapters {sorted(missing)}; see {work / 'service.log'}")
        with sampled_peak(lambda: _pss(pid), 0.05) as pss:
            for mix in MIXES:  # warm-up: every adapter read from the store, the kernels at small batches
                asyncio.run(measure(url, [_body(mix, i, base, names, 2) for i in range(max(4, len(names)))]))
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MIXES}
            for _ in range(repeats):
                for mix in MIXES:
                    bodies = [_body(mix, i, base, names, max_tokens) for i in range(streams)]
                    runs[mix].append(asyncio.run(measure(url, bodies)))
    out: dict[str, Any] = {"streams": streams, "max_tokens": max_tokens, "adapters": len(names), "rank": rank,
                           "peak_pss_bytes": pss[0] or None}
    for mix, rs in runs.items():
        ordered = sorted(rs, key=lambda r: r["output_tok_per_s"])
        out[mix] = dict(ordered[len(ordered) // 2], output_tok_per_s_all=[r["output_tok_per_s"] for r in rs])
    base_tps = out["base"]["output_tok_per_s"]
    out["summary"] = ({f"{m}_vs_base": round(out[m]["output_tok_per_s"] / base_tps, 3) for m in MIXES[1:]}
                      if base_tps else {})
    out["summary"]["median_tok_per_s"] = statistics.median(out[m]["output_tok_per_s"] for m in MIXES)
    return out
