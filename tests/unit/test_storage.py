"""
Writing to object storage (``storage.py``, ``storage_sink.py``): atomic, verified against size and
md5, confined to the destination, with flat memory whatever the file size; on a local ``file://``
folder and on fsspec's in-memory backend (an object store without a real rename). S3 itself is
tested against a real server in ``tests/integration/storage/``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import threading
import tracemalloc
import uuid
import zipfile
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import fsspec
import pytest
import requests_mock as rm
from airflow.sdk import ObjectStoragePath
from airflow.sdk.io import attach

import airflow_provider_hpc.storage_sink as storage_sink
from airflow_provider_hpc.exceptions import HpcApiError, TransferIntegrityError, UnsafePathError
from airflow_provider_hpc.hooks.rescale import OutputFile, RescaleHook
from airflow_provider_hpc.storage import (
    TEMP_PREFIX,
    as_storage_path,
    extract_zip,
    file_md5,
    safe_join,
    same_file_exists,
    write_atomically,
)

MIB = 1024 * 1024
DATA = b"internalField   uniform (25.75 3.62 0);\n" * 5000


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """Yield ``data`` in pieces, as a streaming response does."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture(params=["file", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[ObjectStoragePath]:
    """A destination folder on the local disk, then on an in-memory object store."""
    if request.param == "file":
        yield ObjectStoragePath(f"file://{tmp_path}")
        return
    attach("memory", fs=fsspec.filesystem("memory"))
    bucket = f"hpc-tests-{uuid.uuid4().hex}"
    yield ObjectStoragePath(f"memory://{bucket}/out")
    fsspec.filesystem("memory").rm(f"/{bucket}", recursive=True)


def names(root: ObjectStoragePath) -> list[str]:
    """Every file under ``root``, temporary ones included, relative to it."""
    base = str(root).rstrip("/")
    return sorted(str(p)[len(base) + 1 :] for p in root.rglob("*") if p.is_file())


# ----- write_atomically ------------------------------------------------------------------------------


def test_write_keeps_the_file_with_its_size_and_md5(root: ObjectStoragePath) -> None:
    """A complete, matching transfer lands under the final name, and only there."""
    dest = root / "airFoil2D" / "0" / "U"
    stored = write_atomically(chunks(DATA), dest, expected_size=len(DATA), expected_md5=hashlib.md5(DATA).hexdigest().upper())
    assert (stored.size, stored.md5, stored.path) == (len(DATA), hashlib.md5(DATA).hexdigest(), str(dest))
    assert dest.read_bytes() == DATA
    assert names(root) == ["airFoil2D/0/U"]
    assert stored.to_dict() == {"path": str(dest), "size": len(DATA), "md5": stored.md5}


def test_nothing_is_visible_under_the_final_name_while_writing(root: ObjectStoragePath) -> None:
    """The bytes go to a temporary name beside the destination; the final name appears only at the end."""
    dest = root / "run.zip"
    seen: list[tuple[bool, list[str]]] = []

    def watched() -> Iterator[bytes]:
        for piece in chunks(DATA):
            seen.append((dest.exists(), names(root)))
            yield piece

    write_atomically(watched(), dest)
    assert seen and not any(exists for exists, _ in seen)
    assert all(len(files) <= 1 and all(f.startswith(TEMP_PREFIX) for f in files) for _, files in seen[1:])
    assert names(root) == ["run.zip"]


@pytest.mark.parametrize("reused_buffer", [False, True], ids=["bytes", "reused-buffer"])
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"expected_md5": "0" * 32}, TransferIntegrityError),
        ({"expected_size": len(DATA) + 1}, TransferIntegrityError),
        ({"expected_size": len(DATA) - 1}, TransferIntegrityError),
        ({"max_bytes": len(DATA) // 2}, HpcApiError),
    ],
    ids=["wrong-md5", "short", "long", "over-limit"],
)
def test_a_failed_check_keeps_nothing_and_leaves_the_old_file(
    root: ObjectStoragePath, kwargs: dict, error: type, reused_buffer: bool
) -> None:
    """A mismatch or an oversized body raises; the previous file under the final name is untouched."""
    dest = root / "U"
    dest.write_bytes(b"previous good copy")
    body = reused_buffer_chunks(DATA, 16 * 1024) if reused_buffer else chunks(DATA, 16 * 1024)
    with pytest.raises(error):
        write_atomically(body, dest, **kwargs)
    assert dest.read_bytes() == b"previous good copy"
    assert names(root) == ["U"]


def test_a_broken_stream_keeps_nothing(root: ObjectStoragePath) -> None:
    """A transfer that breaks half-way (or is cancelled) removes its temporary file."""

    def broken() -> Iterator[bytes]:
        yield DATA[:1000]
        raise ConnectionResetError("Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        write_atomically(broken(), root / "nut")
    assert names(root) == []


def test_an_endless_body_stops_at_the_announced_size(root: ObjectStoragePath) -> None:
    """A body longer than announced is refused as soon as it passes the size, not read to its end."""
    endless = itertools.repeat(b"x" * 1024)
    with pytest.raises(TransferIntegrityError, match="more than the 4096 bytes"):
        write_atomically(endless, root / "big", expected_size=4096)
    assert names(root) == []


def test_memory_stays_flat_whatever_the_size(tmp_path: Any) -> None:
    """64 MiB streamed in 1 MiB pieces never hold more than a few pieces in memory."""
    piece = bytes(MIB)
    tracemalloc.start()
    try:
        stored = write_atomically((piece for _ in range(64)), ObjectStoragePath(f"file://{tmp_path}/big.bin"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored.size == 64 * MIB
    assert peak < 8 * MIB


def test_s3_parts_grow_only_for_files_beyond_ten_thousand_parts() -> None:
    """8 MiB parts up to 78 GiB; a larger announced size (or limit) gets whole-MiB parts, never over 10,000."""
    part = storage_sink.PART_BYTES
    assert storage_sink.part_bytes_for(None) == storage_sink.part_bytes_for(MIB) == part == 8 * MIB
    assert storage_sink.part_bytes_for(part * storage_sink.MAX_PARTS) == part
    for size in (part * storage_sink.MAX_PARTS + 1, 200 * 1024**3, 5 * 1024**4):
        grown = storage_sink.part_bytes_for(size)
        assert grown > part and grown % MIB == 0 and -(-size // grown) <= storage_sink.MAX_PARTS


def test_a_store_error_is_the_providers_and_keeps_nothing(root: ObjectStoragePath, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write the store refuses (disk full, access denied) is an ``HpcApiError`` naming the file; nothing stays."""

    def refuse(self: Any, data: Any) -> int:
        raise OSError(28, "No space left on device")

    if root.protocol == "file":
        monkeypatch.setattr(storage_sink._LocalFile, "write", refuse)
    else:
        monkeypatch.setattr(storage_sink._TemporaryObject, "write", refuse)
    with pytest.raises(HpcApiError, match=r"Could not write .*/U: OSError: .*No space left"):
        write_atomically(chunks(DATA), root / "U")
    assert names(root) == []


def test_hook_lineage_names_the_final_file_once(root: ObjectStoragePath, monkeypatch: pytest.MonkeyPatch) -> None:
    """Airflow's hook lineage hears of the file under its final name, never of the temporary one."""
    seen: list[str] = []
    collector = SimpleNamespace(add_output_asset=lambda context, uri: seen.append(uri))
    monkeypatch.setattr("airflow.sdk.lineage.get_hook_lineage_collector", lambda: collector)
    write_atomically(chunks(DATA), root / "run.zip")
    assert seen == [str(root / "run.zip")]


# ----- the md5 of a stream, hashed inline on the chunks as they come ------------------------------


def reused_buffer_chunks(data: bytes, size: int) -> Iterator[memoryview]:
    """Yield ``data`` through one buffer refilled for every chunk, as the transport reads a plain body."""
    buffer = memoryview(bytearray(size))
    for start in range(0, len(data), size):
        piece = data[start : start + size]
        buffer[: len(piece)] = piece
        yield buffer[: len(piece)]


def test_a_large_body_has_the_right_md5(tmp_path: Any) -> None:
    """Chunks of every kind (bytes, bytearray, memoryview, one reused buffer) are hashed and written in order."""
    data = bytes(range(256)) * (48 * 1024) + b"tail"  # 12 MiB and 4 bytes
    pieces: list[Any] = list(chunks(data, MIB))
    pieces[5], pieces[6], pieces[7] = bytearray(pieces[5]), memoryview(pieces[6]), pieces[7][:1]
    pieces.insert(8, data[7 * MIB + 1 : 8 * MIB])
    dest = ObjectStoragePath(f"file://{tmp_path}/run.zip")
    stored = write_atomically(iter(pieces), dest, expected_size=len(data), expected_md5=hashlib.md5(data).hexdigest())
    assert (stored.size, stored.md5) == (len(data), hashlib.md5(data).hexdigest())
    assert dest.read_bytes() == data
    again = write_atomically(reused_buffer_chunks(data, MIB), dest, expected_md5=hashlib.md5(data).hexdigest())
    assert again.md5 == stored.md5 and dest.read_bytes() == data


def test_a_reused_buffer_lands_whole_on_every_store(root: ObjectStoragePath) -> None:
    """A producer refilling one buffer loses nothing on a local disk or an object store (which buffers the bytes)."""
    stored = write_atomically(reused_buffer_chunks(DATA, 16 * 1024), root / "U", expected_md5=hashlib.md5(DATA).hexdigest())
    assert stored.size == len(DATA)
    assert (root / "U").read_bytes() == DATA


def test_hashing_starts_no_thread(root: ObjectStoragePath) -> None:
    """The md5 is computed in the caller's thread: a download adds no thread, whatever its size."""
    seen: list[int] = []
    before = threading.active_count()

    def watched() -> Iterator[bytes]:
        for piece in chunks(DATA, 16 * 1024):
            seen.append(threading.active_count() - before)
            yield piece

    assert write_atomically(watched(), root / "U").md5 == hashlib.md5(DATA).hexdigest()
    assert seen and not any(seen)


@pytest.mark.parametrize("failure", [ConnectionResetError("Connection reset by peer"), KeyboardInterrupt()])
def test_a_stream_broken_midway_keeps_nothing(root: ObjectStoragePath, failure: BaseException) -> None:
    """An error (or Ctrl-C) from the stream after some chunks were hashed and written: no temporary file."""

    def broken() -> Iterator[bytes]:
        yield from chunks(DATA, 16 * 1024)
        raise failure

    with pytest.raises(type(failure)):
        write_atomically(broken(), root / "nut")
    assert names(root) == []


class FailingMd5:
    """An md5 whose ``update`` fails after a few chunks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.digest = hashlib.md5()
        self.calls = 0

    def update(self, data: bytes) -> None:
        self.calls += 1
        if self.calls > 3:
            raise MemoryError("no memory left for the hash")
        self.digest.update(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def test_a_failure_of_the_hash_surfaces_and_keeps_nothing(root: ObjectStoragePath, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash's own error is raised to the caller; nothing is kept."""
    monkeypatch.setattr(storage_sink, "hashlib", SimpleNamespace(md5=FailingMd5))
    piece = bytes(16 * 1024)
    with pytest.raises(MemoryError, match="no memory left"):
        write_atomically((piece for _ in range(40)), root / "big")
    assert names(root) == []


class Zeros(io.RawIOBase):
    """A response body of ``size`` zero bytes, produced as it is read (never held whole)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = min(len(buffer), self.left)
        buffer[:size] = bytes(size)
        self.left -= size
        return size


def test_hook_download_memory_stays_flat(
    rescale_hook: RescaleHook, requests_mock: rm.Mocker, dest_dir: ObjectStoragePath
) -> None:
    """From the HTTP response to the file, a 64 MiB output file is streamed: memory stays a few MiB."""
    size = 64 * MIB
    digest = hashlib.md5()
    for _ in range(64):
        digest.update(bytes(MIB))
    requests_mock.get("https://platform.rescale.com/api/files/wMyXse/contents/", body=Zeros(size))
    file = OutputFile(id="wMyXse", name="phi", relative_path="phi", decrypted_size=size, md5=digest.hexdigest())
    tracemalloc.start()
    try:
        stored = rescale_hook.download_file(file, dest_dir / "phi")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored.size == size and stored.md5 == file.md5
    assert peak < 12 * MIB


# ----- safe_join, extract_zip --------------------------------------------------------------------


@pytest.mark.parametrize(
    "relative",
    ["../../x", "../x", "a/../../x", "a/..", "/etc/passwd", "..", ".", "./a", "a/./b", "a//b", "a/", "",
     "a\\..\\..\\x", "C:/Windows/x", "c:x", "x\x00y"],
)
def test_safe_join_refuses_paths_leaving_the_destination(tmp_path: Any, relative: str) -> None:
    """A ``relativePath`` (or zip member) like ``../../x`` can never write outside the destination."""
    with pytest.raises(UnsafePathError):
        safe_join(ObjectStoragePath(f"file://{tmp_path}/out"), relative)


def test_safe_join_keeps_sound_paths_below_the_destination(tmp_path: Any) -> None:
    """Ordinary relative paths (the sample's ``airFoil2D/100/uniform/time``) land below the destination."""
    root = ObjectStoragePath(f"file://{tmp_path}/out")
    joined = safe_join(root, "airFoil2D/100/uniform/time")
    assert str(joined) == f"{root}/airFoil2D/100/uniform/time"
    assert str(safe_join(root, "..hidden/file..txt")).endswith("/..hidden/file..txt")


def make_zip(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    """Return a zip holding ``members`` (and a symbolic link named ``symlink``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_extract_zip_writes_members_below_the_destination(tmp_path: Any) -> None:
    """A run.zip with ``__WS__stdout.txt`` and a sub-folder is extracted with sizes and md5s."""
    root = ObjectStoragePath(f"file://{tmp_path}")
    (root / "run.zip").write_bytes(make_zip({"__WS__stdout.txt": b"9.0\n", "out/result.csv": b"a,b\n1,2\n"}))
    stored = extract_zip(root / "run.zip", root / "run")
    assert sorted(s.path for s in stored) == [f"{root}/run/__WS__stdout.txt", f"{root}/run/out/result.csv"]
    assert (root / "run" / "__WS__stdout.txt").read_text() == "9.0\n"


@pytest.mark.parametrize(
    ("archive", "kwargs"),
    [
        (make_zip({"ok.txt": b"1", "../../evil.txt": b"2"}), {}),
        (make_zip({"ok.txt": b"1"}, symlink="link"), {}),
        (make_zip({"a.bin": bytes(4096), "b.bin": bytes(4096)}), {"max_total_bytes": 6000}),
        (make_zip({f"f{i}": b"x" for i in range(5)}), {"max_members": 4}),
    ],
    ids=["zip-slip", "symlink", "too-large", "too-many"],
)
def test_extract_zip_refuses_unsafe_archives_and_writes_nothing(tmp_path: Any, archive: bytes, kwargs: dict) -> None:
    """Zip-slip, links and zip bombs are refused before any member is written."""
    root = ObjectStoragePath(f"file://{tmp_path}")
    (root / "run.zip").write_bytes(archive)
    with pytest.raises(UnsafePathError):
        extract_zip(root / "run.zip", root / "run", **kwargs)
    assert names(root) == ["run.zip"]
    assert not (tmp_path.parent / "evil.txt").exists()


# ----- helpers -------------------------------------------------------------------------------------


def test_same_file_exists_and_md5(tmp_path: Any) -> None:
    """A re-run skips a file already holding exactly the announced bytes, and only then."""
    path = ObjectStoragePath(f"file://{tmp_path}/U")
    path.write_bytes(DATA)
    md5 = hashlib.md5(DATA).hexdigest()
    assert file_md5(path) == md5
    assert same_file_exists(path, len(DATA), md5.upper())
    assert not same_file_exists(path, len(DATA) + 1, md5)
    assert not same_file_exists(path, len(DATA), "0" * 32)
    assert not same_file_exists(path, len(DATA), None)
    assert not same_file_exists(ObjectStoragePath(f"file://{tmp_path}/missing"), 1, md5)


def test_as_storage_path(tmp_path: Any) -> None:
    """A bare local path becomes an absolute ``file://`` path; an ``ObjectStoragePath`` is kept as is."""
    assert str(as_storage_path(str(tmp_path / "x"))) == f"file://{tmp_path}/x"
    path = ObjectStoragePath("memory://bucket/x")
    assert as_storage_path(path) is path


def test_the_helpers_other_modules_import_keep_their_names() -> None:
    """Operators and results import these names from ``storage`` (the sink's among them, re-exported)."""
    import airflow_provider_hpc.storage as storage

    for name in ("StoredFile", "as_storage_path", "safe_join", "same_file_exists", "write_atomically", "extract_zip",
                 "file_sink", "open_for_reading"):
        assert callable(getattr(storage, name))


def test_a_long_file_name_still_gets_a_temporary_name(tmp_path: Any) -> None:
    """A final name near the 255-byte limit still leaves room for the temporary prefix."""
    dest = ObjectStoragePath(f"file://{tmp_path}") / ("n" * 250)
    assert write_atomically(chunks(DATA), dest).size == len(DATA)
    assert dest.read_bytes() == DATA
