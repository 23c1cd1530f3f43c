"""What clients send: archives of adapter folders (malicious ones included), multipart file lists,
request bodies, and hostile deeply nested JSON.

Bytes and dicts only; sending them is the tests' business (see :mod:`tests.factories.http`).
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

from tests.factories.adapters import CFG, MODEL


# ---------------------------------------------------------------------------- archives
def zip_bytes(entries: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    """A deflated zip of ``entries`` (name -> content), plus ``symlinks`` (name -> target) as symbolic-link entries."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def tar_bytes(entries: dict[str, bytes], *, special: list[tarfile.TarInfo] = (), mode="w:gz") -> bytes:
    """A tar (gzip'd by default) of ``entries`` (name -> content), plus ``special`` members (links, devices) as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in special:
            tf.addfile(info)
    return buf.getvalue()


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    """A stored (uncompressed) zip of an adapter folder's two files, named ``prefix + file name``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in (CFG, MODEL):
            z.write(folder / f, f"{prefix}{f}")
    return buf.getvalue()


# ---------------------------------------------------------------------------- multipart and bodies
def adapter_files(folder: Path, *, content_types: bool = True) -> list[tuple]:
    """The ``files`` of a ``POST /v1/adapters`` (httpx / TestClient form) carrying an adapter folder's two files.

    ``content_types=False`` leaves the parts' content types for the client to guess from the names.
    """
    cfg, model = (folder / CFG).read_bytes(), (folder / MODEL).read_bytes()
    if not content_types:
        return [("files", (CFG, cfg)), ("files", (MODEL, model))]
    return [
        ("files", (CFG, cfg, "application/json")),
        ("files", (MODEL, model, "application/octet-stream")),
    ]


def chat_body(model: str, content: str = "Once upon a time", *, max_tokens: int = 8, temperature: float = 0,
              **extra) -> dict:
    """A one-message chat completion request (greedy, 8 tokens unless told), ``extra`` fields added."""
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": temperature, **extra}


# ---------------------------------------------------------------------------- hostile JSON
def nested_json(depth: int, inner: str = "1") -> str:
    """JSON text of ``inner`` inside ``depth`` nested arrays."""
    return "[" * depth + inner + "]" * depth


def nested_obj(depth: int) -> dict:
    """A dict whose JSON is ``depth`` levels deep (built without recursion)."""
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value
