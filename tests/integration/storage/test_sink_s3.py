"""
``write_atomically`` on a real S3 server: an object appears under its final key complete and
checked, or not at all; no temporary key, no multipart upload left behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Callable, Iterator

import pytest
from airflow.sdk import ObjectStoragePath

from airflow_provider_hpc.exceptions import HpcApiError, TransferIntegrityError
from airflow_provider_hpc.storage import extract_zip, file_md5, read_zip_text, same_file_exists, write_atomically
from airflow_provider_hpc.storage_sink import PART_BYTES

from tests.integration.storage.s3_support import S3Bucket

MIB = 1024 * 1024
SMALL = os.urandom(300 * 1024)  # one PUT when complete
LARGE = os.urandom(PART_BYTES * 2 + 3 * MIB)  # three parts of a multipart upload


def chunks(data: bytes, size: int = MIB) -> Iterator[bytes]:
    """Yield ``data`` in pieces, as a streaming response does."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_why_a_plain_open_is_not_enough(s3: S3Bucket) -> None:
    """
    s3fs completes its upload when the file is closed, also when a ``with`` block ends in an error:
    the half-written bytes become an object under the final key. The provider never writes so.
    """
    path = s3.path("plain/run.zip")
    with pytest.raises(ConnectionResetError), path.open("wb") as handle:
        for piece in chunks(LARGE[: PART_BYTES + MIB]):
            handle.write(piece)
        raise ConnectionResetError("the download broke half-way")
    assert s3.keys("plain/") == ["plain/run.zip"]
    assert len(s3.read("plain/run.zip")) == PART_BYTES + MIB  # a partial object anyone can read


@pytest.mark.parametrize("data", [b"", SMALL, LARGE], ids=["empty", "one-put", "multipart"])
def test_a_checked_file_lands_under_its_key_and_nothing_else(s3: S3Bucket, data: bytes) -> None:
    """The object is there with the announced size and md5, and no temporary key or open upload remains."""
    dest = s3.path("case/0/U")
    md5 = hashlib.md5(data).hexdigest()

    stored = write_atomically(chunks(data), dest, expected_size=len(data), expected_md5=md5.upper())

    assert (stored.path, stored.size, stored.md5) == (s3.url("case/0/U"), len(data), md5)
    assert s3.keys() == ["case/0/U"]
    assert s3.read("case/0/U") == data
    assert s3.uploads() == []
    assert file_md5(dest) == md5 and same_file_exists(dest, len(data), md5)


def test_nothing_is_visible_under_the_key_until_the_check_passed(s3: S3Bucket) -> None:
    """While a large file streams, readers find no object at all: only an upload in progress."""
    seen: list[tuple[list[str], list[str]]] = []

    def watched() -> Iterator[bytes]:
        for piece in chunks(LARGE):
            seen.append((s3.keys(), s3.uploads()))
            yield piece

    write_atomically(watched(), s3.path("run.zip"), expected_size=len(LARGE))

    assert all(keys == [] for keys, _ in seen)
    assert any(uploads == ["run.zip"] for _, uploads in seen), "the parts went up while the bytes arrived"
    assert s3.keys() == ["run.zip"] and s3.uploads() == []


def broken(data: bytes, error: BaseException) -> Iterator[bytes]:
    """Yield most of ``data``, then fail as a dropped connection (or Ctrl-C) does."""
    yield from chunks(data[: len(data) * 3 // 4])
    raise error


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["one-put", "multipart"])
@pytest.mark.parametrize(
    ("make_chunks", "kwargs", "error"),
    [
        (lambda d: chunks(d), {"expected_md5": "0" * 32}, TransferIntegrityError),
        (lambda d: chunks(d), {"expected_size_delta": 1}, TransferIntegrityError),
        (lambda d: chunks(d), {"expected_size_delta": -1}, TransferIntegrityError),
        (lambda d: chunks(d), {"max_bytes_fraction": 0.5}, HpcApiError),
        (lambda d: broken(d, ConnectionResetError("Connection reset by peer")), {}, ConnectionResetError),
        (lambda d: broken(d, KeyboardInterrupt()), {}, KeyboardInterrupt),
    ],
    ids=["wrong-md5", "short", "long", "over-limit", "dropped", "ctrl-c"],
)
def test_a_failed_transfer_keeps_the_old_object_and_leaves_nothing(
    s3: S3Bucket, data: bytes, make_chunks: Callable[[bytes], Iterator[bytes]], kwargs: dict, error: type
) -> None:
    """Any failure aborts the upload: the previous object is untouched, no other key, no open upload."""
    s3.put("out/U", b"previous good copy")
    options: dict = {}
    if "expected_md5" in kwargs:
        options["expected_md5"] = kwargs["expected_md5"]
    if "expected_size_delta" in kwargs:
        options["expected_size"] = len(data) + kwargs["expected_size_delta"]
    if "max_bytes_fraction" in kwargs:
        options["max_bytes"] = int(len(data) * kwargs["max_bytes_fraction"])

    with pytest.raises(error):
        write_atomically(make_chunks(data), s3.path("out/U"), **options)

    assert s3.keys() == ["out/U"]
    assert s3.read("out/U") == b"previous good copy"
    assert s3.uploads() == []


def test_a_store_error_is_the_providers_and_creates_no_bucket(s3: S3Bucket) -> None:
    """A bucket that does not exist gives an error naming the path; the writer never creates buckets."""
    missing = s3.url().replace(s3.name, s3.name + "-missing") + "x/run.zip"

    with pytest.raises(HpcApiError, match="-missing/x/run.zip"):
        write_atomically(chunks(SMALL), ObjectStoragePath(missing))
    assert s3.name + "-missing" not in [b["Name"] for b in s3.client.list_buckets()["Buckets"]]


def test_a_zip_on_s3_is_extracted_to_s3(s3: S3Bucket) -> None:
    """``run.zip`` read from S3 (range requests) and its members written to S3, each one atomically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("__WS__stdout.txt", "9.0\n")
        archive.writestr("__WS__stderr.txt", "warning\n" * 1000)
        archive.writestr("out/field.bin", LARGE[: 3 * MIB])
    s3.put("task/run.zip", buffer.getvalue())

    written = extract_zip(s3.path("task/run.zip"), s3.path("task/run"))

    assert sorted(f.path for f in written) == [
        s3.url("task/run/__WS__stderr.txt"), s3.url("task/run/__WS__stdout.txt"), s3.url("task/run/out/field.bin")
    ]
    assert s3.read("task/run/out/field.bin") == LARGE[: 3 * MIB]
    assert read_zip_text(s3.url("task/run.zip"), "__WS__stderr.txt", tail_bytes=8) == "warning\n"
    assert s3.keys() == ["task/run.zip", "task/run/__WS__stderr.txt", "task/run/__WS__stdout.txt", "task/run/out/field.bin"]
