"""Configuration from one place: Settings -> serve flags, the docs' configuration table, EngineConfig; TrainConfig -> train flags.

Also the packaging layers: the serving modules import neither ``training`` (nor trl, datasets,
matplotlib) nor ``bench``, and the CLI imports no module of ``app`` twice.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli_options import attribute_docs, dataclass_options, from_cli
from app.config import ENV_ONLY_FIELDS, TABLE_BEGIN, TABLE_END, Settings, config_table
from app.engine.config import EngineConfig

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: Run before the code under test in a subprocess: modules of these top-level names cannot be imported.
BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, _Block())
"""


def _python(code: str, *args: str, blocked: set[str] = frozenset(), timeout: int = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS")}
    env.update(TERMINAL_WIDTH="400", COLUMNS="400", NO_COLOR="1")
    prelude = BLOCKER.format(blocked=set(blocked)) if blocked else ""
    return subprocess.run([sys.executable, "-c", prelude + code, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


#: Runs `python -m app.cli ARGS` in this process, then says whether `app.cli` was also imported as a module.
RUN_CLI = """
import runpy, sys
sys.argv = ["stanceserve", *sys.argv[1:]]
try:
    runpy.run_module("app.cli", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("APP.CLI IMPORTED TWICE" if "app.cli" in sys.modules else "app.cli imported once")
sys.exit(code)
"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- serve flags from Settings
def test_every_setting_is_a_serve_flag_or_documented_env_only():
    done = _python(RUN_CLI, "serve", "--help")
    assert done.returncode == 0, done.stderr
    text = ANSI.sub("", done.stdout)
    assert "app.cli imported once" in text
    for name, f in Settings.model_fields.items():
        if name in ENV_ONLY_FIELDS:
            assert f"STANCESERVE_{name.upper()}" in text and _flag(name) + " " not in text, name
        else:
            assert re.search(rf"{_flag(name)}\s", text), f"{name} is not a serve flag"
            assert f"STANCESERVE_{name.upper()}" in text, name
    assert "[default: (32)]" in text  # defaults come from the fields


@pytest.fixture
def served(monkeypatch):
    """Invoke `stanceserve serve` in-process; returns the Settings it would have served with."""
    import uvicorn

    import app.main
    from app.cli import app as cli

    seen = {}
    monkeypatch.setattr(app.main, "create_app", lambda settings: seen.setdefault("settings", settings))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    for name in Settings.model_fields:
        monkeypatch.delenv(f"STANCESERVE_{name.upper()}", raising=False)

    def run(*args: str, env: dict[str, str] | None = None):
        seen.clear()
        result = CliRunner().invoke(cli, ["serve", *args], env=env)
        return result, seen.get("settings")

    return run


def test_serve_flags_then_env_then_defaults(served):
    result, s = served("--max-loras", "5", "--trusted-proxies", "10.0.0.1, 192.168.0.0/16", "--device", "cpu",
                       env={"STANCESERVE_MAX_LORAS": "7", "STANCESERVE_MAX_BATCH_SIZE": "3"})
    assert result.exit_code == 0, result.output
    assert s.max_loras == 5  # flag beats env
    assert s.max_batch_size == 3  # env beats default
    assert s.max_waiting == Settings.model_fields["max_waiting"].default  # default
    assert s.trusted_proxies == ["10.0.0.1/32", "192.168.0.0/16"] and s.device == "cpu"
    result, s = served(env={"STANCESERVE_TRUSTED_PROXIES": '["127.0.0.1"]', "STANCESERVE_ADMIN_KEY": "k"})
    assert result.exit_code == 0, result.output
    assert s.trusted_proxies == ["127.0.0.1/32"] and s.admin_key.get_secret_value() == "k"


@pytest.mark.parametrize("args, message", [
    (["--max-loras", "0"], "invalid max_loras"),
    (["--max-loras", "many"], "--max-loras"),
    (["--device", "gpu"], "--device"),
    (["--trusted-proxies", "not-an-ip"], "invalid trusted_proxies"),
    (["--admin-key", "k"], "No such option"),  # a secret is never a flag
])
def test_invalid_serve_values_exit_2_with_a_message(served, args, message):
    result, s = served(*args)
    assert result.exit_code == 2 and s is None
    assert message in ANSI.sub("", result.output)


# ----------------------------------------------------------------------------- docs table from Settings
CONFIG_PAGE = "docs/operations/configuration.md"


def test_docs_table_has_one_row_per_setting_and_is_current():
    page = (REPO / CONFIG_PAGE).read_text(encoding="utf-8")
    block = page[page.index(TABLE_BEGIN) + len(TABLE_BEGIN): page.index(TABLE_END)].strip()
    assert block == config_table(), f"run: stanceserve config-table --update {CONFIG_PAGE}"
    rows = [line for line in block.splitlines() if line.startswith("| `STANCESERVE_")]
    assert [r.split("`")[1] for r in rows] == [f"STANCESERVE_{n.upper()}" for n in Settings.model_fields]
    assert all(f.description for f in Settings.model_fields.values())


def test_config_table_command_prints_the_table():
    from app.cli import app as cli

    result = CliRunner().invoke(cli, ["config-table"])
    assert result.exit_code == 0 and result.output.strip() == config_table()


# ----------------------------------------------------------------------------- EngineConfig from Settings
def test_engine_config_comes_from_settings():
    fields = [f.name for f in dataclasses.fields(EngineConfig)]
    assert set(fields) <= set(Settings.model_fields)
    defaults = EngineConfig()
    for name in fields:
        assert getattr(defaults, name) == Settings.model_fields[name].default, name
    s = Settings(max_loras=3, max_batch_size=2, max_prompt_tokens=100, max_blend_weight=2.5)
    cfg = EngineConfig.from_settings(s)
    assert {n: getattr(cfg, n) for n in fields} == {n: getattr(s, n) for n in fields}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_loras = 1  # type: ignore[misc]
    assert cfg.replace(max_loras=9).max_loras == 9 and cfg.max_loras == 3
    with pytest.raises(TypeError):
        cfg.replace(max_lorax=9)


# ----------------------------------------------------------------------------- train flags from TrainConfig
def test_every_train_config_field_is_a_train_flag():
    done = _python(RUN_CLI, "train", "--help", timeout=300)
    assert done.returncode == 0, done.stderr
    text = ANSI.sub("", done.stdout)
    assert "app.cli imported once" in text and "Usage: stanceserve train" in text
    from training.trainers import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        assert re.search(rf"{_flag(f.name)}\s", text), f"{f.name} is not a train flag"
    for run_option in ("--data", "--name", "--register", "--admin-key", "--out"):
        assert run_option in text


def test_dataclass_options_defaults_help_and_sequences():
    @dataclass
    class Cfg:
        """Knobs.

        Attributes:
            a, b: two numbers that go
                together.
            names: module names.
        """

        a: int = 1
        b: float = 2.0
        names: tuple[str, ...] = ("x", "y")
        flag: bool = field(default=True, metadata={"help": "A switch."})

    assert attribute_docs(Cfg) == {"a": "a, b: two numbers that go together.",
                                   "b": "a, b: two numbers that go together.", "names": "module names."}
    params = {p.name: p for p in dataclass_options(Cfg)}
    assert params["a"].default == 1 and params["names"].default == "x,y" and params["flag"].default is True
    assert from_cli(Cfg, {"names": "q, v", "a": None}) == {"names": ("q", "v")}

    @dataclass
    class Undocumented:
        c: int = 0

    with pytest.raises(ValueError, match="no help"):
        dataclass_options(Undocumented)


# ----------------------------------------------------------------------------- packaging layers
def test_serving_modules_import_no_training_or_bench_code():
    """As after `pip install .` (no extras): the server imports and builds its app without them."""
    done = _python(
        "import sys\n"
        "import app.main, app.cli, app.engine.engine, app.model_loader\n"
        "app.main.create_app(app.main.Settings())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'training', 'trl', 'datasets', 'matplotlib', 'bench'})\n"
        "print('IMPORTED', bad)\n",
        blocked={"training", "trl", "datasets", "matplotlib", "bench"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout


def test_train_without_the_extra_says_what_to_install():
    done = _python(RUN_CLI, "train", "--help", blocked={"training"})
    assert done.returncode == 1
    assert "pip install 'stanceserve[train]'" in " ".join(done.stdout.split() + done.stderr.split())


def test_bench_runs_from_the_checkout_and_says_so_when_absent(monkeypatch, tmp_path):
    import app.cli
    from app.cli import app as cli

    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0 and "--scenarios" in ANSI.sub("", result.output)
    monkeypatch.setattr(app.cli, "_bench_roots", lambda: [tmp_path])
    result = CliRunner().invoke(cli, ["bench"])
    assert result.exit_code == 1 and "source checkout" in result.output
