"""Staging an uploaded adapter: the two peft files, or one archive of them, into a folder.

:func:`stage_upload` writes ``adapter_config.json`` and ``adapter_model.safetensors``
into a fresh folder, from either the two files themselves or one ``.zip`` /
``.tar.gz`` / ``.tgz`` / ``.tar`` archive holding them (at its top level or in one
sub-folder). It refuses pickle weights, unsafe archive members (absolute paths, ``..``,
links, devices) and anything larger than ``max_bytes`` uncompressed.

It does not look inside the files: reading them is
:func:`app.registry.peft_reader.read_peft_adapter`, checking the adapter against the base
model :func:`app.registry.validation.validate_adapter`, and storing it is
:class:`app.registry.store.AdapterStore`. It never extracts a member under its archive
name: only the two expected files are written, under their fixed names.
"""

from __future__ import annotations

import io
import logging
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

from app.errors import AdapterTooLargeError, AdapterValidationError
from app.registry.peft_reader import CONFIG_FILE, MODEL_FILE, PICKLE_HINT, PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

REQUIRED_FILES = (CONFIG_FILE, MODEL_FILE)
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
#: Most entries read from one archive (a peft folder has a handful).
MAX_ARCHIVE_MEMBERS = 10_000
_CHUNK = 1024 * 1024


class _Budget:
    """Counts bytes written against ``max_bytes``; raises AdapterTooLargeError past it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, n: int, param: str) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise AdapterTooLargeError(
                f"{param}: adapter is larger than the {self.max_bytes}-byte limit (max_adapter_bytes)", param=param
            )


def _too_large(archive: str, max_bytes: int) -> AdapterTooLargeError:
    return AdapterTooLargeError(
        f"{archive}: uncompressed content is larger than the {max_bytes}-byte limit (max_adapter_bytes)", param=archive
    )


def _basename(name: str) -> str:
    return (name or "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "upload"


def _archive_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    return None


def _is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def _refuse_pickle(name: str, param: str) -> AdapterValidationError:
    return AdapterValidationError(f"{name}: {PICKLE_HINT}", param=param)


def _reader(src: BinaryIO | bytes) -> Callable[[int], bytes]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src)).read
    return src.read


def _copy_limited(read: Callable[[int], bytes], out_path: Path, budget: _Budget, param: str) -> None:
    with open(out_path, "xb") as out:
        _copy_to(read, out, budget, param)


def _member_path(raw: str, archive: str) -> str:
    """Normalised relative path of an archive member; refuses absolute paths and ``..``."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise AdapterValidationError(f"{archive}: member name {raw!r} contains a NUL byte", param=archive)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise AdapterValidationError(f"{archive}: member {raw!r} has an absolute path", param=archive)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AdapterValidationError(f"{archive}: member {raw!r} escapes the archive folder ('..')", param=archive)
    return "/".join(parts)


class _Picker:
    """Collects the archive members named like the two required files and checks the layout."""

    def __init__(self, archive: str) -> None:
        self.archive = archive
        self.found: dict[str, str] = {}  # required file name -> member path
        self.count = 0

    def want(self, path: str) -> str | None:
        """The required file ``path`` is, if any; refuses pickles, duplicates, too many members."""
        self.count += 1
        if self.count > MAX_ARCHIVE_MEMBERS:
            raise AdapterValidationError(f"{self.archive}: more than {MAX_ARCHIVE_MEMBERS} entries", param=self.archive)
        base = posixpath.basename(path)
        if _is_pickle(base):
            raise _refuse_pickle(f"{self.archive}: {path}", self.archive)
        if base not in REQUIRED_FILES:
            return None
        if base in self.found:
            raise AdapterValidationError(
                f"{self.archive}: more than one {base} ({self.found[base]!r} and {path!r})", param=self.archive
            )
        folder = posixpath.dirname(path)
        if folder.count("/") > 0:
            raise AdapterValidationError(
                f"{self.archive}: {path!r} is nested too deep; put the adapter files at the top level "
                "or in one sub-folder",
                param=self.archive,
            )
        self.found[base] = path
        return base

    def finish(self) -> None:
        for name in REQUIRED_FILES:
            if name not in self.found:
                raise AdapterValidationError(f"{self.archive}: {name} is missing from the archive", param=name)
        folders = {posixpath.dirname(p) for p in self.found.values()}
        if len(folders) != 1:
            raise AdapterValidationError(
                f"{self.archive}: {CONFIG_FILE} and {MODEL_FILE} must be in the same folder "
                f"(found {sorted(self.found.values())})",
                param=self.archive,
            )


def _seekable(src: BinaryIO | bytes, limit: int, archive: str) -> BinaryIO:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    try:
        if src.seekable():
            return src
    except (AttributeError, OSError, ValueError):
        pass
    spool = tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024)
    _copy_to(src.read, spool, _Budget(limit), archive)
    spool.seek(0)
    return spool  # type: ignore[return-value]


def _copy_to(read: Callable[[int], bytes], out: BinaryIO, budget: _Budget, param: str) -> None:
    while chunk := read(_CHUNK):
        budget.take(len(chunk), param)
        out.write(chunk)


def _extract_zip(src: BinaryIO | bytes, archive: str, dest: Path, max_bytes: int) -> None:
    # A zip is at most slightly larger than its content (stored members plus headers).
    stream = _seekable(src, max_bytes + max_bytes // 64 + 1024 * 1024, archive)
    try:
        zf = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise AdapterValidationError(f"{archive}: not a valid zip archive ({exc})", param=archive) from None
    with zf:
        picker, declared, chosen = _Picker(archive), 0, {}
        for info in zf.infolist():
            path = _member_path(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise AdapterValidationError(f"{archive}: member {info.filename!r} is a symbolic link", param=archive)
            if info.is_dir() or not path:
                continue
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                raise AdapterValidationError(
                    f"{archive}: member {info.filename!r} is not a regular file", param=archive
                )
            declared += info.file_size
            if declared > max_bytes:
                raise _too_large(archive, max_bytes)
            base = picker.want(path)
            if base is not None:
                if info.flag_bits & 0x1:
                    raise AdapterValidationError(f"{archive}: member {info.filename!r} is encrypted", param=archive)
                chosen[base] = info
        picker.finish()
        budget = _Budget(max_bytes)
        for base, info in chosen.items():
            try:
                with zf.open(info) as member:
                    _copy_limited(member.read, dest / base, budget, archive)
            except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError, ValueError) as exc:
                message = f"{archive}: cannot read {info.filename!r} ({exc})"
                raise AdapterValidationError(message, param=archive) from None


def _extract_tar(src: BinaryIO | bytes, archive: str, dest: Path, max_bytes: int) -> None:
    stream = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src
    picker, declared, budget = _Picker(archive), 0, _Budget(max_bytes)
    try:
        # Streaming mode: one forward pass, stops at the first refused member or size overrun.
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                path = _member_path(member.name, archive)
                if member.issym() or member.islnk():
                    raise AdapterValidationError(f"{archive}: member {member.name!r} is a link", param=archive)
                if member.isdir() or not path:
                    continue
                if not member.isreg() or member.issparse():
                    raise AdapterValidationError(
                        f"{archive}: member {member.name!r} is not a regular file (device, fifo or sparse)",
                        param=archive,
                    )
                declared += member.size
                if declared > max_bytes:
                    raise _too_large(archive, max_bytes)
                base = picker.want(path)
                if base is not None:
                    fobj = tf.extractfile(member)
                    if fobj is None:
                        raise AdapterValidationError(f"{archive}: cannot read {member.name!r}", param=archive)
                    _copy_limited(fobj.read, dest / base, budget, archive)
    except AdapterValidationError:
        raise
    except Exception as exc:  # TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile...
        raise AdapterValidationError(f"{archive}: not a valid tar archive ({exc})", param=archive) from None
    picker.finish()


def _stage_files(files: list[tuple[str, BinaryIO | bytes]], dest: Path, max_bytes: int) -> None:
    names = [_basename(n) for n, _ in files]
    for name in names:
        if _is_pickle(name):
            raise _refuse_pickle(name, name)
    for required in REQUIRED_FILES:
        count = names.count(required)
        if count > 1:
            raise AdapterValidationError(f"{required}: uploaded {count} times; send it once", param=required)
        if count == 0:
            raise AdapterValidationError(
                f"{required}: missing; upload {CONFIG_FILE} and {MODEL_FILE}, or one .zip/.tar.gz archive of them",
                param=required,
            )
    budget = _Budget(max_bytes)
    for name, (_, src) in zip(names, files):
        if name in REQUIRED_FILES:
            _copy_limited(_reader(src), dest / name, budget, name)
        else:
            logger.debug("ignoring uploaded file %r", name)


def stage_upload(files: list[tuple[str, BinaryIO | bytes]], dest: Path, *, max_bytes: int) -> Path:
    """Write the uploaded adapter's two files into the fresh folder ``dest`` and return it.

    Args:
        files: ``(filename, content)`` pairs, content as bytes or a binary file object
            read from its current position (e.g. Starlette's ``UploadFile.file``). Either
            ``adapter_config.json`` + ``adapter_model.safetensors`` (matched by file name;
            other files such as ``README.md`` are ignored) or exactly one archive
            (``.zip``, ``.tar.gz``, ``.tgz``, ``.tar``) holding them at its top level or in
            one sub-folder.
        dest: a folder that does not exist or is empty; created if missing.
        max_bytes: most bytes of uncompressed content (``Settings.max_adapter_bytes``).

    Returns:
        ``dest``, holding exactly ``adapter_config.json`` and ``adapter_model.safetensors``
        (their content is not checked here).

    Raises:
        AdapterValidationError: (``param`` = the file or archive at fault) no files, pickle
            weights (``.bin``, ``.pt``, ``.pth``...), a missing or duplicated file, an
            archive mixed with other files, an unreadable archive, or an archive member with
            an absolute path, ``..``, a link, a device/fifo/sparse file, or nested deeper
            than one sub-folder.
        AdapterTooLargeError: declared archive sizes or bytes actually written exceed
            ``max_bytes`` (counted while extracting, so lying headers and zip bombs stop).
        ValueError: ``dest`` exists and is not an empty folder (a caller bug).
    """
    dest = Path(dest)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"staging folder {dest} is not empty")
    try:
        if not files:
            raise AdapterValidationError(
                f"no files uploaded; send {CONFIG_FILE} and {MODEL_FILE}, or one .zip/.tar.gz archive", param="files"
            )
        archives = [_basename(n) for n, _ in files if _archive_kind(_basename(n))]
        if archives and len(files) > 1:
            raise AdapterValidationError(
                f"{archives[0]}: upload either the adapter files or exactly one archive, not both", param=archives[0]
            )
        if archives:
            archive, src = archives[0], files[0][1]
            if _archive_kind(archive) == "zip":
                _extract_zip(src, archive, dest, max_bytes)
            else:
                _extract_tar(src, archive, dest, max_bytes)
        else:
            _stage_files(files, dest, max_bytes)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for child in dest.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    return dest
