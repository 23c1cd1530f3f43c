"""The adapter value types: AdapterVersion identity, AdapterWeights equality, the frozen AdapterRecord and its API view."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from app.engine.request import BLEND_LABEL, Stance
from app.registry.adapter import (
    AdapterRecord,
    AdapterVersion,
    AdapterWeights,
    LoRAModuleWeights,
    content_digest,
    freeze_json,
    thaw_json,
)
from app.schemas import AdapterInfo

D1, D2 = hashlib.sha256(b"one").hexdigest(), hashlib.sha256(b"two").hexdigest()


def weights(version: AdapterVersion) -> AdapterWeights:
    return AdapterWeights(version, {"m": LoRAModuleWeights(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)})


def test_adapter_version_is_a_hashable_value():
    v = AdapterVersion("pirate", D1)
    assert v == AdapterVersion("pirate", D1) and hash(v) == hash(AdapterVersion("pirate", D1))
    assert v != AdapterVersion("pirate", D2) and v != AdapterVersion("ninja", D1)
    assert str(v) == f"pirate@{D1[:12]}"
    for bad in [("", D1), ("a", "abc"), ("a", D1.upper()), ("a", D1 + "0")]:
        with pytest.raises(ValueError):
            AdapterVersion(*bad)


def test_content_digest_covers_weights_and_config():
    config = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]}
    same = {"target_modules": ["q_proj"], "lora_alpha": 8.0, "r": 4}  # key order does not matter
    assert content_digest(D1, config) == content_digest(D1, same)
    assert content_digest(D1, config) != content_digest(D2, config)
    assert content_digest(D1, config) != content_digest(D1, {**config, "lora_alpha": 16.0})


def test_weights_are_equal_by_version_and_key_a_blend():
    a, a_again, b = weights(AdapterVersion("a", D1)), weights(AdapterVersion("a", D1)), weights(AdapterVersion("b", D1))
    assert a == a_again and hash(a) == hash(a_again) and a != b
    blend = Stance.blend({a: 0.25, b: -1})
    assert blend.label == BLEND_LABEL and blend.terms == ((a, 0.25), (b, -1.0))
    assert Stance.single(b) == Stance("b", ((b, 1.0),)) and Stance.base().terms == ()


def test_record_is_frozen_with_read_only_metadata():
    rec = AdapterRecord("a", 3, 4, 8.0, ["q_proj"], 10, "f" * 64, D1, 1700000000.9, "/x",
                        metadata={"run": {"tags": ["x", {"y": 1}]}})
    assert rec.id == AdapterVersion("a", D1) and rec.target_modules == ("q_proj",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.name = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        rec.metadata["run"]["new"] = 1  # type: ignore[index]
    assert rec.metadata == {"run": {"tags": ("x", {"y": 1})}} and hash(rec) == hash(dataclasses.replace(rec))
    newer = dataclasses.replace(rec, version=4)
    assert newer.version == 4 and newer.id == rec.id and newer.metadata == rec.metadata


def test_freeze_thaw_round_trip():
    value = {"a": [1, {"b": [2.5, None, "s"]}], "c": {}}
    frozen = freeze_json(value)
    assert thaw_json(frozen) == value and thaw_json(frozen) is not value
    assert isinstance(frozen["a"], tuple)


def test_adapter_info_from_record():
    rec = AdapterRecord("a", 3, 4, 8.0, ["q_proj", "v_proj"], 10, "f" * 64, D1, 1700000000.9, "/srv/a",
                        base_model="m", description="d", metadata={"tags": ["x"]})
    info = AdapterInfo.from_record(rec)
    assert info.model_dump() == {
        "name": "a", "version": 3, "rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"],
        "size_bytes": 10, "sha256": "f" * 64, "created": 1700000000, "base_model": "m", "description": "d",
        "metadata": {"tags": ["x"]},
    }
    assert "/srv/a" not in info.model_dump_json()
