"""NamedBlendStore: atomic, versioned recipe file next to the adapters."""

from __future__ import annotations

import json

import pytest

from app.errors import StanceExistsError, StanceNotFoundError
from app.registry.blends import FILE, NamedBlendStore


def test_put_replace_delete_and_versions_survive_reopen(tmp_path):
    s = NamedBlendStore(tmp_path)
    assert s.put("fe", {"a": 0.6, "b": 0.4}).version == 1
    with pytest.raises(StanceExistsError):
        s.put("fe", {"a": 1.0})
    assert s.put("fe", {"a": 1.0}, replace=True).version == 2
    s.put("other", {"b": -0.5}, description="anti-b")
    assert s.using("a") == ["fe"] and s.using("b") == ["other"]
    s.delete("fe")
    with pytest.raises(StanceNotFoundError):
        s.delete("fe")
    again = NamedBlendStore(tmp_path)  # a restart
    assert [b.name for b in again.list()] == ["other"] and again.get("other").description == "anti-b"
    assert again.put("fe", {"a": 1.0}).version == 3  # versions only grow, across delete and restart
    assert not list(tmp_path.glob(f"{FILE}.tmp-*"))


def test_stale_tmp_removed_and_corrupt_file_set_aside(tmp_path):
    NamedBlendStore(tmp_path).put("fe", {"a": 1.0})
    (tmp_path / f"{FILE}.tmp-dead").write_text("{half")
    assert NamedBlendStore(tmp_path).get("fe").stances == {"a": 1.0}
    assert not (tmp_path / f"{FILE}.tmp-dead").exists()
    (tmp_path / FILE).write_text("{not json")
    s = NamedBlendStore(tmp_path)
    assert s.list() == [] and len(list(tmp_path.glob(f"{FILE}.bad-*"))) == 1
    data = {"format": 1, "blends": {"ok": {"stances": {"a": 1}, "version": 1, "created": 0},
                                    "bad": {"stances": {"a": "x"}, "version": 1, "created": 0}}}
    (tmp_path / FILE).write_text(json.dumps(data))
    assert [b.name for b in NamedBlendStore(tmp_path).list()] == ["ok"]


def test_failed_write_changes_nothing(tmp_path, monkeypatch):
    s = NamedBlendStore(tmp_path)
    s.put("fe", {"a": 1.0})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("app.registry.blends.os.replace", boom)
    with pytest.raises(OSError):
        s.put("x", {"a": 1.0})
    assert [b.name for b in s.list()] == ["fe"] and not list(tmp_path.glob(f"{FILE}.tmp-*"))
    assert json.loads((tmp_path / FILE).read_text())["blends"].keys() == {"fe"}
