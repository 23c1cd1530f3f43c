"""The adapter store's default (XDG user data folder) and its seeding with the shipped adapters on first start."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings, default_adapters_dir
from app.main import create_app
from app.registry import seed
from app.registry.seed import INSTALLED_SUBDIR, adapter_folders, add_shipped, seed_store, shipped_adapters_dir
from tests.factories import REPO, wait_ready

SHIPPED = REPO / "adapters"
SHIPPED_NAMES = ["confident-expertise", "curious-uncertainty", "engaged-difficulty", "meeting-scheduler"]


def _fake_adapters(root: Path, names: list[str]) -> Path:
    """Adapter-shaped folders (seeding copies, it does not validate), plus things that are not adapters."""
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text(f'{{"name": "{name}"}}')
        (root / name / "adapter_model.safetensors").write_bytes(name.encode())
    (root / "README.md").write_text("not an adapter")
    (root / "half").mkdir()
    (root / "half" / "adapter_config.json").write_text("{}")  # no weights: not an adapter
    (root / ".upload-123").mkdir()
    return root


# ----------------------------------------------------------------------------- default location
def test_default_store_is_the_xdg_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert Settings().adapters_dir == tmp_path / "xdg" / "stanceserve" / "adapters"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # the XDG spec: relative paths are ignored
    assert default_adapters_dir() == Path("~/.local/share/stanceserve/adapters").expanduser()
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_adapters_dir() == Path.home() / ".local" / "share" / "stanceserve" / "adapters"


def test_only_the_default_store_is_seeded_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings().seeds_store()
    assert not Settings(adapters_dir=tmp_path / "mine").seeds_store()  # what tests and users name is theirs
    assert Settings(adapters_dir=tmp_path / "stanceserve" / "adapters").seeds_store()  # the default, spelled out
    assert not Settings(seed_adapters=False).seeds_store()
    monkeypatch.setenv("STANCESERVE_ADAPTERS_DIR", "/data/adapters")  # the Docker image
    monkeypatch.setenv("STANCESERVE_SEED_ADAPTERS", "true")
    s = Settings()
    assert s.adapters_dir == Path("/data/adapters") and s.seeds_store()


def test_tests_never_use_the_real_user_data_folder():
    assert not default_adapters_dir().is_relative_to(Path.home() / ".local" / "share")


# ----------------------------------------------------------------------------- seed_store
def test_seed_copies_every_adapter_folder_once(tmp_path):
    source = _fake_adapters(tmp_path / "shipped", ["a", "b"])
    root = tmp_path / "data" / "stanceserve" / "adapters"
    assert seed_store(root, source) == ["a", "b"]
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]
    assert (root / "b" / "adapter_model.safetensors").read_bytes() == b"b"
    assert [p.name for p in root.parent.iterdir()] == ["adapters"]  # no temp folder left

    shutil.rmtree(root / "a")  # a deleted adapter stays deleted: an existing store is never seeded again
    assert seed_store(root, source) == []
    assert sorted(p.name for p in root.iterdir()) == ["b"]


def test_an_existing_store_without_adapters_is_filled(tmp_path):
    """A new, empty STANCESERVE_ADAPTERS_DIR (or one holding no adapter) is seeded, not only a missing folder."""
    source = _fake_adapters(tmp_path / "shipped", ["a", "b"])
    store = tmp_path / "store"
    store.mkdir()
    (store / "notes.txt").write_text("mine")
    assert seed_store(store, source) == ["a", "b"]
    assert sorted(p.name for p in store.iterdir()) == ["a", "b", "notes.txt"]  # nothing hidden left, notes kept
    assert seed_store(store, source) == []  # it holds adapters now: start-up leaves it alone


def test_add_shipped_copies_only_what_the_store_lacks(tmp_path):
    source = _fake_adapters(tmp_path / "shipped", ["a", "b"])
    store = tmp_path / "store"
    (store / "a").mkdir(parents=True)
    (store / "a" / "adapter_config.json").write_text("my own a")
    assert add_shipped(store, source) == (["b"], ["a"])
    assert (store / "a" / "adapter_config.json").read_text() == "my own a"  # never replaced
    assert add_shipped(store, source) == ([], ["a", "b"])


def test_adapters_seed_command_fills_the_named_store(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from app.cli import app

    source = _fake_adapters(tmp_path / "shipped", ["a", "b"])
    monkeypatch.setattr(seed, "shipped_adapters_dir", lambda: source)
    store = tmp_path / "new-store"
    res = CliRunner().invoke(app, ["adapters", "seed", "--adapters-dir", str(store)])
    assert res.exit_code == 0, res.output
    assert "copied into" in res.stdout and "a, b" in res.stdout
    assert sorted(p.name for p in store.iterdir()) == ["a", "b"]
    again = CliRunner().invoke(app, ["adapters", "seed", "--adapters-dir", str(store)])
    assert again.exit_code == 0 and "kept: a, b" in again.stdout


def test_start_up_warns_clearly_about_an_empty_store(tmp_path, caplog):
    from tests.factories import make_client

    caplog.set_level("INFO")
    with make_client(tmp_path) as client:
        wait_ready(client)
    assert "holds no adapters: every request naming a stance answers 404" in caplog.text
    assert "stanceserve adapters seed" in caplog.text


def test_start_up_logs_the_registered_adapters(tmp_path, caplog):
    from tests.factories import make_client
    from tests.factories.adapters import write_peft_adapter

    write_peft_adapter(tmp_path / "store" / "calm", "llama", rank=4, seed=1)
    caplog.set_level("INFO")
    with make_client(tmp_path) as client:
        wait_ready(client)
    assert f"1 adapters registered from {tmp_path / 'store'}: calm" in caplog.text
    assert "holds no adapters" not in caplog.text


def test_nothing_to_seed_leaves_no_store(tmp_path, caplog):
    assert seed_store(tmp_path / "store", tmp_path / "missing") == []
    assert not (tmp_path / "store").exists()
    assert "no shipped adapters" in caplog.text


def test_a_failed_copy_leaves_no_half_seeded_store(tmp_path, monkeypatch):
    source = _fake_adapters(tmp_path / "shipped", ["a", "b"])
    real = shutil.copytree
    calls = []

    def copy_then_fail(src, dst, **kw):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst, **kw)

    monkeypatch.setattr(seed.shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="No space"):
        seed_store(tmp_path / "data" / "adapters", source)
    assert list((tmp_path / "data").iterdir()) == []  # neither the store nor the temp folder
    monkeypatch.setattr(seed.shutil, "copytree", real)
    assert seed_store(tmp_path / "data" / "adapters", source) == ["a", "b"]  # so the next start seeds it


# ----------------------------------------------------------------------------- where the shipped adapters are
def test_shipped_adapters_from_the_checkout_then_the_install_prefix(tmp_path):
    assert shipped_adapters_dir() == SHIPPED  # this checkout
    assert [p.name for p in adapter_folders(SHIPPED)] == SHIPPED_NAMES
    prefix = tmp_path / "venv"
    _fake_adapters(prefix / INSTALLED_SUBDIR, ["x"])
    assert shipped_adapters_dir(checkout=tmp_path / "site-packages", prefix=prefix) == prefix / INSTALLED_SUBDIR
    assert shipped_adapters_dir(checkout=tmp_path / "nowhere", prefix=tmp_path / "nowhere") is None


def test_pyproject_installs_every_shipped_adapter():
    """`pip install .` puts each shipped adapter's files in <prefix>/share/stanceserve/adapters (checked in the wheel)."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    for folder in adapter_folders(SHIPPED):
        files = table.get(f"{INSTALLED_SUBDIR.as_posix()}/{folder.name}")
        assert files, f"adapters/{folder.name} is not in [tool.setuptools.data-files]"
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {Path(f).name for f in files}


@pytest.mark.slow
def test_the_wheel_carries_the_shipped_adapters(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path),
         str(REPO)], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("stanceserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for adapter in SHIPPED_NAMES:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert f"stanceserve-0.1.0.data/data/share/stanceserve/adapters/{adapter}/{f}" in names


# ----------------------------------------------------------------------------- first start, as a new user meets it
@pytest.mark.slow
def test_first_start_serves_the_shipped_stances_from_the_user_data_folder(monkeypatch, tmp_path):
    """The real embedded model with default settings: a new store in $XDG_DATA_HOME, seeded, registered."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    store = tmp_path / "stanceserve" / "adapters"
    checkout_before = sorted(SHIPPED.rglob("*"))
    with TestClient(create_app(Settings(device="cpu"))) as client:
        wait_ready(client, timeout=120)
        ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert set(SHIPPED_NAMES) <= ids
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == SHIPPED_NAMES
    assert sorted(SHIPPED.rglob("*")) == checkout_before  # the source checkout is not the store any more
