"""Builders of every test artefact; tests import them from here (``from tests.factories import ...``).

What it builds, by module:

* :mod:`~tests.factories.models`: tiny random Llama / Qwen2 / Phi models from configs (:func:`build_tiny_model`; Qwen3 and
  Mistral: :func:`build_extra_model`,
  the session-cached :func:`base_model` and its :func:`shapes`), the vendored stories260k test tokenizer
  (:func:`load_tokenizer`), a saved base-model folder (:func:`save_tiny_base`), and the ``LoadedModel`` factory
  for ``create_app(model_factory=...)`` (:func:`tiny_factory`).
* :mod:`~tests.factories.adapters`: peft adapter folders (:func:`write_peft_adapter`, the one writer;
  :func:`calm_and_bold`), ways to break them (:func:`edit_config`, :func:`edit_tensors`, :data:`REFUSED_CONFIGS`,
  :data:`REFUSED_TENSORS`), and a by-hand reader (:func:`read_adapter`, :func:`adapter_version`).
* :mod:`~tests.factories.payloads`: zip / tar.gz archives (malicious ones too: symlinks, devices, bombs),
  multipart file lists (:func:`adapter_files`), chat bodies (:func:`chat_body`), deeply nested JSON.
* :mod:`~tests.factories.stores`: a real :class:`AdapterStore` for the tiny models (:func:`new_store`) and
  :class:`FakeStore` for engine tests.
* :mod:`~tests.factories.engine`: started engines (:func:`make_engine`), one request drained in a running
  loop (:func:`collect`, or :func:`drain` keeping errors), greedy decoding by hand (:func:`reference_greedy`), a KV block's bytes
  (:func:`block_bytes`) and the peft-alone reference of a mixed multi-LoRA batch (:func:`peft_logits`,
  :func:`mixed_batch_and_alone`).
* :mod:`~tests.factories.schemas`: bounded random JSON schemas (:data:`SCHEMAS`, hypothesis).
* :mod:`~tests.factories.ci`: what CI runs, read from ``.ci/run`` and the Makefile (:func:`ci_steps`).
* :mod:`~tests.factories.dashboards`: the Grafana dashboard's queries (:func:`dashboard_queries`).
* :mod:`~tests.factories.http`: the app in-process on the tiny Llama (:func:`make_client`, :func:`wait_ready`,
  :func:`chat`, the admin :data:`KEY` / :data:`AUTH`) and the Prometheus reader :func:`metric`.
* :mod:`~tests.factories.servers`: real server processes (:func:`free_port`, :func:`run_server`).

What it does not: no fixtures (``conftest.py`` files hold those, calling these builders), no assertions and
no test-specific checks (each stays in its test module), nothing downloaded, nothing touched outside the
paths it is given. The load-test server process and its prober are :mod:`tests.server`.
"""

from tests.factories.adapters import (
    CFG,
    MODEL,
    Q0,
    REFUSED_CONFIGS,
    REFUSED_TENSORS,
    adapter_bytes,
    adapter_version,
    calm_and_bold,
    edit_config,
    edit_tensors,
    key,
    read_adapter,
    write_peft_adapter,
)
from tests.factories.engine import (
    block_bytes,
    collect,
    decode_attention_reference,
    decoder_logits,
    drain,
    make_engine,
    mixed_batch_and_alone,
    peft_logits,
    reference_greedy,
    row_kv,
)
from tests.factories.http import AUTH, KEY, chat, make_client, metric, wait_ready
from tests.factories.models import (
    BASE_MODEL,
    EXTRA_ARCHS,
    REPO,
    STORIES_DIR,
    TARGETS,
    base_model,
    build_extra_model,
    build_tiny_model,
    load_tokenizer,
    save_tiny_base,
    shapes,
    tiny_config,
    tiny_factory,
)
from tests.factories.payloads import (
    adapter_files,
    chat_body,
    nested_json,
    nested_obj,
    tar_bytes,
    zip_bytes,
    zip_folder,
)
from tests.factories.servers import APP_CLI, Server, free_port, preexec, run_server, stop_process
from tests.factories.stores import FakeStore, new_store

__all__ = [
    "APP_CLI", "AUTH", "block_bytes", "collect", "decode_attention_reference", "drain", "row_kv", "reference_greedy", "BASE_MODEL", "CFG", "KEY", "MODEL", "Q0", "REFUSED_CONFIGS", "REFUSED_TENSORS", "REPO",
    "STORIES_DIR", "TARGETS", "FakeStore", "Server", "adapter_bytes", "adapter_files", "adapter_version",
    "base_model", "build_extra_model", "build_tiny_model", "EXTRA_ARCHS", "calm_and_bold", "chat", "chat_body", "edit_config", "edit_tensors",
    "free_port", "key", "load_tokenizer", "make_client", "make_engine", "decoder_logits", "metric", "mixed_batch_and_alone",
    "nested_json", "nested_obj", "new_store", "peft_logits", "preexec", "read_adapter", "run_server", "stop_process",
    "save_tiny_base", "shapes", "tar_bytes", "tiny_config", "tiny_factory", "wait_ready", "write_peft_adapter",
    "zip_bytes", "zip_folder",
]
