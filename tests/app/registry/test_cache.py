"""The CPU weight cache: LRU bound, per-key single load under concurrency, version keys."""

from __future__ import annotations

import threading
import time

import torch

from app.registry.adapter import AdapterRecord, AdapterWeights, LoRAModuleWeights
from app.registry.cache import WeightCache


def rec(name, version=1):
    return AdapterRecord(name, version, 1, 1.0, ["q_proj"], 0, "", 0.0, "/nowhere")


def fake_weights(record):
    return AdapterWeights(record.key, {"m": LoRAModuleWeights(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)})


def test_lru_bound_and_version_keys():
    loads = []

    def load(r):
        loads.append(r.key)
        return fake_weights(r)

    c = WeightCache(load, max_items=2)
    c.get(rec("a")), c.get(rec("b")), c.get(rec("a"))  # a is now most recent
    c.get(rec("c"))  # evicts b
    assert len(c) == 2 and loads == ["a@1", "b@1", "c@1"]
    c.get(rec("b"))
    assert loads[-1] == "b@1" and c.get(rec("a", 2)).key == "a@2"
    c.discard_name("a")
    c.get(rec("a", 2))
    assert loads.count("a@2") == 2


def test_concurrent_cold_gets_load_once():
    calls = []

    def slow_load(r):
        calls.append(r.key)
        time.sleep(0.1)
        return fake_weights(r)

    c = WeightCache(slow_load)
    out = []
    threads = [threading.Thread(target=lambda: out.append(c.get(rec("x")))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["x@1"] and len(out) == 8 and all(w is out[0] for w in out)
