"""The documented examples: find them in the pages, and run a page's examples against a real app on the tiny model.

Every ```` ```bash ````, ```` ```sh ```` and ```` ```python ```` block of ``README.md`` and ``docs/**/*.md`` carries
a marker on the line above it (blank lines between are allowed):

* ``<!-- run -->``: the block runs, in page order, against a server of the page's own (bash under
  ``set -euo pipefail``; a ``curl`` that gets an HTTP status of 400 or more fails it);
* ``<!-- run: errors-ok -->``: the same, but error statuses are what the block shows;
* ``<!-- norun: REASON -->``: the block is not run; REASON must be one of :data:`NORUN_REASONS`, the documented
  exceptions.

What a run block sees (:class:`DocsWorld`): the server at ``localhost:8000`` / ``127.0.0.1:8000`` (rewritten to
the real port), whose base model is called ``SmolLM2-135M-Instruct`` (the tiny random Llama of
:mod:`tests.factories`) and which has the three shipped stance names registered (tiny adapters of those names);
``$STANCESERVE_ADMIN_KEY``; a working folder holding a peft adapter folder ``my-stance/`` and a ``training`` link
to the checkout's training data; ``stanceserve`` on the ``PATH`` (the checkout's CLI; ``train``, ``eval`` and
``export-blend`` get ``--base`` the tiny model unless they name one); ``curl`` on the ``PATH`` (:data:`CURL_SHIM`,
the subset of curl the docs use, over httpx, so no curl binary is needed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from tests.factories import KEY, free_port, save_tiny_base, tiny_factory, write_peft_adapter

REPO = Path(__file__).resolve().parents[2]

#: The documented exceptions: blocks that are not run, and why.
NORUN_REASONS = {
    "long-running": "starts a server that runs until stopped (`make serve`), the whole test suite (`make test`), "
                    "or an evaluation that takes hours on the real model",
    "install": "installs torch and the project from package indexes (GBs of downloads)",
    "docker": "needs a Docker daemon and pulls base images",
    "ray-cluster": "starts Ray clusters, some across several hosts",
}

#: The base model's name in the docs.
DOCS_MODEL = "SmolLM2-135M-Instruct"
#: The stances the docs use, registered (as tiny adapters) on every page's server.
DOCS_STANCES = ("curious-uncertainty", "confident-expertise", "engaged-difficulty")

FENCE = re.compile(r"^```(bash|sh|python)\s*$")
MARKER = re.compile(r"^<!-- (run|run: errors-ok|norun: ([a-z-]+)) -->$")


@dataclass(frozen=True)
class Example:
    """One fenced block of a page."""

    page: str  #: path relative to the repository root
    line: int  #: line of the opening fence (1-based)
    lang: str  #: bash, sh or python
    code: str
    marker: str | None  #: "run", "run: errors-ok", "norun: REASON", or None when missing

    @property
    def runs(self) -> bool:
        return self.marker is not None and self.marker.startswith("run")

    @property
    def reason(self) -> str | None:
        return self.marker.split(": ", 1)[1] if self.marker and self.marker.startswith("norun") else None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every Markdown page of docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def extract(path: Path) -> list[Example]:
    """Every bash/sh/python block of ``path`` with its marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mk = MARKER.match(lines[j].strip()) if j >= 0 else None
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        out.append(Example(str(path.relative_to(REPO)), i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                           mk.group(1) if mk else None))
        i = end + 1
    return out


def all_examples() -> list[Example]:
    return [e for p in pages() for e in extract(p)]


CURL_SHIM = r'''
"""The subset of curl the docs use, over httpx: -s -S -N -f, -X, -H, -d/--data/--data-raw, -F, one URL."""
import os, sys
import httpx

args, method, headers, data, form, files, url = sys.argv[1:], None, {}, None, [], [], None
i = 0
while i < len(args):
    a = args[i]
    if a in ("-s", "-S", "-N", "-sN", "-sS", "-f", "-sf", "--silent", "--no-buffer", "--fail"):
        pass
    elif a in ("-X", "--request"):
        i += 1; method = args[i]
    elif a in ("-H", "--header"):
        i += 1; k, _, v = args[i].partition(":"); headers[k.strip()] = v.strip()
    elif a in ("-d", "--data", "--data-raw"):
        i += 1; data = args[i]
    elif a in ("-F", "--form"):
        i += 1; k, _, v = args[i].partition("=")
        if v.startswith("@"):
            files.append((k, (os.path.basename(v[1:]), open(v[1:], "rb").read())))
        else:
            form.append((k, v))
    elif a.startswith("-"):
        sys.exit(f"curl (docs test shim): option {a!r} is not supported; use the ones the docs already use")
    else:
        url = a
    i += 1
if url is None:
    sys.exit("curl (docs test shim): no URL")
if "://" not in url:
    url = "http://" + url
method = method or ("POST" if data is not None or files or form else "GET")
kw = {"headers": headers, "timeout": 600}
if data is not None:
    kw["content"] = data.encode()
if files or form:
    kw["files"] = files or None
    kw["data"] = dict(form) if len(dict(form)) == len(form) else form
r = httpx.request(method, url, **kw)
sys.stdout.write(r.text if r.text.endswith("\n") else r.text + "\n")
if r.status_code >= 400 and os.environ.get("DOCS_ERRORS_OK") != "1":
    sys.stderr.write(f"curl (docs test shim): HTTP {r.status_code} from {method} {url}\n")
    sys.exit(22)
'''

STANCESERVE_SHIM = r'''
"""``stanceserve`` of the checkout; train, eval and export-blend get --base the tiny model unless they name one."""
import os, sys
args = sys.argv[1:]
if args and args[0] in ("train", "eval", "export-blend") and "--base" not in args and "--compare" not in args:
    args += ["--base", os.environ["DOCS_TINY_BASE"]]
sys.argv = ["stanceserve", *args]
from app.cli import main
main()
'''


def _named_factory(settings):
    return replace(tiny_factory(settings), name=DOCS_MODEL)


class DocsWorld:
    """A server on the tiny model in a thread of this process, and the folder and environment examples run in."""

    def __init__(self, root: Path, tiny_base: Path) -> None:
        import uvicorn

        from app.config import Settings
        from app.main import create_app

        self.root, self.work = root, root / "work"
        self.work.mkdir(parents=True)
        self.store = root / "store"
        (self.work / "training").symlink_to(REPO / "training")
        write_peft_adapter(self.work / "my-stance", "llama", rank=4, seed=21, scale=0.3)
        self.bin = root / "bin"
        self.bin.mkdir()
        for name, text in (("curl", CURL_SHIM), ("stanceserve", STANCESERVE_SHIM)):
            exe = self.bin / name
            exe.write_text(f"#!{sys.executable}\n{text}")
            exe.chmod(0o755)
        self.port = free_port()
        settings = Settings(adapters_dir=self.store, admin_key=KEY, max_loras=4, device="cpu", max_waiting=64)
        app = create_app(settings, model_factory=_named_factory)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="docs-server", daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()
        for i, name in enumerate(DOCS_STANCES):
            folder = write_peft_adapter(root / "seed" / name, "llama", rank=4, seed=30 + i, scale=0.3)
            files = [("files", (f.name, f.read_bytes())) for f in sorted(folder.iterdir()) if f.is_file()]
            r = httpx.post(f"{self.url}/v1/adapters", data={"name": name}, files=files,
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            assert r.status_code == 201, r.text
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "STANCESERVE_ADMIN_KEY": KEY,
            "STANCESERVE_ADAPTERS_DIR": str(self.store),
            "DOCS_TINY_BASE": str(tiny_base),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }

    def _wait_ready(self, timeout: float = 120.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("the docs server did not become ready")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def localise(self, code: str) -> str:
        """The example with the documented address replaced by this server's."""
        return code.replace("localhost:8000", f"127.0.0.1:{self.port}").replace(
            "127.0.0.1:8000", f"127.0.0.1:{self.port}")

    def run(self, ex: Example, timeout: float = 900.0) -> subprocess.CompletedProcess:
        """Run one example in the working folder; the completed process (check ``returncode``)."""
        code = self.localise(ex.code)
        env = {**self.env, "DOCS_ERRORS_OK": "1" if ex.marker == "run: errors-ok" else "0"}
        if ex.lang == "python":
            script = self.root / f"example_{ex.line}.py"
            script.write_text(code, encoding="utf-8")
            cmd = [sys.executable, str(script)]
        else:
            cmd = ["bash", "-c", "set -euo pipefail\n" + code]
        return subprocess.run(cmd, cwd=self.work, env=env, capture_output=True, text=True, timeout=timeout)


def make_tiny_base(folder: Path) -> Path:
    """The tiny Llama saved as a model folder (the same weights the docs server serves)."""
    return save_tiny_base(folder, "llama")
