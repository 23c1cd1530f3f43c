"""The engine's own forward pass over a Hugging Face decoder's weights, with the engine's KV cache.

:class:`ForwardPass` runs Llama-style blocks (Llama, Mistral, Qwen2, Qwen3: pre-norm, gated MLP) and
Phi-style blocks (Phi: one LayerNorm feeding attention and MLP in parallel, partial rotary) on
*packed* tokens: a step's tokens from all rows are one ``[N, hidden]`` matrix, so prefill and decode
rows of any length share every matmul, and nothing is padded. Projections are :class:`FusedLinear`
(one matmul for q/k/v, one for gate/up, each with its fused LoRA slots). Rotary embeddings and norms
are the Hugging Face model's own modules (so rope scaling variants and RMSNorm/LayerNorm details
are theirs); attention is ``torch.nn.functional.scaled_dot_product_attention`` over each row's true
length in the paged :class:`~app.engine.kv_cache.PagedKVCache`, read through block tables:

* decode (one token per row): one batched call over the rows' blocks gathered into
  ``[rows, kv_heads, L, head_dim]`` by one ``index_select`` per layer and tensor over the cache viewed as
  ``[kv_heads * blocks, block_size, head_dim]`` (:meth:`DecodeGroup.gather_index`), so the gathered keys are
  contiguous in the layout attention reads. Measured against a loop over rows reading each row's blocks
  (1.5-6x slower, except for a few rows of over a thousand tokens, where the two were even) and against
  gathering ``[kv_heads, rows, L, head_dim]`` and moving the rows into the heads axis (1.5-3x slower). The
  ``G = heads / kv_heads`` query heads of a KV head ride in the query-length axis (``[rows, kv_heads, G,
  head_dim]``), so grouped-query attention needs no repeated keys, and a ``[rows, 1, 1, L]`` mask hides each
  row's positions past its length. Rows of very different lengths (a few long prompts among short ones)
  attend in groups of similar lengths (:class:`DecodeGroup`), so short rows do not gather the longest
  row's positions. On CPU the call is two batched matmuls and a softmax (fp32 scores) rather than SDPA
  (faster for one-token queries: :attr:`ForwardPass.matmul_decode_attention`). With
  :attr:`ForwardPass.attention_kernel`, on CPU in fp32 and bf16, decode attention is instead one call of the C++
  kernel of :mod:`app.engine.cpu_attention`, which reads each row's blocks in place through its block table (no
  gathered copy, no mask); where the kernel cannot be built, the matmul path above;
* prefill: one call per row over its gathered blocks, causal from the row's cached length on (chunked
  prefill and prefix reuse start mid-sequence).

Checked against ``transformers``' logits for each supported architecture (tests/app/engine/test_forward.py).
Not here: which tokens a step runs (:mod:`app.engine.batch`), sampling, adapters' provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from app.engine import cpu_attention
from app.engine.kv_cache import BLOCK_SIZE, NULL_BLOCK, PagedKVCache, blocks_for
from app.engine.lora import FusedLinear, LoRABatch

#: ``config.model_type`` values this forward pass implements.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one :class:`ForwardPass` implements (the message lists those it does)."""


@dataclass
class DecodeGroup:
    """Decode rows whose attention runs as one batched call over their blocks.

    Attributes:
        rows: ``[g]`` int64, the rows' indices in the plan (``None``: every row, in order).
        tables: ``[g, blocks]`` int64, each row's block table up to the group's longest row, padded with the null
            block; attention reads ``L = blocks * block_size`` positions of each row.
        positions: ``[g]`` int64, each row's position (its last visible key).
        block_size: positions per block.
    """

    rows: torch.Tensor | None
    tables: torch.Tensor
    positions: torch.Tensor
    block_size: int
    _mask: torch.Tensor | None = None
    _bias: torch.Tensor | None = None
    _index: torch.Tensor | None = None

    def mask(self) -> tuple[torch.Tensor, int]:
        """``([g, 1, 1, L] bool, L)``: key ``j`` of row ``b`` is visible iff ``j <= position_b``."""
        if self._mask is None:
            length = int(self.tables.shape[1]) * self.block_size
            ar = torch.arange(length, device=self.positions.device)
            self._mask = (ar[None, :] <= self.positions[:, None])[:, None, None, :]
        return self._mask, int(self._mask.shape[-1])

    def bias(self) -> torch.Tensor:
        """:meth:`mask` as an additive fp32 score bias ``[g, 1, 1, L]``: 0 where visible, ``-inf`` elsewhere (the
        matmul decode attention keeps its scores in fp32 in every dtype)."""
        if self._bias is None:
            mask, _ = self.mask()
            self._bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
        return self._bias

    def gather_index(self, kv_heads: int, num_blocks: int) -> torch.Tensor:
        """``[g * kv_heads * blocks]`` int64: for row ``r``, KV head ``h`` and table entry ``i``, the block
        ``h * num_blocks + tables[r, i]`` of a cache layer viewed as ``[kv_heads * num_blocks, block_size,
        head_dim]``, in ``(r, h, i)`` order, so the gathered blocks view as ``[g, kv_heads, L, head_dim]``."""
        if self._index is None:
            heads = torch.arange(kv_heads, device=self.tables.device) * num_blocks
            self._index = (self.tables[:, None, :] + heads[None, :, None]).reshape(-1)
        return self._index


@dataclass
class Plan:
    """What one forward pass computes: its packed tokens, where their KV goes and which logits come back.

    Attributes:
        ids, positions: ``[N]`` int64 token ids and positions of the packed tokens.
        kv_index: ``[N]`` int64, where each token's key and value go: ``block * block_size + offset`` in the
            :class:`~app.engine.kv_cache.PagedKVCache` (KV has blocks; only adapters have slots).
        rows: per sequence, ``(block table, first token index in the pack, tokens, cached length before them)``.
        decode: every sequence has one token (then token ``i`` is sequence ``i``).
        logit_index: ``[M]`` int64, the packed tokens whose logits are returned.
        tables: decode only: ``[rows, blocks]`` int64, each row's block table up to the longest row's length,
            padded with the null block; attention reads ``blocks * block_size`` positions of every row, a mask
            hiding each row's positions past its own (a fixed width gives a step static shapes:
            :mod:`app.engine.graphs`).
        row_tables: prefill only: per sequence, ``[blocks]`` int64, the blocks holding its first
            ``cached + tokens`` positions.
        block_size: positions per block.
        groups: decode only: the rows split by length (:meth:`decode_groups`), or ``None``: one group.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    kv_index: torch.Tensor
    rows: list[tuple[list[int], int, int, int]]
    decode: bool
    logit_index: torch.Tensor
    tables: torch.Tensor | None = None
    row_tables: list[torch.Tensor] | None = None
    all_logits: bool = False
    block_size: int = BLOCK_SIZE
    groups: list[DecodeGroup] | None = None
    _prefill_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(
        cls, rows: list[tuple[list[int], list[int], int]], device: torch.device, *, all_logits: bool = False,
        block_size: int = BLOCK_SIZE,
    ) -> Plan:
        """A plan from ``(block table, new token ids, cached length)`` per sequence.

        A sequence's new tokens take positions ``cached .. cached + len(ids) - 1``; its table must hold a block
        for each of them. Logits come back for each sequence's last token (``[sequences, vocab]``), or with
        ``all_logits`` for every token (``[N, vocab]``, for tests and scoring).

        Raises:
            ValueError: a table is too short for its sequence's positions.
        """
        ids: list[int] = []
        pos: list[int] = []
        kv_index: list[int] = []
        spans = []
        last = []
        for table, toks, cached in rows:
            end = cached + len(toks)
            if blocks_for(end, block_size) > len(table):
                raise ValueError(f"a block table of {len(table)} blocks cannot hold {end} positions")
            spans.append((table, len(ids), len(toks), cached))
            ids.extend(toks)
            pos.extend(range(cached, end))
            kv_index.extend(table[p // block_size] * block_size + p % block_size for p in range(cached, end))
            last.append(len(ids) - 1)
        decode = all(n == 1 for _, _, n, _ in spans)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        index = t(list(range(len(ids)))) if all_logits else t(last)
        tables = row_tables = groups = None
        if decode:
            widths = [blocks_for(c + 1, block_size) for *_, c in spans]
            width = max(widths)

            def padded(rows: list[int], w: int) -> torch.Tensor:
                return t([list(spans[i][0][:w]) + [NULL_BLOCK] * (w - min(len(spans[i][0]), w)) for i in rows])

            tables = padded(list(range(len(spans))), width)
            # rows of very different lengths attend in groups of similar widths (powers of two of blocks), so short
            # rows do not gather the longest row's length; only when that halves the positions read
            by_width: dict[int, list[int]] = {}
            for i, w in enumerate(widths):
                by_width.setdefault(1 << (w - 1).bit_length(), []).append(i)
            split = sum(len(r) * max(widths[i] for i in r) for r in by_width.values())
            if len(by_width) > 1 and 2 * split <= len(spans) * width:
                groups = [
                    DecodeGroup(t(r), padded(r, max(widths[i] for i in r)), t([spans[i][3] for i in r]), block_size)
                    for _, r in sorted(by_width.items())
                ]
        else:
            row_tables = [t(list(tb[: blocks_for(c + n, block_size)])) for tb, _, n, c in spans]
        return cls(t(ids), t(pos), t(kv_index), spans, decode, index, tables, row_tables, all_logits, block_size, groups)

    def prefill_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill only: ``(tables [R, W], starts [R], counts [R], cached [R])`` int64, the rows' block tables (padded
        with the null block to the longest), first token indices in the pack, new tokens and cached lengths, as the
        CPU prefill kernel takes them (:func:`app.engine.cpu_attention.prefill_kernel`); built once per plan."""
        assert self.row_tables is not None, "not a prefill plan"
        if self._prefill_args is None:
            width = max(int(t.shape[0]) for t in self.row_tables)
            tables = torch.full((len(self.rows), width), NULL_BLOCK, dtype=torch.long, device=self.ids.device)
            for i, t in enumerate(self.row_tables):
                tables[i, : t.shape[0]] = t
            meta = torch.tensor([[a, n, c] for _, a, n, c in self.rows], dtype=torch.long, device=self.ids.device)
            self._prefill_args = (tables, meta[:, 0].contiguous(), meta[:, 1].contiguous(), meta[:, 2].contiguous())
        return self._prefill_args

    @property
    def segments(self) -> list[tuple[int, int]]:
        """Each sequence's token range ``(start, end)`` in the pack."""
        return [(a, a + n) for _, a, n, _ in self.rows]

    def decode_groups(self, split: bool = True) -> list[DecodeGroup]:
        """The decode rows' attention groups: :attr:`groups`, or one group of every row over :attr:`tables`.

        ``split=False``: that one group whatever :attr:`groups` holds, for attention that reads each row's own
        positions only (the CPU kernel), where splitting rows by length saves nothing.
        """
        assert self.tables is not None, "not a decode plan"
        if not split:
            return [DecodeGroup(None, self.tables, self.positions, self.block_size)]
        if self.groups is None:
            self.groups = [DecodeGroup(None, self.tables, self.positions, self.block_size)]
        return self.groups


class DecoderLayer:
    """One transformer block's weights and modules (norms from the Hugging Face layer)."""

    def __init__(self, index: int, layer: Any, prefix: str, parallel: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.index = index
        self.parallel = parallel
        self.input_norm = layer.input_layernorm
        self.post_norm = None if parallel else layer.post_attention_layernorm
        self.q_norm = getattr(attn, "q_norm", None) or getattr(attn, "q_layernorm", None)
        self.k_norm = getattr(attn, "k_norm", None) or getattr(attn, "k_layernorm", None)
        a = f"{prefix}.self_attn"
        self.qkv = FusedLinear(f"layers.{index}.qkv", [(f"{a}.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")])
        o_name = "o_proj" if hasattr(attn, "o_proj") else "dense"
        self.o = FusedLinear(f"layers.{index}.o", [(f"{a}.{o_name}", getattr(attn, o_name))])
        m = f"{prefix}.mlp"
        if hasattr(mlp, "gate_proj"):
            self.gate_up = FusedLinear(f"layers.{index}.gate_up", [(f"{m}.gate_proj", mlp.gate_proj), (f"{m}.up_proj", mlp.up_proj)])
            self.down = FusedLinear(f"layers.{index}.down", [(f"{m}.down_proj", mlp.down_proj)])
            self.act = mlp.act_fn
            self.gated = True
        else:
            self.gate_up = FusedLinear(f"layers.{index}.fc1", [(f"{m}.fc1", mlp.fc1)])
            self.down = FusedLinear(f"layers.{index}.fc2", [(f"{m}.fc2", mlp.fc2)])
            self.act = mlp.activation_fn
            self.gated = False
        self.d_ff = self.down.in_features

    def linears(self) -> list[FusedLinear]:
        return [self.qkv, self.o, self.gate_up, self.down]

    def mlp(self, x: torch.Tensor, routing: LoRABatch | None) -> torch.Tensor:
        h = self.gate_up(x, routing)
        if self.gated:
            h = self.act(h[:, : self.d_ff]) * h[:, self.d_ff :]
        else:
            h = self.act(h)
        return self.down(h, routing)


class ForwardPass:
    """The engine's forward pass over ``model``'s weights (see the module docstring).

    Args:
        model: a Hugging Face causal LM of a supported ``model_type``, in eval mode. Its q/k/v and
            gate/up weights become views of fused copies (the model still runs as before, unless
            ``prepack`` frees them).
        prepack: on CPU, the decode batch size (rows) to prepack the linear weights for
            (:meth:`~app.engine.lora.FusedLinear.prepack`); their dense copies are then freed (a tied
            ``lm_head`` keeps its, the embedding's) and the Hugging Face model can no longer be called.
            ``None``: plain ``F.linear`` over the dense weights.
        keep_dense: with ``prepack``, keep the dense weights too (the model stays callable, at the cost of
            holding the linear weights twice), for callers that still run the Hugging Face model.
        attention_kernel: on CPU in fp32 or bf16, run decode attention through the C++ kernel
            (:func:`app.engine.cpu_attention.kernel`, built on first use: :meth:`warm_up`), falling back to the
            matmul path when it cannot be built. The engine sets it from ``cpu_attention_kernel``.

    Attributes:
        num_layers, num_heads, kv_heads, head_dim: attention shape.
        linears: every :class:`FusedLinear` by name (for :class:`~app.engine.lora.MultiLoRA`).
        max_context: the longest sequence the architecture attends over in full (a sliding window,
            when the config has one), in tokens, or ``None``.

    Raises:
        UnsupportedModelError: another architecture, or a feature this forward does not implement.
    """

    def __init__(self, model: Any, *, prepack: int | None = None, keep_dense: bool = False,
                 attention_kernel: bool = False) -> None:
        cfg = model.config
        mt = getattr(cfg, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {mt!r} is not supported; stanceserve runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if getattr(cfg, "use_sliding_window", False) and mt in ("qwen2", "qwen3"):
            raise UnsupportedModelError(f"{mt} with use_sliding_window=True is not supported")
        body = model.model
        self.model = model
        self.embed = body.embed_tokens
        self.rotary = body.rotary_emb
        self.norm = getattr(body, "norm", None) or body.final_layernorm
        parallel = mt == "phi"
        self.layers = [DecoderLayer(i, layer, f"model.layers.{i}", parallel) for i, layer in enumerate(body.layers)]
        self.lm_head = FusedLinear("lm_head", [("lm_head", model.lm_head)])
        attn = body.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = int(attn.head_dim)
        self.num_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.groups = self.num_heads // self.kv_heads
        self.scaling = float(attn.scaling)
        self.rotary_dim = int(getattr(attn, "rotary_ndims", self.head_dim))
        window = getattr(cfg, "sliding_window", None) if mt == "mistral" else None
        self.max_context = int(window) if window else None
        self.linears: dict[str, FusedLinear] = {f.name: f for layer in self.layers for f in layer.linears()}
        self.linears[self.lm_head.name] = self.lm_head
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        #: decode attention as two batched matmuls and a softmax instead of SDPA: on CPU, where that is faster for
        #: decode rows (SDPA's fused kernel pays a fixed cost per call and per query that one-token queries do not
        #: amortise: 1.8x in bf16 and 2-3x in fp32 at 64 rows of 112 positions, ``bench/decode.py`` times both). In
        #: half types the scores and the softmax are fp32, as in SDPA's kernel. On CUDA SDPA (fused kernels).
        self.matmul_decode_attention = self.device.type == "cpu"
        #: decode attention through the C++ kernel (:mod:`app.engine.cpu_attention`) where it applies and builds: it
        #: reads the blocks in place (no gather), 2-6x the matmul path per layer at 16-128 rows of 100-1000 positions
        #: (SmolLM2-135M shapes, bf16, one thread; a 64-row decode step 1.3x), ``bench/decode.py`` times both
        self.attention_kernel = attention_kernel
        #: the linears run through oneDNN-prepacked weights
        self.prepacked = False
        if prepack is not None:
            tied = model.lm_head.weight.data_ptr() == self.embed.weight.data_ptr()
            self.prepacked = all(
                f.prepack(prepack, release=not (keep_dense or (f is self.lm_head and tied))) for f in self.linears.values()
            )

    def decode_kernel(self) -> Any:
        """The C++ decode-attention function this pass uses (:func:`app.engine.cpu_attention.kernel`), or ``None``:
        :attr:`attention_kernel` off, not on CPU, a dtype other than fp32 and bf16, or a kernel that did not build.
        The first call builds or loads the kernel."""
        if not self.attention_kernel or self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16):
            return None
        return cpu_attention.kernel()

    def prefill_kernel(self) -> Any:
        """The C++ prefill-attention function this pass uses (:func:`app.engine.cpu_attention.prefill_kernel`), or
        ``None``, under the same conditions as :meth:`decode_kernel`."""
        if self.decode_kernel() is None:
            return None
        return cpu_attention.prefill_kernel()

    def warm_up(self) -> bool:
        """Build or load the decode-attention kernel now (at start-up, not in the first request) when this pass
        uses it. Returns whether decode attention runs through it."""
        return self.decode_kernel() is not None

    def new_cache(self, blocks: int, *, block_size: int = BLOCK_SIZE, max_cached: int = 0) -> PagedKVCache:
        """A :class:`PagedKVCache` for this model of ``blocks`` blocks (the null block included)."""
        return PagedKVCache(self.num_layers, self.kv_heads, self.head_dim, blocks, self.dtype, self.device,
                            block_size=block_size, max_cached=max_cached)

    def row_cache(self, rows: int, max_len: int) -> tuple[PagedKVCache, list[list[int]]]:
        """A cache just big enough for ``rows`` sequences of ``max_len`` positions, and their block tables (tests
        and benchmarks of fixed-length rows). Blocks are handed out round-robin, so no table is one run of blocks."""
        per = blocks_for(max_len)
        cache = self.new_cache(rows * per + 1)
        tables: list[list[int]] = [[] for _ in range(rows)]
        for _ in range(per):
            for t in tables:
                t += cache.allocate(1)
        return cache, tables

    def budgeted_cache(self, budget_bytes: int, max_len: int, *, max_blocks: int | None = None,
                       prefix_bytes: int = 0) -> PagedKVCache:
        """A :class:`PagedKVCache` for this model within ``budget_bytes`` (:meth:`PagedKVCache.budgeted`)."""
        return PagedKVCache.budgeted(self.num_layers, self.kv_heads, self.head_dim, self.dtype, self.device,
                                     budget_bytes=budget_bytes, max_len=max_len, max_blocks=max_blocks,
                                     prefix_bytes=prefix_bytes)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, plan: Plan, cache: PagedKVCache, routing: LoRABatch | None) -> torch.Tensor:
        """Run ``plan``'s tokens, writing their KV into ``cache``.

        Returns:
            ``[len(plan.logit_index), vocab]`` logits of the selected tokens, in the model's dtype.
        """
        h = self.embed(plan.ids)  # [N, d]
        cos, sin = self.rotary(h, plan.positions[None])
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [N, 1, rot]
        hd, nh, kvh = self.head_dim, self.num_heads, self.kv_heads
        for layer in self.layers:
            x = layer.input_norm(h)
            qkv = layer.qkv(x, routing)
            q = qkv[:, : nh * hd].view(-1, nh, hd)
            k = qkv[:, nh * hd : (nh + kvh) * hd].view(-1, kvh, hd)
            v = qkv[:, (nh + kvh) * hd :].view(-1, kvh, hd)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            cache.write(layer.index, plan.kv_index, k, v)
            a = layer.o(self._attention(q, layer.index, plan, cache), routing)
            if layer.parallel:
                h = h + a + layer.mlp(x, routing)
            else:
                h = h + a
                h = h + layer.mlp(layer.post_norm(h), routing)
        h = self.norm(h.index_select(0, plan.logit_index))
        return self.lm_head(h, routing if plan.all_logits else routing_for_logits(routing, plan))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding (Su et al. 2021, arXiv:2104.09864) in Hugging Face's rotate-half layout.

        ``x``: ``[N, heads, head_dim]``; ``cos``, ``sin``: ``[N, 1, rotary_dim]``. Only the first
        ``rotary_dim`` features rotate (Phi's partial rotary).
        """
        r = self.rotary_dim
        xr = x[..., :r]
        half = r // 2
        rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
        out = xr * cos + rotated * sin
        if r == x.shape[-1]:
            return out
        return torch.cat((out, x[..., r:]), dim=-1)

    def _decode_attention(self, q: torch.Tensor, group: DecodeGroup, layer: int, cache: PagedKVCache) -> torch.Tensor:
        """Attention of one token per row of ``group`` (``q``: ``[g, heads, head_dim]``) -> ``[g, heads * head_dim]``."""
        hd, kvh, g = self.head_dim, self.kv_heads, self.groups
        n = q.shape[0]
        fn = self.decode_kernel()
        if fn is not None:
            # tables and positions may be views of static buffers (app.engine.graphs): the kernel reads them dense
            return fn(q.reshape(n, kvh, g, hd).contiguous(), cache.k[layer], cache.v[layer], group.tables.contiguous(),
                      group.positions.contiguous(), self.scaling)
        k, v = cache.gather(layer, group.gather_index(kvh, cache.num_blocks), n)  # [n, kv_heads, L, hd]
        qg = q.view(n, kvh, g, hd)
        if self.matmul_decode_attention:
            if k.dtype == torch.float32:
                scores = torch.matmul(qg, k.transpose(-1, -2))  # [n, kv_heads, G, L]
            else:  # half types: fp32 scores (rounding them to bf16 costs ~10x SDPA's error), probabilities back
                scores = torch.matmul(qg.float(), k.float().transpose(-1, -2))
            scores.mul_(self.scaling).add_(group.bias())
            out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        else:
            mask, _ = group.mask()
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scaling)
        return out.reshape(n, kvh * g * hd)

    def _attention(self, q: torch.Tensor, layer: int, plan: Plan, cache: PagedKVCache) -> torch.Tensor:
        """Attention of the packed queries ``q`` ``[N, heads, head_dim]`` over their rows' blocks -> ``[N, heads * head_dim]``."""
        hd, kvh, g = self.head_dim, self.kv_heads, self.groups
        if plan.decode:
            groups = plan.decode_groups(split=self.decode_kernel() is None)
            if len(groups) == 1 and groups[0].rows is None:
                return self._decode_attention(q, groups[0], layer, cache)
            out = q.new_empty(q.shape[0], self.num_heads * hd)
            for group in groups:
                assert group.rows is not None
                out.index_copy_(0, group.rows, self._decode_attention(q.index_select(0, group.rows), group, layer, cache))
            return out
        assert plan.row_tables is not None
        fn = self.prefill_kernel()
        if fn is not None:
            n = q.shape[0]
            return fn(q.reshape(n, kvh, g, hd).contiguous(), cache.k[layer], cache.v[layer], *plan.prefill_args(),
                      self.scaling)
        kc, vc = cache.k[layer], cache.v[layer]
        bs = cache.block_size
        out = q.new_empty(q.shape[0], self.num_heads * hd)
        for (_, a, n, cached), table in zip(plan.rows, plan.row_tables):
            length = cached + n
            width = int(table.shape[0]) * bs
            qr = q[a : a + n].permute(1, 0, 2).reshape(1, kvh, g * n, hd)  # [1, kv_heads, G*n, hd]
            ar = torch.arange(length, device=q.device)
            causal = ar[None, :] <= (cached + torch.arange(n, device=q.device))[:, None]  # [n, L]
            k = kc.index_select(1, table).view(1, kvh, width, hd)[:, :, :length]
            v = vc.index_select(1, table).view(1, kvh, width, hd)[:, :, :length]
            # 4-D inputs: the fused (flash) CPU kernel takes them; 3-D ones fall back to the math path (1.7x slower)
            o = F.scaled_dot_product_attention(qr, k, v, attn_mask=causal.repeat(g, 1)[None, None], scale=self.scaling)
            out[a : a + n] = o.view(kvh, g, n, hd).permute(2, 0, 1, 3).reshape(n, -1)
        return out


def routing_for_logits(routing: LoRABatch | None, plan: Plan) -> LoRABatch | None:
    """The routing of the rows whose logits are computed (one token per sequence, so decode-shaped)."""
    if routing is None or routing.segments is None:
        return routing
    return LoRABatch(routing.rows, routing.idx, routing.weights, None, routing.uniform_slot)
