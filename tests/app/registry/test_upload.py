"""stage_upload: plain files, zip and tar archives, and every refusal (pickles, traversal, links, bombs)."""

from __future__ import annotations

import io
import tarfile

import pytest

from app.errors import AdapterTooLargeError, AdapterValidationError
from app.registry.upload import stage_upload
from app.registry.validation import load_adapter_weights
from tests.factories import shapes, tar_bytes, zip_bytes

CFG, MODEL = "adapter_config.json", "adapter_model.safetensors"
MB = 1024 * 1024


def assert_staged(dest, payload):
    assert sorted(p.name for p in dest.iterdir()) == [CFG, MODEL]
    assert (dest / CFG).read_bytes() == payload[CFG]
    assert (dest / MODEL).read_bytes() == payload[MODEL]


def refused(files, dest, fragment, *, param=None, max_bytes=64 * MB, error=AdapterValidationError):
    with pytest.raises(error) as exc:
        stage_upload(files, dest, max_bytes=max_bytes)
    assert fragment in exc.value.message, exc.value.message
    if param is not None:
        assert exc.value.param == param
        assert param in exc.value.message
    assert not dest.exists() or not any(dest.iterdir()), "a refused upload left files behind"
    return exc.value


# --------------------------------------------------------------------------- accepted


def test_two_files_as_bytes(tmp_path, payload):
    files = [(CFG, payload[CFG]), (MODEL, payload[MODEL]), ("README.md", b"# hi")]
    dest = stage_upload(files, tmp_path / "stage", max_bytes=64 * MB)
    assert dest == tmp_path / "stage"
    assert_staged(dest, payload)


def test_two_files_as_streams_with_client_paths(tmp_path, payload):
    files = [("C:\\Users\\me\\out\\" + MODEL, io.BytesIO(payload[MODEL])), ("out/" + CFG, io.BytesIO(payload[CFG]))]
    dest = tmp_path / "stage"
    dest.mkdir()  # an existing empty folder is fine
    assert_staged(stage_upload(files, dest, max_bytes=64 * MB), payload)


def test_staged_upload_validates(tmp_path, payload):
    dest = stage_upload([(CFG, payload[CFG]), (MODEL, payload[MODEL])], tmp_path / "s", max_bytes=64 * MB)
    weights, _ = load_adapter_weights(dest, "x", shapes("llama"), max_rank=64)
    assert len(weights.modules) == 14


@pytest.mark.parametrize("prefix", ["", "pirate/", "./pirate/"])
def test_zip(tmp_path, payload, prefix):
    data = zip_bytes({prefix + CFG: payload[CFG], prefix + MODEL: payload[MODEL], prefix + "README.md": b"x",
                     "__MACOSX/pirate/._adapter_config.json": b"junk"})
    assert_staged(stage_upload([("pirate.zip", data)], tmp_path / "s", max_bytes=64 * MB), payload)


@pytest.mark.parametrize("archive, mode", [("a.tar.gz", "w:gz"), ("a.tgz", "w:gz"), ("a.tar", "w")])
@pytest.mark.parametrize("prefix", ["", "stance/"])
def test_tar(tmp_path, payload, archive, mode, prefix):
    data = tar_bytes({prefix + CFG: payload[CFG], prefix + MODEL: payload[MODEL], "notes.txt": b"x"}, mode=mode)
    assert_staged(stage_upload([(archive, io.BytesIO(data))], tmp_path / "s", max_bytes=64 * MB), payload)


class _Unseekable(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n=-1) -> bytes:
        return self._buf.read(n)


def test_zip_from_unseekable_stream(tmp_path, payload):
    data = zip_bytes({CFG: payload[CFG], MODEL: payload[MODEL]})
    assert_staged(stage_upload([("a.zip", _Unseekable(data))], tmp_path / "s", max_bytes=64 * MB), payload)


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt", "weights.pth"])
def test_pickle_files_refused(tmp_path, payload, name):
    err = refused([(CFG, payload[CFG]), (name, b"\x80\x04")], tmp_path / "s", "safe_serialization=True", param=name)
    assert "pickle" in err.message


def test_pickle_in_archive_refused(tmp_path, payload):
    data = zip_bytes({"a/" + CFG: payload[CFG], "a/" + MODEL: payload[MODEL], "a/optimizer.pt": b"\x80"})
    refused([("a.zip", data)], tmp_path / "s", "a/optimizer.pt: pickle weights are refused", param="a.zip")


def test_missing_file(tmp_path, payload):
    refused([(CFG, payload[CFG])], tmp_path / "s", "missing", param=MODEL)
    refused([("README.md", b"x")], tmp_path / "s", "missing", param=CFG)
    refused([], tmp_path / "s", "no files", param="files")


def test_missing_file_in_archive(tmp_path, payload):
    data = tar_bytes({"x/" + CFG: payload[CFG]})
    refused([("x.tar.gz", data)], tmp_path / "s", "missing from the archive", param=MODEL)


def test_duplicate_files(tmp_path, payload):
    files = [(CFG, payload[CFG]), ("dir/" + CFG, payload[CFG]), (MODEL, payload[MODEL])]
    refused(files, tmp_path / "s", "uploaded 2 times", param=CFG)


def test_duplicate_in_archive(tmp_path, payload):
    data = zip_bytes({CFG: payload[CFG], MODEL: payload[MODEL], "sub/" + CFG: payload[CFG]})
    refused([("a.zip", data)], tmp_path / "s", "more than one adapter_config.json", param="a.zip")


def test_files_in_two_folders(tmp_path, payload):
    data = zip_bytes({"a/" + CFG: payload[CFG], "b/" + MODEL: payload[MODEL]})
    refused([("a.zip", data)], tmp_path / "s", "same folder", param="a.zip")


def test_too_deep(tmp_path, payload):
    data = zip_bytes({"a/b/" + CFG: payload[CFG], "a/b/" + MODEL: payload[MODEL]})
    refused([("a.zip", data)], tmp_path / "s", "nested too deep", param="a.zip")


@pytest.mark.parametrize("bad", ["../" + CFG, "a/../../" + CFG, "/etc/" + CFG, "C:/x/" + CFG, "..\\" + CFG])
def test_zip_traversal(tmp_path, payload, bad):
    data = zip_bytes({bad: payload[CFG], MODEL: payload[MODEL]})
    err = refused([("evil.zip", data)], tmp_path / "s", "evil.zip", param="evil.zip")
    assert "absolute" in err.message or "'..'" in err.message
    assert not (tmp_path / CFG).exists() and not (tmp_path.parent / CFG).exists()


def test_tar_traversal(tmp_path, payload):
    data = tar_bytes({"../../" + CFG: payload[CFG], MODEL: payload[MODEL]})
    refused([("evil.tar.gz", data)], tmp_path / "s", "escapes", param="evil.tar.gz")


def test_zip_symlink(tmp_path, payload):
    data = zip_bytes({MODEL: payload[MODEL]}, symlinks={CFG: "/etc/passwd"})
    refused([("evil.zip", data)], tmp_path / "s", "symbolic link", param="evil.zip")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_tar_links_and_devices(tmp_path, payload, kind):
    info = tarfile.TarInfo(CFG)
    info.type = kind
    info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    data = tar_bytes({MODEL: payload[MODEL]}, special=[info])
    err = refused([("evil.tar.gz", data)], tmp_path / "s", "evil.tar.gz", param="evil.tar.gz")
    assert "link" in err.message or "not a regular file" in err.message


def test_zip_bomb(tmp_path, payload):
    data = zip_bytes({CFG: payload[CFG], MODEL: payload[MODEL], "README.md": bytes(8 * MB)})
    assert len(data) < MB // 8  # zeros compress ~1000x
    err = refused([("bomb.zip", data)], tmp_path / "s", "4194304-byte limit", param="bomb.zip", max_bytes=4 * MB,
                  error=AdapterTooLargeError)
    assert err.status_code == 413


def test_tar_bomb(tmp_path, payload):
    data = tar_bytes({CFG: payload[CFG], "junk.bin.txt": bytes(8 * MB), MODEL: payload[MODEL]})
    refused([("bomb.tgz", data)], tmp_path / "s", "limit", param="bomb.tgz", max_bytes=4 * MB, error=AdapterTooLargeError)


def test_oversize_plain_stream_is_counted(tmp_path, payload):
    # no declared size: the bytes are counted while writing
    files = [(CFG, payload[CFG]), (MODEL, io.BytesIO(bytes(2 * MB)))]
    refused(files, tmp_path / "s", "limit", param=MODEL, max_bytes=MB, error=AdapterTooLargeError)


def test_oversize_counts_both_files(tmp_path, payload):
    limit = len(payload[MODEL]) + len(payload[CFG]) - 1
    files = [(CFG, payload[CFG]), (MODEL, payload[MODEL])]
    refused(files, tmp_path / "s", "limit", max_bytes=limit, error=AdapterTooLargeError)
    assert_staged(stage_upload(files, tmp_path / "ok", max_bytes=limit + 1), payload)


@pytest.mark.parametrize("name", ["a.zip", "a.tar.gz"])
def test_not_an_archive(tmp_path, name):
    refused([(name, b"this is not an archive at all" * 10)], tmp_path / "s", "not a valid", param=name)


def test_truncated_tar_gz(tmp_path, payload):
    data = tar_bytes({CFG: payload[CFG], MODEL: payload[MODEL]})
    refused([("a.tar.gz", data[: len(data) // 2])], tmp_path / "s", "not a valid tar", param="a.tar.gz")


def test_archive_mixed_with_files(tmp_path, payload):
    data = zip_bytes({CFG: payload[CFG], MODEL: payload[MODEL]})
    refused([("a.zip", data), (CFG, payload[CFG])], tmp_path / "s", "exactly one archive", param="a.zip")


def test_dest_must_be_empty(tmp_path, payload):
    dest = tmp_path / "s"
    dest.mkdir()
    (dest / "other").write_text("x")
    with pytest.raises(ValueError):
        stage_upload([(CFG, payload[CFG]), (MODEL, payload[MODEL])], dest, max_bytes=64 * MB)
    assert (dest / "other").read_text() == "x"
