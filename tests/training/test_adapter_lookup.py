"""training.adapter_lookup.resolve_adapter: path, then the adapter store, then the shipped adapters.

Each fallback is proved by a folder that only that step can find, and the order by a name present in
several places. The stores are temporary folders; the shipped adapters are either a stand-in folder
(``app.registry.seed.shipped_adapters_dir`` patched) or the checkout's real ``adapters/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.errors import AdapterLookupError
from app.registry import seed
from training.adapter_lookup import default_store, resolve_adapter, store_help

REPO = Path(__file__).resolve().parents[2]
NAME = "curious-uncertainty"


def peft_folder(path: Path) -> Path:
    """A folder that counts as a peft adapter for the lookup (its config file only)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return path


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """A stand-in for the shipped adapters folder, holding NAME and "only-shipped"."""
    folder = tmp_path / "shipped"
    peft_folder(folder / NAME)
    peft_folder(folder / "only-shipped")
    monkeypatch.setattr(seed, "shipped_adapters_dir", lambda: folder)
    return folder


@pytest.fixture
def store(tmp_path) -> Path:
    folder = tmp_path / "store"
    peft_folder(folder / NAME)
    peft_folder(folder / "only-stored")
    return folder


def test_an_existing_path_comes_first(tmp_path, store, shipped, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = peft_folder(tmp_path / "work" / NAME)
    assert resolve_adapter(str(local), store) == local
    monkeypatch.chdir(tmp_path / "work")  # a relative path that is also a stored and a shipped name
    assert resolve_adapter(NAME, store) == Path(NAME)


def test_a_name_is_looked_up_in_the_given_store_before_the_shipped_adapters(store, shipped):
    assert resolve_adapter(NAME, store) == store / NAME
    assert resolve_adapter("only-stored", store) == store / "only-stored"


def test_the_default_store_is_the_configured_one(store, shipped, monkeypatch):
    monkeypatch.setenv("STANCESERVE_ADAPTERS_DIR", str(store))
    assert default_store() == store
    assert resolve_adapter("only-stored") == store / "only-stored"
    assert resolve_adapter(NAME) == store / NAME


def test_without_a_setting_the_default_store_is_the_xdg_one(tmp_path, shipped, monkeypatch):
    monkeypatch.delenv("STANCESERVE_ADAPTERS_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    stored = peft_folder(tmp_path / "xdg" / "stanceserve" / "adapters" / "only-stored")
    assert resolve_adapter("only-stored") == stored


def test_a_name_in_no_store_falls_back_to_the_shipped_adapters(store, shipped):
    assert resolve_adapter("only-shipped", store) == shipped / "only-shipped"
    assert resolve_adapter("only-shipped", store.parent / "no-such-store") == shipped / "only-shipped"


def test_the_real_shipped_adapters_are_found_with_an_empty_store(tmp_path):
    assert seed.shipped_adapters_dir() == REPO / "adapters"  # a checkout: adapters/ beside the app package
    assert resolve_adapter(NAME, tmp_path / "empty") == REPO / "adapters" / NAME
    assert resolve_adapter("meeting-scheduler", tmp_path / "empty") == REPO / "adapters" / "meeting-scheduler"


def test_an_unknown_name_names_every_folder_looked_at(store, shipped):
    with pytest.raises(AdapterLookupError) as info:
        resolve_adapter("nope", store)
    err = info.value
    assert err.searched == [Path("nope"), store / "nope", shipped / "nope"]
    for where in ("the path: nope", f"the adapter store: {store / 'nope'}", f"the shipped adapters: {shipped / 'nope'}"):
        assert where in err.message
    assert err.param == "adapter" and err.status_code == 404


def test_an_unknown_name_without_shipped_adapters_says_so(store, monkeypatch):
    monkeypatch.setattr(seed, "shipped_adapters_dir", lambda: None)
    with pytest.raises(AdapterLookupError, match="no shipped adapters found") as info:
        resolve_adapter("only-shipped", store)
    assert info.value.searched == [Path("only-shipped"), store / "only-shipped"]


def test_a_path_that_is_not_a_name_is_not_looked_up_in_stores(tmp_path, store, shipped):
    peft_folder(store / "sub" / NAME)  # "sub/NAME" under the store must not be reachable as a name
    with pytest.raises(AdapterLookupError, match="not a valid adapter name") as info:
        resolve_adapter(f"sub/{NAME}", store)
    assert info.value.searched == [Path(f"sub/{NAME}")]


def test_store_help_names_the_settings_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    text = store_help()
    assert "$STANCESERVE_ADAPTERS_DIR" in text and str(tmp_path / "xdg" / "stanceserve" / "adapters") in text
    assert "./adapters" not in text and "shipped" in text


def test_local_generator_resolve_uses_the_fallbacks(tmp_path, store, shipped):
    from tests.factories import tiny_factory
    from training.evaluate import LocalGenerator

    gen = LocalGenerator(loaded=tiny_factory(None), adapters_dir=store, max_batch_size=1)
    try:
        assert gen.resolve(NAME) == store / NAME
        assert gen.resolve("only-shipped") == shipped / "only-shipped"
        with pytest.raises(AdapterLookupError):
            gen.resolve("nope")
    finally:
        gen.close()


def test_cli_eval_fails_cleanly_on_an_unknown_local_adapter(tmp_path, store, shipped):
    from typer.testing import CliRunner

    from training.cli import app

    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "Why?"}) + "\n")
    res = CliRunner().invoke(app, ["eval", "--adapter", "nope", "--probes", str(probes), "--stance", NAME,
                                   "--adapters-dir", str(store), "--quiet"])
    assert res.exit_code == 1
    flat = "".join(res.output.split())  # rich wraps long lines at spaces
    assert "noadapter'nope'" in flat and str(store / "nope") in flat


def test_cli_export_blend_fails_cleanly_on_an_unknown_adapter(tmp_path, store, shipped):
    from typer.testing import CliRunner

    from training.cli import app

    res = CliRunner().invoke(app, ["export-blend", "--stances", f"{NAME}=0.5,nope=0.5", "--out", str(tmp_path / "o"),
                                   "--adapters-dir", str(store)])
    assert res.exit_code == 1
    flat = "".join(res.output.split())
    assert "noadapter'nope'" in flat and str(shipped / "nope") in flat and not (tmp_path / "o").exists()
