"""The same engine code in bf16, on CPU always and on CUDA where a GPU is present (CI has none).

Checks the batched multi-LoRA layer against peft per row in bf16 with a bf16-sized tolerance
(prefill and decode paths), and that the engine serves a mixed batch of stances and a blend.
"""

from __future__ import annotations

import copy

import pytest
import torch

from app.engine.engine import Engine
from app.engine.sampling import SamplingParams
from tests.factories import FakeStore, mixed_batch_and_alone, write_peft_adapter

pytestmark = pytest.mark.dtype

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_mixed_batch_matches_peft(tiny_model, arch, device, tmp_path):
    d1 = write_peft_adapter(tmp_path / "a1", arch, model=tiny_model, rank=4, seed=1)
    d2 = write_peft_adapter(tmp_path / "a2", arch, model=tiny_model, rank=8, seed=2)
    model_bf16 = copy.deepcopy(tiny_model).to(device, torch.bfloat16)
    ids = torch.randint(3, 512, (3, 9), generator=torch.Generator().manual_seed(0)).to(device)
    for t in (9, 1):  # prefill path, then the decode (embedding_bag) path
        out, alone = mixed_batch_and_alone(model_bf16, d1, d2, ids[:, :t], torch.bfloat16)
        for i, ref in enumerate(alone):
            torch.testing.assert_close(out[i].float(), ref[0].float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama"])
def test_bf16_engine_serves_stances_and_blends(tiny_model, tokenizer, arch, device, tmp_path):
    dirs = {n: write_peft_adapter(tmp_path / n, arch, model=tiny_model, seed=i) for i, n in enumerate(("a1", "a2"))}
    model = copy.deepcopy(tiny_model).to(device, torch.bfloat16)
    eng = Engine(model, tokenizer, "tiny", {10_000}, store=FakeStore(dirs), max_loras=4)
    eng.start()

    try:
        stances = [eng.resolve_stance(m, s) for m, s in
                   (("a1", None), ("a2", None), ("tiny", {"a1": 0.5, "a2": 0.5}), ("tiny", None))]
        done = eng.generate_batch([[1, 5, 6, 7]] * 4, stances, SamplingParams(max_tokens=6, temperature=0.7, seed=1))
        fins = [c.finish for c in done]
    finally:
        eng.stop()
    assert [f.completion_tokens for f in fins] == [6, 6, 6, 6]
