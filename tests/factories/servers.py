"""Real server processes on 127.0.0.1: a free port, start-up until ``GET /ready`` answers 200, and tear-down.

:func:`run_server` runs any ``python ... serve`` command line (``app.cli`` or ``tests.server``); what the
server serves, and its settings, are the caller's (``STANCESERVE_*`` in ``env``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.factories.models import REPO

#: ``python`` arguments that run the ``stanceserve`` command line.
APP_CLI = ["-c", "from app.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preexec(niceness: int | None = None):
    """A preexec_fn: SIGTERM the child when the test process dies (so no server outlives a crashed run), and
    set its scheduling priority to ``niceness`` when given (best effort: a negative value needs root)."""

    def run() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
        except Exception:
            pass
        if niceness is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
            except OSError:
                pass

    return run


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Terminate ``proc`` if it still runs, and kill it if it has not exited within ``grace_s`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def run_server(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, ready_timeout: float = 120.0,
    niceness: int | None = None,
) -> Iterator[Server]:
    """Run ``python *args --port N`` (N free) from the repository root until the ``with`` block ends.

    Yields once ``GET /ready`` answers 200; RuntimeError (with the log's tail) if the process exits first or
    is not ready within ``ready_timeout`` seconds. Terminated at the end (killed after 20 s).

    Args:
        log_path: the server's stdout and stderr.
        env: environment variables over this process's.
        niceness: scheduling priority of the server process (best effort; see :func:`preexec`).
    """
    import httpx

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, *args, "--port", str(port)],
        env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
        preexec_fn=preexec(niceness),
    )
    server = Server(f"http://127.0.0.1:{port}", proc, Path(log_path))
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > ready_timeout:
                raise RuntimeError(f"server not ready in {ready_timeout} s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        stop_process(proc)
        log.close()
