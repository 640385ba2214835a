"""
Landing a byte stream in object storage complete or not at all, checked against the size and md5
the server announced, with flat memory whatever the size.

Where the file goes decides how it lands (:class:`AtomicWrite` picks one of three targets):

- **a local folder** (``file://``): the bytes go to a temporary file beside the destination
  (``.hpc-partial-<uuid>-<name>``), then :func:`os.replace` puts it in place in one step;
- **S3** (``s3://``, ``s3a://``, ``s3n://``): a multipart upload straight to the final key, in parts
  of :data:`PART_BYTES` (a small file is one ``PUT``), completed only once the size and md5 have
  been checked, and aborted otherwise. S3 shows an object only when its upload completes, so no
  reader ever sees a partial object and no temporary key is ever made;
- **any other fsspec store** (``gs://``, ``abfs://``, ``memory://``...): a temporary object beside
  the destination, then a copy to the final name (server-side on object stores) and the
  temporary's removal.

On any failure (a dropped connection, a size or md5 mismatch, a limit passed, Ctrl-C), the
temporary file is removed or the upload aborted, and the final name is left as it was.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_hpc.exceptions import HpcApiError, TransferIntegrityError

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

MIB = 1024 * 1024
TEMP_PREFIX = ".hpc-partial-"
#: The part size of an S3 upload: memory per file written is about two parts.
PART_BYTES = 8 * MIB
#: S3 accepts at most this many parts in one upload: a large file gets larger parts.
MAX_PARTS = 10_000
LOCAL_PROTOCOLS = frozenset({"file", "local", ""})
#: Stores whose upload becomes visible only when completed, and whose file object can abort it (s3fs).
MULTIPART_PROTOCOLS = frozenset({"s3", "s3a", "s3n"})
# Object stores have no folders to create; on s3fs a mkdir may even try to create the bucket.
_FOLDERLESS_PROTOCOLS = MULTIPART_PROTOCOLS | {"gs", "gcs", "az", "abfs", "abfss", "adl"}
# Errors a caller reads as a name clash (a file where a folder is needed): they keep their type.
_CLASH_ERRORS = (FileExistsError, NotADirectoryError, IsADirectoryError)

@dataclass(frozen=True)
class StoredFile:
    """
    A file written to object storage.

    :param path: where it is (``str`` of the ``ObjectStoragePath``, e.g. ``file:///...`` or ``s3://...``).
    :param size: its size in bytes.
    :param md5: its hex md5.
    """

    path: str
    size: int
    md5: str

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-able form used in XCom values and manifests."""
        return asdict(self)


def part_bytes_for(bound: int | None) -> int:
    """
    Return the S3 part size for a file of at most ``bound`` bytes: :data:`PART_BYTES`, or larger
    (whole MiB) when the file would need more than :data:`MAX_PARTS` parts.

    :param bound: the announced size, else the largest size allowed, else ``None`` (unknown).
    """
    if not bound:
        return PART_BYTES
    needed = -(-int(bound) // MAX_PARTS)
    return max(PART_BYTES, -(-needed // MIB) * MIB)


class AtomicWrite:
    """
    Write one file to ``dest`` from a stream of chunks: verified, then in place, or nothing.

    :param dest: the final path.
    :param expected_size: the size the server announced; a mismatch raises and keeps nothing.
    :param expected_md5: the md5 the server announced; a mismatch raises and keeps nothing.
    :param max_bytes: refuse a body larger than this (raises, keeps nothing).
    """

    def __init__(
        self,
        dest: ObjectStoragePath,
        *,
        expected_size: int | None = None,
        expected_md5: str | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.dest = dest
        self.expected_size = None if expected_size is None else int(expected_size)
        self.expected_md5 = (expected_md5 or "").strip().lower() or None
        self.max_bytes = max_bytes

    def write(self, chunks: Iterable[bytes | memoryview]) -> StoredFile:
        """
        Stream ``chunks`` to the destination, check size and md5, then make the file visible.

        Each chunk is hashed and written before the next is asked for, so the producer may reuse
        its buffer (the transport reads a plain body into one buffer, see ``body_chunks``).
        """
        digest = StreamMd5()
        target: _Target | None = None
        try:
            with self._storage_errors("open"):
                target = open_target(self.dest, part_bytes_for(self.expected_size or self.max_bytes))
            # Chunks are read outside the storage guard: a dropped connection keeps its own type,
            # which the transport knows to retry.
            size = 0
            for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                self._check_running_size(size)
                digest.update(chunk)
                with self._storage_errors("write"):
                    target.write(chunk)
            md5 = digest.hexdigest()
            self._check_complete(size, md5)
            with self._storage_errors("complete"):
                target.commit()
        except BaseException:
            if target is not None:
                target.abort()
            raise
        _record_lineage(self.dest)
        return StoredFile(path=str(self.dest), size=size, md5=md5)

    def _check_running_size(self, size: int) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            raise HpcApiError(f"Refusing {self.dest}: larger than the limit of {self.max_bytes} bytes")
        if self.expected_size is not None and size > self.expected_size:
            # No need to store the rest of a body already longer than announced.
            raise TransferIntegrityError(
                f"{self.dest}: received more than the {self.expected_size} bytes the server announced"
            )

    def _check_complete(self, size: int, md5: str) -> None:
        if self.expected_size is not None and size != self.expected_size:
            raise TransferIntegrityError(f"{self.dest}: received {size} bytes, the server announced {self.expected_size}")
        if self.expected_md5 and md5 != self.expected_md5:
            raise TransferIntegrityError(f"{self.dest}: md5 {md5} does not match the announced {self.expected_md5}")

    @contextmanager
    def _storage_errors(self, action: str) -> Iterator[None]:
        """Turn a storage backend's error (S3 access denied, no such bucket, disk full) into the provider's."""
        try:
            yield
        except (HpcApiError, *_CLASH_ERRORS):
            raise
        except Exception as exc:
            raise HpcApiError(f"Could not {action} {self.dest}: {type(exc).__name__}: {exc}") from exc


def write_atomically(
    chunks: Iterable[bytes | memoryview],
    dest: ObjectStoragePath,
    *,
    expected_size: int | None = None,
    expected_md5: str | None = None,
    max_bytes: int | None = None,
) -> StoredFile:
    """
    Stream ``chunks`` to ``dest``, verify, and only then make the file visible (see :class:`AtomicWrite`).

    :param expected_size: the size the server announced; a mismatch raises and keeps nothing.
    :param expected_md5: the md5 the server announced; a mismatch raises and keeps nothing.
    :param max_bytes: refuse a body larger than this (raises, keeps nothing).
    """
    return AtomicWrite(dest, expected_size=expected_size, expected_md5=expected_md5, max_bytes=max_bytes).write(chunks)


def file_sink(
    dest: ObjectStoragePath,
    *,
    expected_size: int | None = None,
    expected_md5: str | None = None,
    max_bytes: int | None = None,
) -> Callable[[Iterable[bytes | memoryview]], StoredFile]:
    """
    Return a sink that writes a body's chunks to ``dest`` with :func:`write_atomically` (what a download streams into).

    :param dest: the final path.
    :param expected_size: the size the server announced.
    :param expected_md5: the md5 the server announced.
    :param max_bytes: refuse a body larger than this.
    """
    return functools.partial(
        write_atomically, dest=dest, expected_size=expected_size, expected_md5=expected_md5, max_bytes=max_bytes
    )


# ----- where the bytes go while they arrive ------------------------------------------------------


class _Target:
    """Where a file's bytes go until they are checked: ``write``, then ``commit`` or ``abort``."""

    def write(self, chunk: bytes | memoryview) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """Make the complete, checked file visible under its final name."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop what was written; never raises (the error that led here matters more)."""
        raise NotImplementedError


def open_target(dest: ObjectStoragePath, part_bytes: int = PART_BYTES) -> _Target:
    """Return the target suited to ``dest``'s store (local file, S3 multipart upload, temporary object)."""
    protocol = getattr(dest, "protocol", "") or ""
    if protocol in LOCAL_PROTOCOLS:
        return _LocalFile(dest)
    if protocol in MULTIPART_PROTOCOLS:
        return _MultipartUpload(dest, part_bytes)
    return _TemporaryObject(dest, part_bytes)


def _temporary_name(dest: ObjectStoragePath) -> str:
    # The final name is cut so a long one still leaves room for the prefix (255 bytes per name).
    return f"{TEMP_PREFIX}{uuid.uuid4().hex}-{dest.name[:100]}"


class _LocalFile(_Target):
    """A temporary file beside the destination (same folder, so one file system), then ``os.replace``."""

    def __init__(self, dest: ObjectStoragePath) -> None:
        folder = os.path.dirname(dest.path)
        os.makedirs(folder, exist_ok=True)
        self.final = dest.path
        self.temp = os.path.join(folder, _temporary_name(dest))
        self.handle = open(self.temp, "xb")  # noqa: SIM115 - closed by commit or abort

    def write(self, chunk: bytes | memoryview) -> None:
        self.handle.write(chunk)

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.temp, self.final)

    def abort(self) -> None:
        try:
            self.handle.close()
        except Exception:
            pass
        try:
            os.unlink(self.temp)
        except OSError:
            pass


class _MultipartUpload(_Target):
    """
    An s3fs upload straight to the final key, completed by ``commit`` and aborted by ``abort``.

    s3fs buffers up to a part, uploads each full part as the bytes come, and completes the upload
    (or sends a small file in one ``PUT``) when the file is closed. Closing also happens when a
    ``with`` block ends in an error, which would complete a partial object: the file is therefore
    never closed on a failure but discarded, which aborts the multipart upload.
    """

    def __init__(self, dest: ObjectStoragePath, part_bytes: int) -> None:
        self.handle = dest.fs.open(dest.path, "wb", block_size=part_bytes)

    def write(self, chunk: bytes | memoryview) -> None:
        self.handle.write(chunk)

    def commit(self) -> None:
        self.handle.close()

    def abort(self) -> None:
        try:
            self.handle.discard()
        except Exception:
            pass  # an upload left incomplete is invisible, and a lifecycle rule aborts it
        finally:
            # Marked closed, so neither a later close() nor the garbage collector completes it.
            self.handle.closed = True


class _TemporaryObject(_Target):
    """A temporary object beside the destination, then a copy to the final name and its removal."""

    def __init__(self, dest: ObjectStoragePath, part_bytes: int) -> None:
        self.dest = dest
        self.fs = dest.fs
        if dest.protocol not in _FOLDERLESS_PROTOCOLS:
            dest.parent.mkdir(parents=True, exist_ok=True)
        self.temp = (dest.parent / _temporary_name(dest)).path
        self.handle = self.fs.open(self.temp, "wb")

    def write(self, chunk: bytes | memoryview) -> None:
        self.handle.write(chunk)

    def commit(self) -> None:
        self.handle.close()
        # A copy of a complete object: readers see the old object or the new one, never a part.
        self.fs.mv(self.temp, self.dest.path)

    def abort(self) -> None:
        try:
            discard = getattr(self.handle, "discard", None)
            if callable(discard) and hasattr(self.handle, "forced"):
                discard()  # a buffered remote file: cancel its upload instead of completing it
                self.handle.closed = True
            else:
                self.handle.close()
        except Exception:
            pass
        try:
            if self.fs.exists(self.temp):
                self.fs.rm(self.temp)
        except Exception:
            pass


def _record_lineage(dest: ObjectStoragePath) -> None:
    """Tell Airflow's hook lineage the file was written (once, under its final name)."""
    from airflow.sdk.lineage import get_hook_lineage_collector

    get_hook_lineage_collector().add_output_asset(context=dest, uri=str(dest))


# ----- the md5 of a stream ---------------------------------------------------------------------


class StreamMd5:
    """
    The md5 of a stream, hashed in the caller's thread as the chunks go by, never copied.

    ``hashlib`` hashes a ``memoryview`` in place, so the transport's reused read buffer is hashed
    where it lies. A helper thread fed through a queue was tried and measured (docs/benchmarks.md,
    section 3a): on two cores shared with the server it was no faster and cost more CPU (a copy of
    every chunk, since the reader reuses its buffer, and a hand-off of the GIL per chunk).
    """

    def __init__(self) -> None:
        self._digest = hashlib.md5(usedforsecurity=False)

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Add ``chunk`` to the hash (it may be reused by the caller as soon as this returns)."""
        self._digest.update(chunk)

    def hexdigest(self) -> str:
        """Return the hex md5 of everything added so far."""
        return self._digest.hexdigest()
