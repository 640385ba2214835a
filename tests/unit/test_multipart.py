"""The streamed multipart body: what a server parses out of it, its length, its md5s, flat memory."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import io
import tracemalloc
from pathlib import Path

import pytest

from airflow_provider_hpc.transport.base import UploadFile
from airflow_provider_hpc.transport.multipart import MultipartBody

MIB = 1024 * 1024


def upload(path: Path, field: str = "file") -> UploadFile:
    return UploadFile(field, path.name, lambda: path.open("rb"), path.stat().st_size)


def read_all(body: MultipartBody, size: int = 65536) -> bytes:
    return b"".join(iter(lambda: body.read(size), b""))


def test_a_server_parses_the_fields_and_files_back(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"4 66\n")
    (tmp_path / 'we"ird\nname.bin').write_bytes(bytes(range(256)) * 10)
    body = MultipartBody({"jwt": "TOKEN", "cmd": "python /add.py"}, [upload(tmp_path / "a.txt"), upload(tmp_path / 'we"ird\nname.bin')])

    raw = read_all(body, 7)  # odd reads cross every part boundary
    assert len(raw) == len(body)
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {body.content_type}\r\n\r\n".encode() + raw
    )
    parts = list(message.iter_parts())
    assert [p.get_param("name", header="content-disposition") for p in parts] == ["jwt", "cmd", "file", "file"]
    assert parts[0].get_payload(decode=True) == b"TOKEN"
    assert parts[2].get_filename() == "a.txt" and parts[2].get_payload(decode=True) == b"4 66\n"
    # A name cannot break out of its header.
    assert "\n" not in parts[3].get_filename() and parts[3].get_payload(decode=True) == bytes(range(256)) * 10
    assert body.md5(0) == hashlib.md5(b"4 66\n").hexdigest() and body.sent == [5, 2560]


def test_a_file_that_changes_while_sent_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "input.dat"
    path.write_bytes(b"x" * 100)
    stale = UploadFile("file", "input.dat", lambda: io.BytesIO(b"x" * 50), 100)
    with pytest.raises(OSError, match="changed size"):
        read_all(MultipartBody({}, [stale]))
    grown = UploadFile("file", "input.dat", lambda: io.BytesIO(b"x" * 150), 100)
    with pytest.raises(OSError, match="grew"):
        read_all(MultipartBody({}, [grown]))


def test_memory_stays_flat_whatever_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "big.dat"
    with path.open("wb") as out:
        for _ in range(64):
            out.write(bytes(MIB))
    body = MultipartBody({"name": "big"}, [upload(path)])
    tracemalloc.start()
    try:
        total = sum(len(chunk) for chunk in iter(lambda: body.read(MIB), b""))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == len(body) and body.sent == [64 * MIB]
    assert peak < 8 * MIB
