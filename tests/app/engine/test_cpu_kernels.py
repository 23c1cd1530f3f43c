"""The C++ CPU paged-attention kernels (:mod:`app.engine.cpu_attention`) and their use by the forward pass.

The decode kernel against an fp64 reference computed row by row over each row's own positions (fp32 to 1e-5; bf16 no
worse than twice SDPA's error), on block tables out of order, rows of 1 to 300 positions, grouped-query ratios
1, 3 and 4 and head sizes 32, 64, 80 (vector paths) and 24 (plain loops), with NaN in every cache position a
row must not read. The prefill kernel against the same reference per token, for rows starting mid-sequence,
with each token's output independent of the other rows of the call and of where a chunk starts. Then whole decode steps of the tiny models with the kernel on and off, the fallback when the
kernel cannot be built, and the engine setting ``cpu_attention_kernel``. The kernel tests skip (saying why) only
where the kernel cannot be built on this host, and fail there instead with ``STANCESERVE_REQUIRE_CPU_KERNEL=1``
(``.ci/run`` sets it).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from app.engine import cpu_kernels
from app.engine.forward import ForwardPass
from app.engine.plan import Plan
from tests.factories import decode_attention_reference, row_kv

BS = 16
LENGTHS = [1, 15, 16, 17, 100, 300]


@pytest.fixture(scope="module")
def kern(cpu_ext):
    return cpu_ext.decode_attention


def paged_case(dtype, kv_heads, groups, head_dim, lengths, seed=0):
    """Random q and caches for rows of ``lengths`` positions on shuffled blocks, with NaN in every position the
    rows must not read (past each row's length, unused blocks, the tables' padding entries)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for n in lengths]
    width = max(need) + 1  # one padding entry per row at least
    num_blocks = 1 + sum(need) + 8
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    used, spare = perm[: sum(need)], perm[sum(need) :]
    k = torch.randn(kv_heads, num_blocks, BS, head_dim, generator=gen) * 3
    v = torch.randn(kv_heads, num_blocks, BS, head_dim, generator=gen)
    tables, at = [], 0
    for n, b in zip(lengths, need):
        own = used[at : at + b]
        at += b
        tables.append(own + [spare[(i + len(tables)) % len(spare)] for i in range(width - b)])
        last, off = own[-1], n - (b - 1) * BS
        k[:, last, off:] = float("nan")
        v[:, last, off:] = float("nan")
    for b in spare + [0]:
        k[:, b] = float("nan")
        v[:, b] = float("nan")
    q = torch.randn(len(lengths), kv_heads, groups, head_dim, generator=gen) * 3
    return (q.to(dtype), k.to(dtype), v.to(dtype), torch.tensor(tables), torch.tensor([n - 1 for n in lengths]))


def sdpa(q, k, v, tables, lengths, scale):
    """SDPA in ``q``'s dtype, row by row over each row's own positions."""
    out = []
    for r, n in enumerate(lengths):
        o = F.scaled_dot_product_attention(q[r][None], row_kv(k, tables[r], n)[None], row_kv(v, tables[r], n)[None],
                                           scale=scale)
        out.append(o.reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("head_dim", [32, 64, 80, 24])  # 24: not a multiple of 16 (the plain loops)
@pytest.mark.parametrize("groups", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_fp64_reference(kern, dtype, groups, head_dim):
    q, k, v, tables, positions = paged_case(dtype, 2, groups, head_dim, LENGTHS)
    scale = head_dim**-0.5
    out = kern(q, k, v, tables, positions, scale)
    assert out.shape == (len(LENGTHS), 2 * groups * head_dim) and out.dtype == dtype
    assert torch.isfinite(out).all()  # no NaN from positions past a row's length or unused blocks
    ref = decode_attention_reference(q, k, v, tables, LENGTHS, scale)
    err = (out.double() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        sdpa_err = (sdpa(q, k, v, tables, LENGTHS, scale).double() - ref).abs().max().item()
        assert err <= 2 * sdpa_err, (err, sdpa_err)


def test_kernel_reads_only_each_rows_positions(kern):
    """Changing a position past a row's length (or one just inside it) changes that row's output or not."""
    q, k, v, tables, positions = paged_case(torch.float32, 1, 1, 32, [17, 40])
    k = torch.nan_to_num(k, nan=0.0)
    v = torch.nan_to_num(v, nan=0.0)
    base = kern(q, k, v, tables, positions, 0.2)
    last = int(tables[0, 1])  # row 0's second block: offset 0 is its position 16, its last
    v2 = v.clone()
    v2[:, last, 1] = 1e3  # position 17: past row 0
    torch.testing.assert_close(kern(q, k, v2, tables, positions, 0.2)[0], base[0], atol=0, rtol=0)
    v2[:, last, 0] = 1e3  # position 16: row 0's last
    assert not torch.allclose(kern(q, k, v2, tables, positions, 0.2)[0], base[0])


def test_kernel_rejects_positions_past_the_table_and_bad_block_ids(kern):
    q, k, v, tables, positions = paged_case(torch.float32, 2, 1, 32, [5, 20])
    with pytest.raises(RuntimeError, match="outside its table"):
        kern(q, k, v, tables, torch.tensor([4, tables.shape[1] * BS]), 1.0)
    bad = tables.clone()
    bad[1, 0] = k.shape[1]
    with pytest.raises(RuntimeError, match="out of range"):
        kern(q, k, v, bad, positions, 1.0)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        kern(q.double(), k.double(), v.double(), tables, positions, 1.0)


PREFILL_ROWS = [(0, 80), (37, 5), (0, 1), (100, 33), (15, 17), (0, 300), (64, 16)]  # (cached, new tokens)


@pytest.fixture(scope="module")
def prefill_kern(cpu_ext):
    return cpu_ext.prefill_attention


def prefill_case(dtype, kv_heads, groups, head_dim, rows, seed=0):
    """Caches as :func:`paged_case` for rows of ``cached + new`` positions, packed queries of every row's new tokens,
    and the rows' (tables, starts, counts, cached); plus per token its row's table and its position (the reference's
    one-row-per-token view)."""
    lengths = [c + n for c, n in rows]
    _, k, v, tables, _ = paged_case(dtype, kv_heads, groups, head_dim, lengths, seed)
    total = sum(n for _, n in rows)
    gen = torch.Generator().manual_seed(seed + 1)
    q = (torch.randn(total, kv_heads, groups, head_dim, generator=gen) * 3).to(dtype)
    starts, at = [], 0
    for _, n in rows:
        starts.append(at)
        at += n
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    args = (tables, t(starts), t([n for _, n in rows]), t([c for c, _ in rows]))
    token_tables = torch.stack([tables[r] for r, (_, n) in enumerate(rows) for _ in range(n)])
    token_lengths = [c + i + 1 for c, n in rows for i in range(n)]
    return q, k, v, args, token_tables, token_lengths


@pytest.mark.parametrize("head_dim", [64, 80, 24])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_kernel_matches_fp64_reference(prefill_kern, dtype, groups, head_dim):
    q, k, v, args, token_tables, token_lengths = prefill_case(dtype, 2, groups, head_dim, PREFILL_ROWS)
    scale = head_dim**-0.5
    out = prefill_kern(q, k, v, *args, scale)
    assert out.shape == (q.shape[0], 2 * groups * head_dim) and out.dtype == dtype
    assert torch.isfinite(out).all()  # no NaN from positions past a token's own or unused blocks
    ref = decode_attention_reference(q, k, v, token_tables, token_lengths, scale)
    err = (out.double() - ref).abs().max().item()
    sdpa_err = (sdpa(q, k, v, token_tables, token_lengths, scale).double() - ref).abs().max().item()
    if dtype == torch.float32:  # values are O(1): a few fp32 ulps over hundreds of positions (SDPA: 4-6e-6)
        assert err <= 1.5e-5, (err, sdpa_err)
    else:  # no worse than twice PyTorch's own attention in bf16
        assert err <= 2 * sdpa_err, (err, sdpa_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_kernel_tokens_do_not_depend_on_the_rest_of_the_call(prefill_kern, dtype):
    """A row's tokens get the same bits alone as among other rows, and a row prefilled in two chunks (the second
    starting mid-tile, at cached + 7) gets the bits of one call: a token's output is its own arithmetic only."""
    q, k, v, (tables, starts, counts, cached), *_ = prefill_case(dtype, 2, 3, 64, PREFILL_ROWS)
    together = prefill_kern(q, k, v, tables, starts, counts, cached, 0.125)
    for r in range(len(PREFILL_ROWS)):
        a, n, c = int(starts[r]), int(counts[r]), int(cached[r])
        one = lambda first, m: prefill_kern(  # noqa: E731
            q[a + first : a + first + m].contiguous(), k, v, tables[r : r + 1].contiguous(), torch.tensor([0]),
            torch.tensor([m]), torch.tensor([c + first]), 0.125)
        assert torch.equal(one(0, n), together[a : a + n])
        if n > 7:
            assert torch.equal(torch.cat([one(0, 7), one(7, n - 7)]), together[a : a + n])


def test_prefill_kernel_rejects_rows_outside_q_or_the_table(prefill_kern):
    q, k, v, (tables, starts, counts, cached), *_ = prefill_case(torch.float32, 2, 1, 32, [(0, 5), (3, 20)])
    with pytest.raises(RuntimeError, match="outside q"):
        prefill_kern(q, k, v, tables, starts, counts + 1, cached, 1.0)
    with pytest.raises(RuntimeError, match="outside its table"):
        prefill_kern(q, k, v, tables, starts, counts, cached + tables.shape[1] * BS, 1.0)
    bad = tables.clone()
    bad[1, 0] = k.shape[1]
    with pytest.raises(RuntimeError, match="out of range"):
        prefill_kern(q, k, v, bad, starts, counts, cached, 1.0)


def test_every_kernel_source_is_built_hashed_and_shipped():
    """Every file of ``csrc/`` is compiled or hashed into the build's name (a header edit must rebuild), and
    pyproject's package-data globs ship it in the wheel."""
    import tomllib
    from pathlib import Path

    files = {p for p in (Path(cpu_kernels.__file__).parent / "csrc").iterdir() if p.is_file()}
    assert files and files == set(cpu_kernels.SOURCES) | set(cpu_kernels.HEADERS)
    assert all(p.suffix == ".cpp" for p in cpu_kernels.SOURCES) and all(p.suffix == ".h" for p in cpu_kernels.HEADERS)
    root = Path(cpu_kernels.__file__).parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app.engine"]
    for p in files:
        assert any(p.relative_to(p.parents[1]).match(g) for g in globs), f"{p.name} is not package data"


def test_extension_name_depends_on_cpu_flags_and_source(monkeypatch):
    name = cpu_kernels.extension_name("x")
    assert name.startswith("stanceserve_cpu_kernels_") and cpu_kernels.extension_name("y") != name
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "fpu sse2")
    assert cpu_kernels.extension_name("x") != name


def decode_run(dec, steps=4):
    """Prefill rows of very different lengths (so the plan splits them into decode groups), then greedy decode
    ``steps`` tokens. Returns the per-step logits and tokens."""
    lengths = [3, 70, 5, 2]
    cache, tables = dec.row_cache(len(lengths), max(lengths) + steps + 1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]
    logits = dec.forward(Plan.build([(tables[i], p, 0) for i, p in enumerate(prompts)], dec.device), cache, None)
    toks = logits.argmax(-1).tolist()
    out_logits, out_toks = [], []
    for s in range(steps):
        plan = Plan.build([(tables[i], [toks[i]], lengths[i] + s) for i in range(len(lengths))], dec.device)
        if s == 0:
            assert plan.groups is not None and len(plan.groups) > 1
        logits = dec.forward(plan, cache, None)
        toks = logits.argmax(-1).tolist()
        out_logits.append(logits.float())
        out_toks.append(toks)
    return torch.stack(out_logits), out_toks, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_decode_with_kernel_on_and_off(kern, any_model, dtype, monkeypatch):  # noqa: F811
    on = ForwardPass(copy.deepcopy(any_model).to(dtype), attention_kernel=True)
    off = ForwardPass(copy.deepcopy(any_model).to(dtype), attention_kernel=False)
    assert on.warm_up() and not off.warm_up()
    monkeypatch.setattr("app.engine.kv_cache.PagedKVCache.gather",
                        lambda *a: pytest.fail("the kernel path gathered the cache"))
    monkeypatch.setattr("app.engine.forward.F.scaled_dot_product_attention",
                        lambda *a, **k: pytest.fail("the kernel path ran SDPA"))
    # the gated MLPs' SiLU (Hugging Face's own activation module) goes through the fused kernel
    assert all(layer.silu for layer in on.layers) == (any_model.config.model_type != "phi")
    monkeypatch.setattr("torch.nn.functional.silu", lambda *a, **k: pytest.fail("the kernel path ran F.silu"))
    logits_on, toks_on, _ = decode_run(on)
    monkeypatch.undo()
    logits_off, toks_off, _ = decode_run(off)
    if dtype == torch.float32:
        assert toks_on == toks_off
        torch.testing.assert_close(logits_on, logits_off, atol=1e-4, rtol=1e-4)
    else:  # first step only: later greedy tokens may part on near-ties
        torch.testing.assert_close(logits_on[0], logits_off[0], atol=2e-2, rtol=2e-2)


def test_failed_build_leaves_the_pytorch_path(any_model, monkeypatch, caplog):  # noqa: F811
    calls = []

    def broken():
        calls.append(1)
        raise OSError("no compiler here")

    monkeypatch.setattr(cpu_kernels, "_done", False)
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_build", broken)
    with caplog.at_level(logging.WARNING, logger="app.engine.cpu_kernels"):
        assert cpu_kernels.extension() is None and cpu_kernels.extension() is None
    assert calls == [1]  # one try per process
    warnings = [r for r in caplog.records if "CPU kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    on = ForwardPass(copy.deepcopy(any_model), attention_kernel=True)
    off = ForwardPass(copy.deepcopy(any_model), attention_kernel=False)
    assert on.kernels() is None and not on.warm_up()
    logits_on, toks_on, _ = decode_run(on)
    logits_off, toks_off, _ = decode_run(off)
    assert toks_on == toks_off and torch.equal(logits_on, logits_off)


def test_engine_setting_turns_the_kernel_on_and_off(kern, tiny_model, tokenizer):
    """``cpu_attention_kernel`` (default on) reaches the engine's forward pass; both settings decode the
    Hugging Face model's greedy tokens."""
    from app.engine.config import EngineConfig
    from app.engine.sampling import SamplingParams
    from tests.factories import FakeStore, make_engine, reference_greedy

    assert EngineConfig().cpu_attention_kernel
    prompts = [[1, 45, 80, 99], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]
    refs = [reference_greedy(tiny_model, p, 10) for p in prompts]
    for on in (True, False):
        eng = make_engine(tiny_model, tokenizer, FakeStore({}), cpu_attention_kernel=on)
        try:
            assert eng.forward_pass.attention_kernel is on and (eng.forward_pass.kernels() is not None) is on
            outs = eng.generate_batch(prompts, eng.resolve_stance("tiny"), SamplingParams(max_tokens=10, temperature=0))
        finally:
            eng.stop()
        assert [o.token_ids for o in outs] == refs


# ---------------------------------------------------------------- fused element-wise kernels


@pytest.fixture(scope="module")
def ext(cpu_ext):
    return cpu_ext


def close(got, want, dtype):
    """fp32: to a few ulps; bf16: within one bf16 rounding of the reference (PyTorch's eager bf16 ops round after
    every op, the kernels once)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1.6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_and_add_rms_norm_match_the_hugging_face_module(ext, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(72, eps=1e-5)
    norm.weight.data = torch.randn(72, generator=gen)
    norm = norm.to(dtype)
    h = (torch.randn(33, 72, generator=gen) * 4).to(dtype)
    a = torch.randn(33, 72, generator=gen).to(dtype)
    close(ext.rms_norm(h, norm.weight, 1e-5), norm(h), dtype)
    h2 = h.clone()
    out = ext.add_rms_norm_(h2, a, norm.weight, 1e-5)
    assert torch.equal(h2, h + a)  # the residual add rounds as PyTorch's add does
    close(out, norm(h + a), dtype)
    # a row's output is its own: rows alone give the bits they give together
    for r in (0, 17, 32):
        assert torch.equal(ext.rms_norm(h[r : r + 1].contiguous(), norm.weight, 1e-5), ext.rms_norm(h, norm.weight, 1e-5)[r : r + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_mul_matches_pytorch(ext, dtype):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(19, 2 * 40, generator=gen) * 6).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0]).to(dtype)  # far tails and zeros: no overflow, no NaN
    got = ext.silu_mul(x)
    assert torch.isfinite(got).all()
    close(got, F.silu(x[:, :40].float()) * x[:, 40:].float(), dtype)
    with pytest.raises(RuntimeError, match=r"\[N, 2F\]"):
        ext.silu_mul(x[:, :79])


@pytest.mark.parametrize("rot", [32, 16], ids=["full-rotary", "partial-rotary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rope_store_rotates_and_stores_as_the_pytorch_path(ext, dtype, rot):
    """The kernel's q, and the k and v it writes into the cache, against ForwardPass._rope and PagedKVCache.write,
    q/k/v being views of one fused projection as in the forward pass."""
    from app.engine.kv_cache import PagedKVCache

    gen = torch.Generator().manual_seed(2)
    n, nh, kvh, d = 21, 6, 2, 32
    qkv = torch.randn(n, (nh + 2 * kvh) * d, generator=gen).to(dtype)
    q = qkv[:, : nh * d].view(n, nh, d)
    k = qkv[:, nh * d : (nh + kvh) * d].view(n, kvh, d)
    v = qkv[:, (nh + kvh) * d :].view(n, kvh, d)
    ang = torch.rand(n, rot // 2, generator=gen) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    index = torch.randperm(5 * BS, generator=gen)[:n] + BS  # never the null block
    fast, slow = (PagedKVCache(1, kvh, d, 6, dtype, torch.device("cpu")) for _ in range(2))
    qr = ext.rope_store(q, k, v, cos, sin, fast.k[0], fast.v[0], index)

    class Rope:
        rotary_dim, head_dim = rot, d

    rope = lambda x: ForwardPass._rope(Rope, x, cos[:, None], sin[:, None])  # noqa: E731
    slow.write(0, index, rope(k), v)
    close(qr, rope(q), dtype)
    written = lambda c: c[0].view(kvh, -1, d)[:, index]  # noqa: E731 - the positions the tokens own
    close(written(fast.k), written(slow.k), dtype)
    assert torch.equal(written(fast.v), written(slow.v))
    with pytest.raises(RuntimeError, match="outside the cache"):
        ext.rope_store(q, k, v, cos, sin, fast.k[0], fast.v[0], index + 6 * BS)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_engine_answers_do_not_depend_on_the_other_requests(kern, tiny_model, tokenizer, arch, tmp_path):
    """bf16 engine with the C++ kernels: each request's tokens and their logprobs (to the last bit) are the same
    alone and among requests of other adapters, a blend and the base model, and among requests all on its adapter."""
    from app.engine.engine import Engine
    from app.engine.sampling import SamplingParams
    from tests.factories import FakeStore, write_peft_adapter

    dirs = {n: write_peft_adapter(tmp_path / n, arch, model=tiny_model, seed=i, rank=8, alpha=16)
            for i, n in enumerate(("a1", "a2"))}
    eng = Engine(copy.deepcopy(tiny_model).to(torch.bfloat16), tokenizer, "tiny", {10_000}, store=FakeStore(dirs),
                 max_loras=4)
    eng.start()
    try:
        assert eng.forward_pass.kernels() is not None
        assert {f.decode_kernel for f in eng.forward_pass.linears.values()} == {"cpu"}
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 4, 12)]
        names = [("a1", None), ("a2", None), ("tiny", {"a1": 0.6, "a2": -0.3}), ("tiny", None), ("a1", None),
                 ("a2", None)]
        stances = [eng.resolve_stance(m, s) for m, s in names]
        params = SamplingParams(max_tokens=12, temperature=0, logprobs=0)

        def answers(idx, sts):
            done = eng.generate_batch([prompts[i] for i in idx], sts, params)
            return [[(t.token_id, t.logprob) for t in c.tokens] for c in done]

        together = answers(range(6), stances)
        for i in range(6):
            assert answers([i], [stances[i]])[0] == together[i], i
        all_a1 = answers(range(6), [stances[0]] * 6)  # every row on a1: the step other kernels send down the dense path
        assert all_a1[0] == together[0] and all_a1[4] == together[4]
    finally:
        eng.stop()
