"""The engine's C++ CPU kernels (``csrc/*.cpp``), built once per machine on first use.

:func:`extension` compiles them with :func:`torch.utils.cpp_extension.load` (``-O3 -march=native``, OpenMP for
``at::parallel_for``) and returns the built module, whose functions are:

* ``decode_attention``: one query token per row over the paged KV cache, the keys and values read in place
  through the rows' block tables (no gathered copy), fp32 softmax; and ``prefill_attention``: each row's new
  tokens attending causally over its blocks, in place, in tiles of queries (contracts in
  ``csrc/paged_attention.cpp``);
* ``rms_norm``, ``add_rms_norm_`` (the residual add and the next norm in one pass), ``silu_mul`` (the gated
  MLP's activation) and ``rope_store`` (rotary embedding of q and k, k and v stored into the cache), whose
  contracts are in ``csrc/fused_ops.cpp``;
* ``lora_rows_``: a step's LoRA terms (decode or prefill), each token's in one fixed order of its own, whatever
  the step's other rows (``csrc/lora_rows.cpp``).

All take fp32 or bf16 and compute in fp32. The built library is cached on disk under ``$TORCH_EXTENSIONS_DIR``
or ``~/.cache/stanceserve/torch_extensions``, in a folder named after a hash of the sources, of torch's version
and of the host CPU's flags (``/proc/cpuinfo``), so a cache shared by machines with different CPUs never loads a
binary built for another instruction set; ``cpp_extension``'s lock file keeps two processes from building the
same folder at once. A build that fails (no compiler, no headers, anything raised) logs one warning and
:func:`extension` returns ``None`` from then on: the caller keeps its PyTorch path.

:func:`warm_up` builds (or loads) it up front, so the engine pays the compile at start-up, not in a request.

Not here: when the kernels are used (:class:`app.engine.forward.ForwardPass`), CUDA.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: the kernels' C++ sources, shipped as package data
SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("paged_attention.cpp", "fused_ops.cpp", "lora_rows.cpp", "bindings.cpp")]
#: the headers they include (hashed with them into the build's name)
HEADERS = [Path(__file__).parent / "csrc" / "vec.h"]

#: compiler flags: gcc vectorises the maps over head_dim and positions for the build machine's vector width. No
#: ``-fassociative-math``: a reduction the compiler vectorises itself is peeled by the buffer's alignment, which
#: makes a row's sums depend on the other rows of the call; the kernel writes its sums in one fixed order instead
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_done = False
_module: Any = None
#: seconds the last build or load took (``None``: none ran in this process)
build_seconds: float | None = None


def _cpu_flags() -> str:
    """The ``flags`` line of ``/proc/cpuinfo`` (``""`` where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name(source: str) -> str:
    """The extension's name: ``stanceserve_cpu_kernels_`` and 12 hex digits of a hash of ``source`` (the sources'
    text), the compiler flags, torch's version and the host CPU's flags."""
    h = hashlib.sha256()
    for part in (source, " ".join(CFLAGS), torch.__version__, _cpu_flags()):
        h.update(part.encode())
        h.update(b"\0")
    return f"stanceserve_cpu_kernels_{h.hexdigest()[:12]}"


def build_root() -> Path:
    """Where built extensions go: ``$TORCH_EXTENSIONS_DIR`` if set, else ``~/.cache/stanceserve/torch_extensions``."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stanceserve" / "torch_extensions"


def _build() -> Any:
    """Compile (or load the cached build of) the extension and return it (a module with ``decode_attention`` and
    ``prefill_attention``).

    Raises:
        Exception: whatever the compiler, the loader or the file system raise.
    """
    from torch.utils import cpp_extension  # lazy: it imports setuptools, which only a build needs

    name = extension_name("\0".join(p.read_text() for p in SOURCES + HEADERS))
    folder = build_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    module = cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                                build_directory=str(folder), verbose=False)
    return module


def extension() -> Any:
    """The built module (see the module docstring), building or loading it on the first call (seconds to a minute;
    later calls return at once); ``None`` (after one logged warning saying why) when that failed, for the rest of
    the process."""
    global _done, _module, build_seconds
    if _done:
        return _module
    with _lock:
        if not _done:
            t0 = time.perf_counter()
            try:
                _module = _build()
            except Exception as e:  # noqa: BLE001 - any failure means the PyTorch path
                _module = None
                why = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
                logger.warning("CPU kernels unavailable, the engine stays on PyTorch ops: %s: %s",
                               type(e).__name__, why[:600])
            build_seconds = time.perf_counter() - t0
            if _module is not None:
                logger.info("CPU kernels ready in %.1f s (built or loaded from %s)", build_seconds,
                            build_root())
            _done = True
    return _module


def warm_up() -> bool:
    """Build or load the kernels now (call at start-up, before requests). Returns whether they are available."""
    return extension() is not None
