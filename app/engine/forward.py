"""The engine's own forward pass over a Hugging Face decoder's weights, with the engine's KV cache.

:class:`ForwardPass` runs Llama-style blocks (Llama, Mistral, Qwen2, Qwen3: pre-norm, gated MLP) and
Phi-style blocks (Phi: one LayerNorm feeding attention and MLP in parallel, partial rotary) on
*packed* tokens: a step's tokens from all rows are one ``[N, hidden]`` matrix, so prefill and decode
rows of any length share every matmul, and nothing is padded. Projections are :class:`FusedLinear`
(one matmul for q/k/v, one for gate/up, each with its fused LoRA slots). Rotary embeddings and norms
are the Hugging Face model's own modules (so rope scaling variants and RMSNorm/LayerNorm details
are theirs, except where the fused CPU kernels below replace them); attention is
``torch.nn.functional.scaled_dot_product_attention`` over each row's true
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
  kernel of :mod:`app.engine.cpu_kernels`, which reads each row's blocks in place through its block table (no
  gathered copy, no mask); where the kernel cannot be built, the matmul path above;
* prefill: with :attr:`ForwardPass.attention_kernel` on CPU, one call of the C++ prefill kernel over every row,
  each row's new tokens attending causally over its blocks in place; otherwise one SDPA call per row over its
  gathered blocks, causal from the row's cached length on (chunked prefill and prefix reuse start mid-sequence).

With the same kernels (:meth:`ForwardPass.kernels`) the element-wise steps of a Llama-style block are fused on CPU:
the residual add with the next RMSNorm, the rotary embedding of q and k with the k/v cache writes, the SiLU gate
(Phi's LayerNorm blocks keep the Hugging Face modules).

Checked against ``transformers``' logits for each supported architecture (tests/app/engine/test_forward.py).
Not here: what one pass computes (:class:`~app.engine.plan.Plan`, :mod:`app.engine.plan`), which tokens a step
runs (:mod:`app.engine.batch`), sampling, adapters' provenance.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from app.engine import cpu_kernels
from app.engine.kv_cache import BLOCK_SIZE, PagedKVCache, blocks_for
from app.engine.lora import FusedLinear, LoRABatch
from app.engine.plan import DecodeGroup, Plan

#: ``config.model_type`` values this forward pass implements.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one :class:`ForwardPass` implements (the message lists those it does)."""


class DecoderLayer:
    """One transformer block's weights and modules (norms from the Hugging Face layer)."""

    def __init__(self, index: int, layer: Any, prefix: str, parallel: bool, hidden_act: str | None = None) -> None:
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
        #: the block's two norms as ``(weight, eps)`` for the fused CPU kernels, when both are RMSNorms (Llama,
        #: Mistral, Qwen2, Qwen3); ``None``: the Hugging Face modules (Phi's LayerNorm)
        self.rms = None
        if not parallel:
            a, b = rms_params(self.input_norm), rms_params(self.post_norm)
            self.rms = (a, b) if a is not None and b is not None else None
        #: the gated MLP's activation is SiLU (the fused CPU kernel applies): the config's ``hidden_act``, or the module
        self.silu = self.gated and (hidden_act in ("silu", "swish") or isinstance(self.act, torch.nn.SiLU))

    def linears(self) -> list[FusedLinear]:
        return [self.qkv, self.o, self.gate_up, self.down]

    def mlp(self, x: torch.Tensor, routing: LoRABatch | None, ext: Any = None) -> torch.Tensor:
        """The MLP of ``x`` ``[N, d]``; ``ext``: the CPU kernels' module (its ``silu_mul`` when the activation is SiLU)."""
        h = self.gate_up(x, routing)
        if self.gated and ext is not None and self.silu:
            h = ext.silu_mul(h)
        elif self.gated:
            h = self.act(h[:, : self.d_ff]) * h[:, self.d_ff :]
        else:
            h = self.act(h)
        return self.down(h, routing)


def rms_params(norm: Any) -> tuple[torch.Tensor, float] | None:
    """``(weight, eps)`` of a Hugging Face RMSNorm computing ``weight * x / sqrt(mean(x^2) + eps)`` (Llama's, and
    the Mistral/Qwen2/Qwen3 copies of it), else ``None``."""
    if norm is None or not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
        return None
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    return w.data, float(norm.variance_epsilon)


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
            (:func:`app.engine.cpu_kernels.kernel`, built on first use: :meth:`warm_up`), falling back to the
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
        act = getattr(cfg, "hidden_act", None)
        self.layers = [DecoderLayer(i, layer, f"model.layers.{i}", parallel, act) for i, layer in enumerate(body.layers)]
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
        #: decode attention through the C++ kernel (:mod:`app.engine.cpu_kernels`) where it applies and builds: it
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

    def kernels(self) -> Any:
        """The C++ CPU kernels' module this pass uses (:func:`app.engine.cpu_kernels.extension`), or ``None``:
        :attr:`attention_kernel` off, not on CPU, a dtype other than fp32 and bf16, or kernels that did not build.
        The first call builds or loads them."""
        if not self.attention_kernel or self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16):
            return None
        return cpu_kernels.extension()

    def warm_up(self) -> bool:
        """Build or load the CPU kernels now (at start-up, not in the first request) when this pass uses them.
        Returns whether it runs through them."""
        return self.kernels() is not None

    def set_lora_kernel(self, name: str) -> None:
        """Route every linear's LoRA terms through kernel ``name`` (a key of
        :data:`app.engine.lora_kernels.KERNELS`, e.g. ``"cpu"``)."""
        for f in self.linears.values():
            f.decode_kernel = name

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
        ext = self.kernels()
        h = self.embed(plan.ids)  # [N, d]
        cos, sin = self.rotary(h, plan.positions[None])
        cos, sin = cos[0], sin[0]  # [N, rot]
        if ext is None:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, rot]
        hd, nh, kvh = self.head_dim, self.num_heads, self.kv_heads
        pending: torch.Tensor | None = None  # the last MLP's output, added to h by the next norm (fused path)
        for layer in self.layers:
            fused = ext is not None and layer.rms is not None
            if fused:
                (w_in, eps_in), (w_post, eps_post) = layer.rms
                x = ext.rms_norm(h, w_in, eps_in) if pending is None else ext.add_rms_norm_(h, pending, w_in, eps_in)
                pending = None
            else:
                x = layer.input_norm(h)
            qkv = layer.qkv(x, routing)
            q = qkv[:, : nh * hd].view(-1, nh, hd)
            k = qkv[:, nh * hd : (nh + kvh) * hd].view(-1, kvh, hd)
            v = qkv[:, (nh + kvh) * hd :].view(-1, kvh, hd)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            if ext is not None:  # rotate q and k, store k and v in the cache: one pass
                q = ext.rope_store(q, k, v, cos, sin, cache.k[layer.index], cache.v[layer.index], plan.kv_index)
            else:
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
                cache.write(layer.index, plan.kv_index, k, v)
            a = layer.o(self._attention(q, layer.index, plan, cache, ext), routing)
            if layer.parallel:
                h = h + a + layer.mlp(x, routing, ext)
            elif fused:
                pending = layer.mlp(ext.add_rms_norm_(h, a, w_post, eps_post), routing, ext)
            else:
                h = h + a
                h = h + layer.mlp(layer.post_norm(h), routing, ext)
        h = h.index_select(0, plan.logit_index)
        if pending is not None:
            h = h + pending.index_select(0, plan.logit_index)
        h = self.norm(h)
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

    def _decode_attention(self, q: torch.Tensor, group: DecodeGroup, layer: int, cache: PagedKVCache,
                          ext: Any) -> torch.Tensor:
        """Attention of one token per row of ``group`` (``q``: ``[g, heads, head_dim]``) -> ``[g, heads * head_dim]``;
        ``ext``: the CPU kernels' module (:meth:`kernels`) or ``None`` (PyTorch ops)."""
        hd, kvh, g = self.head_dim, self.kv_heads, self.groups
        n = q.shape[0]
        if ext is not None:
            # tables and positions may be views of static buffers (app.engine.graphs): the kernel reads them dense
            return ext.decode_attention(q.reshape(n, kvh, g, hd).contiguous(), cache.k[layer], cache.v[layer], group.tables.contiguous(),
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

    def _attention(self, q: torch.Tensor, layer: int, plan: Plan, cache: PagedKVCache, ext: Any) -> torch.Tensor:
        """Attention of the packed queries ``q`` ``[N, heads, head_dim]`` over their rows' blocks -> ``[N, heads * head_dim]``;
        ``ext``: the CPU kernels' module (:meth:`kernels`) or ``None`` (PyTorch ops)."""
        hd, kvh, g = self.head_dim, self.kv_heads, self.groups
        if plan.decode:
            groups = plan.decode_groups(split=ext is None)
            if len(groups) == 1 and groups[0].rows is None:
                return self._decode_attention(q, groups[0], layer, cache, ext)
            out = q.new_empty(q.shape[0], self.num_heads * hd)
            for group in groups:
                assert group.rows is not None
                out.index_copy_(0, group.rows, self._decode_attention(q.index_select(0, group.rows), group, layer, cache, ext))
            return out
        assert plan.row_tables is not None
        if ext is not None:
            n = q.shape[0]
            return ext.prefill_attention(q.reshape(n, kvh, g, hd).contiguous(), cache.k[layer], cache.v[layer],
                                         *plan.prefill_args(), self.scaling)
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
