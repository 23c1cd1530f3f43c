"""AdapterStore: upload staging inside the store root, clean-up of killed uploads, and JSON depth limits."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.errors import AdapterValidationError
from app.registry.jsonread import json_depth
from app.registry.upload import stage_upload
from app.registry.validation import load_adapter_weights
from tests.factories import nested_json, nested_obj, new_store, shapes, write_peft_adapter

CFG, MODEL, STANCE = "adapter_config.json", "adapter_model.safetensors", "stance.json"
MB = 1024 * 1024
REPO = Path(__file__).resolve().parents[3]


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- staging


def test_staging_folder_in_root_removed_on_exit(tmp_path):
    root = tmp_path / "store"
    store = new_store(root)
    with store.staging() as tmp:
        assert tmp.parent == root and tmp.name.startswith(".upload-") and tmp.is_dir()
        assert list(tmp.iterdir()) == []
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / MODEL).write_bytes(b"x" * MB)
        assert store.scan() == [] and tmp.is_dir(), "scan must not remove an upload in progress"
        assert store.list() == []
    assert not tmp.exists() and hidden(root) == []
    with store.staging() as other:
        assert other != tmp  # fresh each time


def test_staging_folder_removed_on_exception(tmp_path):
    root = tmp_path / "store"
    store = new_store(root)
    with pytest.raises(AdapterValidationError, match="no files"):
        with store.staging() as tmp:
            stage_upload([], tmp / "adapter", max_bytes=MB)
    assert not tmp.exists()
    with pytest.raises(KeyboardInterrupt):
        with store.staging() as tmp:
            (tmp / "partial.bin").write_bytes(b"y" * 1000)
            raise KeyboardInterrupt
    assert hidden(root) == []


def test_add_via_staging_in_root(tmp_path, payload):
    root = tmp_path / "store"
    store = new_store(root)
    files = [(CFG, payload[CFG]), (MODEL, payload[MODEL])]
    with store.staging() as tmp:
        staged = stage_upload(files, tmp / "adapter", max_bytes=64 * MB)
        assert staged.parent.parent == root
        record, weights = store.add("pirate", staged, metadata={"lr": 1e-4})
        assert [r.name for r in store.list()] == ["pirate"]
    assert hidden(root) == [] and sorted(p.name for p in root.iterdir()) == ["pirate"]
    assert (root / "pirate" / MODEL).read_bytes() == payload[MODEL]
    loaded = store.load_weights(record)
    assert loaded.id == record.id == weights.id and set(loaded.modules) == set(weights.modules)
    for path, module in weights.modules.items():
        assert torch.equal(loaded.modules[path].A, module.A) and torch.equal(loaded.modules[path].B, module.B)
    records = new_store(root).scan()
    assert [(r.name, r.version, r.metadata) for r in records] == [("pirate", 1, {"lr": 1e-4})]
    # a replace staged the same way bumps the version counter; the same bytes are the same version
    with store.staging() as tmp:
        again, _ = store.add("pirate", stage_upload(files, tmp / "a", max_bytes=64 * MB), replace=True)
    assert again.version == 2 and again.id == record.id
    assert hidden(root) == []


def test_register_path_from_staging_and_outside(tmp_path, payload):
    root = tmp_path / "store"
    store = new_store(root)
    with store.staging() as tmp:  # a server path inside the root
        folder = stage_upload([(CFG, payload[CFG]), (MODEL, payload[MODEL])], tmp / "run", max_bytes=64 * MB)
        assert store.register_path("inside", folder)[0].id.name == "inside"
    outside = write_peft_adapter(tmp_path / "run" / "final", "llama")
    assert store.register_path("outside", outside)[0].id.name == "outside"
    assert [r.name for r in new_store(root).scan()] == ["inside", "outside"]
    assert hidden(root) == []


def test_scan_removes_stale_upload_folders(tmp_path, payload, caplog):
    root = tmp_path / "store"
    store = new_store(root)
    store.add("kept", write_peft_adapter(tmp_path / "src", "llama"))
    # what a killed upload leaves: a staged adapter (valid, even) and a big partial file
    stale = root / ".upload-0123456789abcdef0123456789abcdef"
    (stale / "adapter").mkdir(parents=True)
    (stale / "adapter" / CFG).write_bytes(payload[CFG])
    (stale / "adapter" / MODEL).write_bytes(payload[MODEL])
    with open(stale / "partial.safetensors", "wb") as f:
        f.truncate(64 * MB)  # sparse: big to `ls`, cheap to make
    (root / ".upload-x").write_bytes(b"stray file")
    (root / ".keep").mkdir()
    fresh = new_store(root)
    with caplog.at_level(logging.INFO, logger="app.registry.layout"):
        records = fresh.scan()
    assert [r.name for r in records] == ["kept"] and [r.name for r in fresh.list()] == ["kept"]
    assert hidden(root) == [".keep"]  # only our own dot-entries are removed
    assert ".upload-0123456789abcdef0123456789abcdef" in caplog.text and "removing stale" in caplog.text


_KILLED_UPLOAD = """
import os, signal, sys
from app.registry.jsonread import json_depth
from app.registry.store import AdapterStore
store = AdapterStore(sys.argv[1], {}, max_rank=8, max_bytes=1 << 20)
with store.staging() as tmp:
    (tmp / "adapter").mkdir()
    with open(tmp / "adapter" / "adapter_model.safetensors", "wb") as f:
        f.write(os.urandom(4 << 20))
    print(tmp, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_upload_is_cleaned_by_next_start(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_UPLOAD, str(root)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = Path(proc.stdout.strip())
    assert left.parent == root and (left / "adapter" / MODEL).stat().st_size == 4 * MB  # the kill skipped clean-up
    assert new_store(root).scan() == []
    assert not left.exists() and list(root.iterdir()) == []


# --------------------------------------------------------------------------- JSON depth


def test_deep_adapter_config_refused(tmp_path, payload):
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / MODEL).write_bytes(payload[MODEL])
    (folder / CFG).write_text('{"r": 4, "lora_alpha": 8, "x": ' + nested_json(5000) + "}")
    with pytest.raises(AdapterValidationError) as exc:
        load_adapter_weights(folder, "t", shapes("llama"), max_rank=64)
    assert exc.value.param == CFG and "deeper than 32" in exc.value.message
    root = tmp_path / "store"
    store = new_store(root)
    with pytest.raises(AdapterValidationError) as exc:
        store.add("deep", folder)
    assert exc.value.param == CFG
    with pytest.raises(AdapterValidationError) as exc:
        with store.staging() as tmp:
            files = [(CFG, (folder / CFG).read_bytes()), (MODEL, payload[MODEL])]
            store.add("deep", stage_upload(files, tmp / "adapter", max_bytes=64 * MB))
    assert exc.value.param == CFG
    assert list(root.iterdir()) == []
    # a bare folder with it is skipped by scan, not fatal
    os.rename(folder, root / "deep")
    assert new_store(root).scan() == []


def test_store_max_json_depth_reaches_validation(tmp_path, payload):
    folder = write_peft_adapter(tmp_path / "src", "llama")
    depth = json_depth((folder / CFG).read_text())
    assert depth >= 2  # peft configs hold {} and [] one level down
    with pytest.raises(AdapterValidationError) as exc:
        new_store(tmp_path / "tight", max_json_depth=depth - 1).add("a", folder)
    assert exc.value.param == CFG and f"deeper than {depth - 1}" in exc.value.message
    assert new_store(tmp_path / "ok", max_json_depth=depth).add("a", folder)[0].version == 1
    with pytest.raises(ValueError):
        new_store(tmp_path / "bad", max_json_depth=0)


def test_metadata_depth_on_add(tmp_path):
    folder = write_peft_adapter(tmp_path / "src", "llama")
    root = tmp_path / "store"
    store = new_store(root, max_json_depth=8)
    for bad in (nested_obj(9), nested_obj(5000), {"a": json.loads(nested_json(8))}):
        with pytest.raises(AdapterValidationError) as exc:
            store.add("a", folder, metadata=bad)
        assert exc.value.param == "metadata" and "RecursionError" not in exc.value.message
    with pytest.raises(AdapterValidationError) as exc:
        store.add("a", folder, metadata=[1, 2])  # type: ignore[arg-type]
    assert exc.value.param == "metadata"
    assert list(root.iterdir()) == []
    # the deepest accepted metadata survives a restart (stance.json wraps it one level deeper)
    record, _ = store.add("a", folder, metadata=nested_obj(8), description="d")
    again = new_store(root, max_json_depth=8).scan()
    assert again == [record] and again[0].metadata == nested_obj(8)


def test_metadata_and_description_must_fit_stance_json(tmp_path):
    folder = write_peft_adapter(tmp_path / "src", "llama")
    store = new_store(tmp_path / "store")
    with pytest.raises(AdapterValidationError) as exc:
        store.add("a", folder, description="x" * (2 * MB))
    assert exc.value.param == "description"
    with pytest.raises(AdapterValidationError) as exc:
        store.add("a", folder, metadata={"blob": "y" * (2 * MB)})
    assert exc.value.param == "metadata"
    record, _ = store.add("a", folder, description="x" * 1000, metadata={"blob": "y" * (512 * 1024)})
    assert new_store(tmp_path / "store").scan() == [record]


def test_deep_side_files_are_ignored_not_fatal(tmp_path, caplog):
    src = write_peft_adapter(tmp_path / "run" / "final", "llama")
    (src / "training_metrics.json").write_text('{"summary": ' + nested_json(5000) + "}")
    root = tmp_path / "store"
    store = new_store(root)
    with caplog.at_level(logging.WARNING):
        record, _ = store.register_path("trained", src)
    assert record.metadata == {} and "training_metrics.json" in caplog.text and "deeper than" in caplog.text
    # a summary one level too deep for the store is dropped too (its metadata would be too deep)
    (src / "training_metrics.json").write_text(json.dumps({"summary": nested_obj(3)}))
    assert new_store(tmp_path / "s2", max_json_depth=3).register_path("t", src)[0].metadata == {}
    assert new_store(tmp_path / "s3", max_json_depth=4).register_path("t", src)[0].metadata == {
        "training": nested_obj(3)
    }
    # a planted deep stance.json: the adapter is still adopted (as version 1), nothing crashes
    (root / "trained" / STANCE).write_text('{"version": 7, "x": ' + nested_json(5000) + "}")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        records = new_store(root).scan()
    assert [(r.name, r.version) for r in records] == [("trained", 1)]
    assert "stance.json" in caplog.text and "deeper than" in caplog.text
