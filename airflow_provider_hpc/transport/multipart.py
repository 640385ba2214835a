"""
A multipart/form-data body streamed from its files, so memory stays flat whatever their size.

``requests`` builds a ``files=`` body whole in memory before sending it; a simulation input of
several GiB would be held entirely. :class:`MultipartBody` is a file-like object of known length
that ``requests`` streams with a ``Content-Length`` (no chunked encoding, which some services
refuse), reading each file in chunks only as the socket takes them, and hashing each part on the
way so the caller can check what the server says it received.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from typing import IO, Any

from airflow_provider_hpc.transport.base import UploadFile


def _quoted(value: str) -> str:
    """Quote a form field or file name for a Content-Disposition header (no header injection)."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartBody:
    """
    The body of one multipart request: form fields first, then the files, each read as it is sent.

    Built afresh for every attempt (the files are opened again), so a retry sends every byte again.

    :param fields: plain form fields (``jwt``, ``cmd``...).
    :param files: the file parts, each with its known ``size``.
    """

    def __init__(self, fields: Mapping[str, Any], files: Sequence[UploadFile]) -> None:
        self.boundary = uuid.uuid4().hex
        self.files = list(files)
        self.digests = [hashlib.md5(usedforsecurity=False) for _ in self.files]
        self.sent = [0] * len(self.files)
        head = b"".join(self._field(name, value) for name, value in fields.items() if value is not None)
        self._parts: list[bytes | int] = [head]
        for index, file in enumerate(self.files):
            self._parts += [self._file_head(file), index, b"\r\n"]
        self._parts.append(f"--{self.boundary}--\r\n".encode())
        self._length = sum(len(p) if isinstance(p, bytes) else self.files[p].size for p in self._parts)
        self._current: IO[bytes] | None = None
        self._position = 0  # index into _parts
        self._pending = b""

    @property
    def content_type(self) -> str:
        """The request's ``Content-Type`` header, with the boundary."""
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def _field(self, name: str, value: Any) -> bytes:
        return (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n{value}\r\n'
        ).encode()

    def _file_head(self, file: UploadFile) -> bytes:
        return (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quoted(file.field)}"; '
            f'filename="{_quoted(file.filename)}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()

    def read(self, size: int = -1) -> bytes:
        """Return the next bytes of the body (at most about ``size``; ``b""`` at its end)."""
        size = 1024 * 1024 if size is None or size < 0 else size
        while not self._pending and self._position < len(self._parts):
            part = self._parts[self._position]
            if isinstance(part, bytes):
                self._pending = part
                self._position += 1
                continue
            self._pending = self._read_file(part, size)
        chunk, self._pending = self._pending[:size], self._pending[size:]
        return chunk

    def _read_file(self, index: int, size: int) -> bytes:
        file = self.files[index]
        if self._current is None:
            self._current = file.opener()
        chunk = self._current.read(size)
        if chunk:
            self.sent[index] += len(chunk)
            if self.sent[index] > file.size:
                raise OSError(f"{file.filename} grew while it was being sent")
            self.digests[index].update(chunk)
            return chunk
        self._current.close()
        self._current = None
        if self.sent[index] != file.size:
            raise OSError(f"{file.filename} changed size while it was being sent")
        self._position += 1
        return b""

    def close(self) -> None:
        """Close the file being read, if any (after an error half-way)."""
        if self._current is not None:
            self._current.close()
            self._current = None

    def md5(self, index: int = 0) -> str:
        """Return the hex md5 of the bytes sent of file part ``index``."""
        return self.digests[index].hexdigest()
