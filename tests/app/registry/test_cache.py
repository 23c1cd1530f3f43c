"""The CPU weight cache: LRU bound, per-version single load under concurrency, version keys."""

from __future__ import annotations

import hashlib
import threading
import time

import torch

from app.registry.adapter import AdapterRecord, AdapterVersion, AdapterWeights, LoRAModuleWeights
from app.registry.cache import WeightCache


def rec(name, content="v1"):
    """A record of ``name`` whose content (hence version) is ``content``."""
    digest = hashlib.sha256(content.encode()).hexdigest()
    return AdapterRecord(name, 1, 1, 1.0, ["q_proj"], 0, "", digest, 0.0, "/nowhere")


def v(name, content="v1"):
    return AdapterVersion(name, hashlib.sha256(content.encode()).hexdigest())


def fake_weights(record):
    return AdapterWeights(record.id, {"m": LoRAModuleWeights(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)})


def test_lru_bound_and_version_keys():
    loads = []

    def load(r):
        loads.append(r.id)
        return fake_weights(r)

    c = WeightCache(load, max_items=2)
    c.get(rec("a")), c.get(rec("b")), c.get(rec("a"))  # a is now most recent
    c.get(rec("c"))  # evicts b
    assert len(c) == 2 and loads == [v("a"), v("b"), v("c")]
    c.get(rec("b"))
    assert loads[-1] == v("b") and c.get(rec("a", "v2")).id == v("a", "v2")
    c.discard_name("a")
    c.get(rec("a", "v2"))
    assert loads.count(v("a", "v2")) == 2


def test_same_content_is_the_same_version():
    """Content addressing: a record with another version counter but the same content hits the cache."""
    loads = []
    c = WeightCache(lambda r: loads.append(r.id) or fake_weights(r))
    first = c.get(rec("a"))
    again = AdapterRecord("a", 7, 1, 1.0, ["q_proj"], 0, "", rec("a").digest, 1.0, "/elsewhere")
    assert c.get(again) is first and loads == [v("a")]
    assert c.get(rec("b")).id != first.id  # same bytes under another name: another version


def test_concurrent_cold_gets_load_once():
    calls = []

    def slow_load(r):
        calls.append(r.id)
        time.sleep(0.1)
        return fake_weights(r)

    c = WeightCache(slow_load)
    out = []
    threads = [threading.Thread(target=lambda: out.append(c.get(rec("x")))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [v("x")] and len(out) == 8 and all(w is out[0] for w in out)
