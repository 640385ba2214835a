"""
Input-file uploads of the Rescale emulator: ``POST files/contents/``, a multipart body with one ``file`` part.

The body is parsed as it arrives and the file part written straight to disk, hashed on the way,
so memory stays bounded whatever the size; past ``rescale_max_upload_bytes`` the upload is
refused with 413 and what was written is removed. Only the first ``file`` part is kept; other
parts are read and dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from hpc_emulator.rescale_files import CHUNK
from hpc_emulator.rescale_models import EngineError, InputFile, new_file_fields
from hpc_emulator.rescale_spec import FieldError

FIELD = "file"
# What a multipart body may hold beyond the file's own bytes (boundaries, headers, small fields).
MULTIPART_OVERHEAD = 1024 * 1024
# The longest file name most file systems take, in bytes.
MAX_NAME_BYTES = 255
NO_FILE = "No file was submitted."
NOT_A_FILE = "The submitted data was not a file. Check the encoding type on the form."
# The parser's events that the receiver handles, each by its method ``_<event>``.
PARSER_EVENTS = (
    "part_begin", "part_data", "part_end", "header_field", "header_value", "header_end", "headers_finished",
)


class UploadTooLargeError(EngineError):
    """The file, or the whole body, is larger than the server takes."""

    status_code = 413


class UnsupportedMediaTypeError(EngineError):
    """The body is not multipart."""

    status_code = 415


def safe_name(raw: bytes) -> str:
    """Return an uploaded file's name without its folders (``/`` and ``\\`` alike), or refuse it."""
    name = PurePosixPath(raw.decode("utf-8", "replace").replace("\\", "/")).name
    if not name or name in (".", "..") or "\x00" in name:
        raise FieldError((FIELD,), NOT_A_FILE)
    if len(name.encode()) > MAX_NAME_BYTES:
        message = f"Ensure this filename has at most {MAX_NAME_BYTES} characters (it has {len(name)})."
        raise FieldError((FIELD,), message)
    return name


@dataclass
class _Receiver:
    """The parser's callbacks: they keep the first ``file`` part, buffered up to ``CHUNK`` bytes."""

    folder: Path
    limit: int
    name: str | None = None
    size: int = 0
    digest: Any = field(default_factory=lambda: hashlib.md5(usedforsecurity=False))
    path: Path | None = None
    handle: IO[bytes] | None = None
    buffer: bytearray = field(default_factory=bytearray)
    _field_bytes: bytes = b""
    _value_bytes: bytes = b""
    _disposition: bytes = b""
    _keeping: bool = False
    plain_field: bool = False

    def callbacks(self) -> dict[str, Any]:
        """Return the callbacks of python-multipart's parser."""
        return {f"on_{event}": getattr(self, f"_{event}") for event in PARSER_EVENTS}

    def _part_begin(self) -> None:
        self._disposition = b""
        self._keeping = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field_bytes += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value_bytes += data[start:end]

    def _header_end(self) -> None:
        if self._field_bytes.strip().lower() == b"content-disposition":
            self._disposition = self._value_bytes
        self._field_bytes = self._value_bytes = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") != FIELD.encode() or self.name is not None:
            return
        if b"filename" not in options:
            # A plain form field named "file": DRF's FileField refuses it (unless a file comes later).
            self.plain_field = True
            return
        self.name = safe_name(options[b"filename"])
        self._keeping = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._keeping:
            return
        self.size += end - start
        if self.size > self.limit:
            raise UploadTooLargeError(f"File too large: at most {self.limit} bytes may be uploaded.")
        self.buffer += data[start:end]

    def _part_end(self) -> None:
        self._keeping = False

    def flush(self) -> None:
        """Write and hash the buffered bytes (in the thread pool: it touches the disk)."""
        if self.handle is None:
            descriptor, name = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=self.folder)
            self.path, self.handle = Path(name), os.fdopen(descriptor, "wb")
        self.handle.write(self.buffer)
        self.digest.update(self.buffer)
        self.buffer.clear()

    def discard(self) -> None:
        """Close and remove what was written."""
        if self.handle is not None:
            self.handle.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


async def receive_upload(request: Request, folder: Path, limit: int) -> tuple[str, Path, int, str]:
    """
    Read the multipart body of an upload into a new file of ``folder``.

    Returns the file's safe name, where it was written, its size and its md5. Raises
    :class:`FieldError` (400, the field's error) without a ``file`` part,
    :class:`UploadTooLargeError` (413) past ``limit`` bytes, :class:`EngineError` (400) for a
    broken body, :class:`UnsupportedMediaTypeError` (415) for a body that is not multipart.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        shown = request.headers.get("content-type", "").split(";")[0].strip()
        raise UnsupportedMediaTypeError(f'Unsupported media type "{shown}" in request.')
    boundary = params.get(b"boundary")
    if not boundary:
        raise EngineError("Multipart form parse error - Invalid boundary in multipart: None")
    declared = request.headers.get("content-length", "")
    body_limit = limit + MULTIPART_OVERHEAD
    if declared.isdigit() and int(declared) > body_limit:
        raise UploadTooLargeError(f"File too large: at most {limit} bytes may be uploaded.")
    await run_in_threadpool(folder.mkdir, parents=True, exist_ok=True)
    receiver = _Receiver(folder, limit)
    parser = MultipartParser(boundary, receiver.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise UploadTooLargeError(f"File too large: at most {limit} bytes may be uploaded.")
            parser.write(chunk)
            if len(receiver.buffer) >= CHUNK:
                await run_in_threadpool(receiver.flush)
        parser.finalize()
        if receiver.name is None:
            raise FieldError((FIELD,), NOT_A_FILE if receiver.plain_field else NO_FILE)
        await run_in_threadpool(receiver.flush)
        assert receiver.handle is not None and receiver.path is not None
        receiver.handle.close()
    except FormParserError as exc:
        receiver.discard()
        raise EngineError(f"Multipart form parse error - {exc}") from exc
    except BaseException:
        # Refused, broken off by the client, or cancelled: nothing half-written stays behind.
        receiver.discard()
        raise
    return receiver.name, receiver.path, receiver.size, receiver.digest.hexdigest()


def store_upload(folder: Path, file_id: str, name: str, received: Path, size: int, md5: str) -> InputFile:
    """Move a received upload to ``folder/{file_id}/{name}`` and return its record (blocking: disk)."""
    target = folder / file_id / name
    try:
        target.parent.mkdir(parents=True)
        os.replace(received, target)
    except OSError:
        with contextlib.suppress(OSError):
            received.unlink()
        raise
    stem, dot, suffix = name.rpartition(".")
    storage_name = f"{stem}-{uuid.uuid4()}.{suffix}" if dot and stem else f"{name}-{uuid.uuid4()}"
    return InputFile(id=file_id, name=name, storage_name=storage_name, **new_file_fields(target, size, md5))
