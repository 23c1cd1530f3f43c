"""AdapterStore: add / replace / delete / scan round trips, content-addressed versions, atomicity and crash recovery."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import FrozenInstanceError

import pytest
import torch

from app.errors import AdapterExistsError, AdapterNotFoundError, AdapterTooLargeError, AdapterValidationError
from app.registry.adapter import AdapterVersion, content_digest
from tests.factories import Q0, edit_config, edit_tensors, key, new_store, write_peft_adapter

CFG, MODEL, STANCE = "adapter_config.json", "adapter_model.safetensors", "stance.json"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two valid llama adapters (different seeds/ranks) that tests copy, never modify."""
    base = tmp_path_factory.mktemp("src")
    return {
        "v1": write_peft_adapter(base / "v1", "llama", rank=4, alpha=8.0, seed=1),
        "v2": write_peft_adapter(base / "v2", "llama", rank=8, alpha=4.0, seed=2, targets=["q_proj", "v_proj"]),
    }


@pytest.fixture
def staged(tmp_path, sources):
    """A fresh copy of a source adapter: ``staged("v1")``."""

    def copy(which: str):
        dest = tmp_path / f"staged-{which}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(sources[which], dest)
        return dest

    return copy


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version_of(name, folder) -> AdapterVersion:
    """The version an adapter folder's files make (independent of the store)."""
    return AdapterVersion(name, content_digest(sha(folder / MODEL), json.loads((folder / CFG).read_text())))


def hidden(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_add_get_list(tmp_path, staged, sources):
    store = new_store(tmp_path / "store")
    record, weights = store.add("pirate", staged("v1"), description="arr", metadata={"lr": 1e-4})
    assert record.id == version_of("pirate", sources["v1"]) and record.version == 1
    assert (record.rank, record.alpha) == (4, 8.0)
    assert record.target_modules == tuple(sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    assert record.sha256 == sha(sources["v1"] / MODEL)
    assert record.size_bytes == (sources["v1"] / MODEL).stat().st_size
    assert record.description == "arr" and record.metadata == {"lr": 1e-4}
    assert record.path == str(tmp_path / "store" / "pirate")
    assert weights.id == record.id and len(weights.modules) == 14
    assert weights.modules[Q0].scaling == 2.0

    folder = tmp_path / "store" / "pirate"
    assert sorted(p.name for p in folder.iterdir()) == [CFG, MODEL, STANCE]
    stance = json.loads((folder / STANCE).read_text())
    assert stance["version"] == 1 and stance["sha256"] == record.sha256 and stance["size"] == record.size_bytes
    assert hidden(tmp_path / "store") == []

    assert "pirate" in store and "ninja" not in store
    assert store.get("pirate") == record
    store.add("alpha", staged("v2"))
    assert [r.name for r in store.list()] == ["alpha", "pirate"]
    with pytest.raises(AdapterNotFoundError):
        store.get("ninja")


def test_records_are_immutable_and_shared(tmp_path, staged):
    store = new_store(tmp_path / "store")
    meta = {"k": 1, "nested": {"xs": [1, 2]}}
    record, _ = store.add("a", staged("v1"), metadata=meta)
    meta["k"] = 2
    meta["nested"]["xs"].append(3)  # the caller's dict is not the record's
    assert store.get("a") is record and store.list() == [record]  # no copy per read
    with pytest.raises(FrozenInstanceError):
        record.version = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        record.metadata["k"] = 2  # type: ignore[index]
    with pytest.raises(TypeError):
        record.metadata["nested"]["xs"] = []  # type: ignore[index]
    assert record.metadata == {"k": 1, "nested": {"xs": (1, 2)}} and isinstance(record.target_modules, tuple)


def test_load_weights_equals_add_result(tmp_path, staged):
    store = new_store(tmp_path / "store")
    record, weights = store.add("a", staged("v1"))
    loaded = store.load_weights(record)
    assert loaded.id == record.id == weights.id and set(loaded.modules) == set(weights.modules)
    for path, m in weights.modules.items():
        assert torch.equal(loaded.modules[path].A, m.A) and torch.equal(loaded.modules[path].B, m.B)
    assert store.load_weights(record, dtype=torch.bfloat16).modules[Q0].B.dtype == torch.bfloat16


def test_exists_and_replace(tmp_path, staged, sources):
    store = new_store(tmp_path / "store")
    old, _ = store.add("a", staged("v1"))
    with pytest.raises(AdapterExistsError):
        store.add("a", staged("v2"))
    assert store.get("a").sha256 == old.sha256

    new, weights = store.add("a", staged("v2"), replace=True, description="second")
    assert new.version == 2 and new.id == weights.id == version_of("a", sources["v2"]) != old.id
    assert new.rank == 8 and new.target_modules == ("q_proj", "v_proj")
    assert new.sha256 == sha(sources["v2"] / MODEL) != old.sha256
    assert store.get("a") == new
    assert sha(tmp_path / "store" / "a" / MODEL) == new.sha256
    assert hidden(tmp_path / "store") == []
    # a record of the replaced version can no longer load (the folder holds another version)
    with pytest.raises(AdapterNotFoundError):
        store.load_weights(old)
    assert store.add("a", staged("v1"), replace=True)[0].version == 3


def test_versions_are_content_addressed(tmp_path, staged):
    """Same files: same version (whatever the counter says), also after a restart; another config: another."""
    root = tmp_path / "store"
    store = new_store(root)
    first, w1 = store.add("a", staged("v1"))
    again, w2 = store.add("a", staged("v1"), replace=True)
    assert again.version == 2 and again.id == first.id and w2 == w1 and hash(w2) == hash(w1)
    assert store.load_weights(first).id == first.id  # the folder still holds that content
    assert new_store(root).scan()[0].id == first.id
    assert store.add("b", staged("v1"))[0].id == AdapterVersion("b", first.id.digest)  # the name is part of it
    louder = staged("v1")
    edit_config(louder, lora_alpha=16.0)  # same tensors, other scaling: other weights
    third, w3 = store.add("a", louder, replace=True)
    assert third.sha256 == first.sha256 and third.id != first.id and w3.modules[Q0].scaling == 4.0
    with pytest.raises(AdapterNotFoundError):
        store.load_weights(first)
    assert str(third.id) == f"a@{third.digest[:12]}"


def test_persistence_across_instances(tmp_path, staged):
    root = tmp_path / "store"
    store = new_store(root)
    store.add("a", staged("v1"), description="d", metadata={"x": [1, 2]})
    store.add("a", staged("v2"), replace=True, description="d2")
    store.add("b", staged("v1"))
    before = store.list()

    again = new_store(root)
    assert len(again) == 0  # nothing before scan
    assert again.scan() == before
    assert again.get("a").version == 2 and again.get("a").description == "d2"
    assert again.add("a", staged("v1"), replace=True)[0].version == 3


def test_delete(tmp_path, staged):
    root = tmp_path / "store"
    store = new_store(root)
    store.add("a", staged("v1"))
    store.add("b", staged("v1"))
    deleted = store.delete("a")
    assert deleted.id.name == "a" and deleted.version == 1
    assert "a" not in store and not (root / "a").exists() and hidden(root) == []
    with pytest.raises(AdapterNotFoundError):
        store.delete("a")
    with pytest.raises(AdapterNotFoundError):
        store.load_weights(deleted)
    assert [r.name for r in new_store(root).scan()] == ["b"]
    # version numbers never repeat within a process (the API's counter)
    assert store.add("a", staged("v2"))[0].version == 2


def test_register_path_copies(tmp_path, sources):
    src = tmp_path / "run" / "final"
    shutil.copytree(sources["v1"], src)
    (src / "training_metrics.json").write_text(json.dumps({"summary": {"loss": 0.5}, "steps": [1, 2]}))
    listing = sorted(p.name for p in src.iterdir())
    store = new_store(tmp_path / "store")
    record, weights = store.register_path("trained", src)
    assert record.metadata == {"training": {"loss": 0.5}}
    assert weights.id == record.id == version_of("trained", src)
    assert sorted(p.name for p in src.iterdir()) == listing  # source untouched
    assert sorted(p.name for p in (tmp_path / "store" / "trained").iterdir()) == [CFG, MODEL, STANCE]
    assert (tmp_path / "store" / "trained" / MODEL).read_bytes() == (src / MODEL).read_bytes()
    with pytest.raises(AdapterValidationError) as exc:
        store.register_path("x", tmp_path / "nope")
    assert exc.value.param == "path"


def test_name_rules(tmp_path, staged):
    store = new_store(tmp_path / "store", reserved_names={"SmolLM2-135M-Instruct"})
    for name in ["SmolLM2-135M-Instruct", "../evil", ".tmp-x", ""]:
        with pytest.raises(AdapterValidationError) as exc:
            store.add(name, staged("v1"))
        assert exc.value.param == "name"
    with pytest.raises(AdapterValidationError) as exc:
        store.add("a", staged("v1"), metadata={"x": object()})
    assert exc.value.param == "metadata"
    assert list((tmp_path / "store").iterdir()) == []


def test_too_large(tmp_path, staged):
    store = new_store(tmp_path / "store", max_bytes=4096)
    with pytest.raises(AdapterTooLargeError):
        store.add("a", staged("v1"))
    assert list((tmp_path / "store").iterdir()) == []


def test_invalid_adapter_leaves_store_untouched(tmp_path, staged):
    root = tmp_path / "store"
    store = new_store(root)
    old, _ = store.add("a", staged("v1"))
    bad = staged("v2")
    edit_tensors(bad, lambda t: t[key(Q0)].__setitem__((0, 0), float("nan")))
    with pytest.raises(AdapterValidationError) as exc:
        store.add("a", bad, replace=True)
    assert exc.value.param == MODEL
    assert store.get("a") == old
    assert sha(root / "a" / MODEL) == old.sha256 and hidden(root) == []
    assert store.load_weights(old).id == old.id


def test_failing_swap_leaves_old_version(tmp_path, staged, monkeypatch):
    root = tmp_path / "store"
    store = new_store(root)
    old, _ = store.add("a", staged("v1"))
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".tmp-"):
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        store.add("a", staged("v2"), replace=True)
    monkeypatch.undo()
    assert store.get("a") == old
    assert sha(root / "a" / MODEL) == old.sha256
    assert json.loads((root / "a" / STANCE).read_text())["version"] == 1
    assert hidden(root) == []
    # and the next replace still bumps from the surviving version
    assert store.add("a", staged("v2"), replace=True)[0].version == 2


def test_crash_recovery_restores_old(tmp_path, staged, caplog):
    root = tmp_path / "store"
    store = new_store(root)
    old, _ = store.add("a", staged("v1"), description="keep me")
    store.add("b", staged("v1"))
    # crash between "a -> .old-a-x" and ".tmp-a-y -> a"
    os.rename(root / "a", root / ".old-a-x1")
    shutil.copytree(staged("v2"), root / ".tmp-a-y2")
    (root / ".del-b-z3").mkdir()
    (root / ".git").mkdir()
    with caplog.at_level(logging.WARNING, logger="app.registry.layout"):
        records = new_store(root).scan()
    assert [r.name for r in records] == ["a", "b"]
    a = next(r for r in records if r.name == "a")
    assert (a.version, a.sha256, a.description) == (1, old.sha256, "keep me")
    assert hidden(root) == [".git"]  # only our own dot-folders are removed
    assert "recovered adapter a" in caplog.text


def test_crash_after_swap_keeps_new(tmp_path, staged, sources):
    root = tmp_path / "store"
    store = new_store(root)
    store.add("a", staged("v1"))
    store.add("a", staged("v2"), replace=True)
    shutil.copytree(sources["v1"], root / ".old-a-deadbeef")  # removal of the old one interrupted
    records = new_store(root).scan()
    assert records[0].version == 2 and records[0].sha256 == sha(sources["v2"] / MODEL)
    assert hidden(root) == []


def test_scan_skips_invalid_and_adopts_bare_folders(tmp_path, sources, caplog):
    root = tmp_path / "store"
    root.mkdir()
    shutil.copytree(sources["v1"], root / "trained")  # no stance.json (copied by a training run)
    (root / "trained" / "training_metrics.json").write_text(json.dumps({"summary": {"loss": 1.25}}))
    shutil.copytree(sources["v1"], root / "broken")
    edit_config(root / "broken", use_dora=True)
    shutil.copytree(sources["v1"], root / "bad name!")
    (root / "empty").mkdir()
    (root / "stray.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="app.registry.store"):
        records = new_store(root).scan()
    assert [r.name for r in records] == ["trained"]
    rec = records[0]
    assert rec.version == 1 and rec.metadata == {"training": {"loss": 1.25}}
    assert rec.created == pytest.approx((root / "trained" / MODEL).stat().st_mtime)
    assert "broken" in caplog.text and "use_dora" in caplog.text and "empty" in caplog.text
    assert "bad name!" in caplog.text
    # a folder that exists on disk but did not validate still blocks a non-replace add
    store = new_store(root)
    store.scan()
    with pytest.raises(AdapterExistsError):
        store.add("broken", sources["v1"])
    assert store.add("broken", sources["v1"], replace=True)[0].version == 1


def test_scan_skips_reserved_name(tmp_path, sources):
    root = tmp_path / "store"
    root.mkdir()
    shutil.copytree(sources["v1"], root / "base")
    assert new_store(root, reserved_names={"base"}).scan() == []


def test_concurrent_adds(tmp_path, sources):
    store = new_store(tmp_path / "store")
    errors = []

    def worker(i):
        try:
            store.add(f"s{i}", sources["v2"])
            store.add("shared", sources["v2"], replace=True)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.name for r in store.list()] == ["s0", "s1", "s2", "s3", "s4", "s5", "shared"]
    assert store.get("shared").version == 6
    assert hidden(tmp_path / "store") == []
