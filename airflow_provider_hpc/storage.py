"""
Writing remote bytes to object storage safely: atomic, verified, confined to a destination; the
folders task results go to; the one md5 of the provider.

Every file lands through :func:`write_atomically`: the bytes go to a temporary name beside the
destination, are checked against the size and md5 the server announced, and only then are
renamed to the final name (on object stores, where a rename is a copy, the copy of a complete
object is itself atomic). A failed or interrupted transfer leaves nothing under the final name.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import queue
import re
import threading
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_hpc.exceptions import HpcApiError, TransferIntegrityError, UnsafePathError

if TYPE_CHECKING:
    from airflow.sdk import Context

TEMP_PREFIX = ".hpc-partial-"
RESULTS_SECTION = "hpc"
RESULTS_OPTION = "results_base"
DEFAULT_RESULTS_DIR = "hpc-results"
_UNSAFE_SEGMENT_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")

# A large body's md5 is computed in a helper thread once this many bytes have been hashed inline:
# md5 costs about as much CPU as the TLS decrypt and the file write together, and hashlib releases
# the GIL on large buffers, so the hash then runs beside the network read instead of after it.
# Below it (Rescale outputs of a few hundred KiB, thousands of them) no thread is ever started.
PIPELINE_AFTER_BYTES = 4 * 1024 * 1024
# Chunks waiting for the helper thread at most (about 1 MiB each from the hooks): memory stays flat.
PIPELINE_QUEUE_CHUNKS = 4


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


def as_storage_path(value: str | ObjectStoragePath) -> ObjectStoragePath:
    """Return ``value`` as an ``ObjectStoragePath``; a bare local path becomes ``file://``."""
    if isinstance(value, ObjectStoragePath):
        return value
    text = str(value)
    if "://" not in text:
        text = "file://" + posixpath.abspath(text)
    return ObjectStoragePath(text)


def safe_join(root: ObjectStoragePath, relative: str) -> ObjectStoragePath:
    """
    Return ``root / relative``, refusing any ``relative`` that could land outside ``root``.

    Absolute paths, drive letters, backslashes, ``..`` and empty segments are refused, and so is
    ``::`` (fsspec reads it as a chain of file systems); the joined path must stay below ``root``
    whatever the backend makes of the name, and on local storage no symbolic link may lead out.
    """
    text = str(relative)
    parts = text.split("/")
    if (
        not text
        or text.startswith("/")
        or "\\" in text
        or "\x00" in text
        or "::" in text
        or (len(parts[0]) >= 2 and parts[0][1] == ":")
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UnsafePathError(f"Refusing path {relative!r}: it could write outside {root}")
    try:
        target = root.joinpath(*parts)
    except Exception as exc:  # a name the backend reads as something other than a file name
        raise UnsafePathError(f"Refusing path {relative!r}: {type(exc).__name__}: {exc}") from None
    if target.protocol != root.protocol or not target.path.startswith(root.path.rstrip("/") + "/"):
        raise UnsafePathError(f"Refusing path {relative!r}: it resolves to {target}, outside {root}")
    _confine_locally(root, target, relative)
    return target


def _confine_locally(root: ObjectStoragePath, target: ObjectStoragePath, relative: str) -> None:
    """On local storage, refuse a target whose folder a symbolic link already there leads outside ``root``."""
    if getattr(root, "protocol", None) not in ("file", "local", ""):
        return  # object stores have no symbolic links
    base = os.path.realpath(root.path)
    folder = os.path.realpath(target.parent.path)
    if folder != base and not folder.startswith(base + os.sep):
        raise UnsafePathError(f"Refusing path {relative!r}: a symbolic link under {root} leads outside it")


def write_atomically(
    chunks: Iterable[bytes],
    dest: ObjectStoragePath,
    *,
    expected_size: int | None = None,
    expected_md5: str | None = None,
    max_bytes: int | None = None,
) -> StoredFile:
    """
    Stream ``chunks`` to ``dest`` under a temporary name, verify, then move into place.

    :param expected_size: the size the server announced; a mismatch raises and keeps nothing.
    :param expected_md5: the md5 the server announced; a mismatch raises and keeps nothing.
    :param max_bytes: refuse a body larger than this (raises, keeps nothing).
    """
    announced = None if expected_size is None else int(expected_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Beside the destination, so the final move stays within one folder (one filesystem, one bucket).
    # The name is cut so a long final name still leaves room for the prefix (255 bytes per name).
    temp = dest.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{dest.name[:100]}"
    digest = StreamMd5()
    size = 0
    try:
        out = temp.open("wb")
        try:
            for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise HpcApiError(f"Refusing {dest}: larger than the limit of {max_bytes} bytes")
                if announced is not None and size > announced:
                    # No need to store the rest of a body already longer than announced.
                    raise TransferIntegrityError(f"{dest}: received more than the {announced} bytes the server announced")
                digest.update(chunk)
                out.write(chunk)
        except BaseException:
            _close_quietly(out)
            raise
        out.close()
        md5 = digest.hexdigest()
        if announced is not None and size != announced:
            raise TransferIntegrityError(f"{dest}: received {size} bytes, the server announced {announced}")
        if expected_md5 and md5 != expected_md5.strip().lower():
            raise TransferIntegrityError(f"{dest}: md5 {md5} does not match the announced {expected_md5}")
        temp.rename(dest)
    except BaseException:
        _remove_quietly(temp)
        raise
    finally:
        digest.close()  # never leave the helper thread behind, whatever happened
    return StoredFile(path=str(dest), size=size, md5=md5)


def file_sink(
    dest: ObjectStoragePath,
    *,
    expected_size: int | None = None,
    expected_md5: str | None = None,
    max_bytes: int | None = None,
) -> Callable[[Iterable[bytes]], StoredFile]:
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


class StreamMd5:
    """
    The md5 of a stream, hashed inline at first, then in a helper thread for a large body.

    The first :data:`PIPELINE_AFTER_BYTES` are hashed in the caller's thread; past them, chunks go
    through a bounded queue to one helper thread, so hashing overlaps the caller's network read and
    file write. :meth:`hexdigest` waits for the helper and re-raises any error it met;
    :meth:`close` stops it without waiting for the rest of the hash (call it on every error path).
    """

    _STOP = object()

    def __init__(self) -> None:
        self._digest = hashlib.md5(usedforsecurity=False)
        self._inline = 0
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._may_pipeline = True

    def update(self, chunk: bytes) -> None:
        """Add ``chunk`` to the hash; raise the helper thread's error, if it met one."""
        if self._queue is None:
            self._digest.update(chunk)
            self._inline += len(chunk)
            if self._may_pipeline and self._inline >= PIPELINE_AFTER_BYTES:
                self._start()
            return
        if self._error is not None:
            raise self._error
        # The chunk is read later by the other thread: a mutable buffer could change under it meanwhile.
        self._queue.put(chunk if isinstance(chunk, bytes) else bytes(chunk))

    def hexdigest(self) -> str:
        """Wait for every chunk to be hashed; return the hex md5 (or raise the helper thread's error)."""
        self._stop(cancel=False)
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def close(self) -> None:
        """Stop the helper thread, dropping what it has not hashed yet; harmless if already stopped."""
        self._stop(cancel=True)

    def _start(self) -> None:
        self._may_pipeline = False  # one helper per stream, tried once
        chunks: queue.Queue[Any] = queue.Queue(maxsize=PIPELINE_QUEUE_CHUNKS)
        thread = threading.Thread(target=self._run, args=(chunks,), name="hpc-md5", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            return  # no thread to spare (thousands already running): keep hashing inline
        self._queue, self._thread = chunks, thread

    def _run(self, chunks: queue.Queue[Any]) -> None:
        # Always drain the queue up to the stop mark, even after an error or a cancel, so the
        # producer never blocks on a full queue.
        while (chunk := chunks.get()) is not self._STOP:
            if self._error is None and not self._cancelled:
                try:
                    self._digest.update(chunk)
                except BaseException as exc:  # surfaced in the caller's thread by update/hexdigest
                    self._error = exc

    def _stop(self, *, cancel: bool) -> None:
        thread = self._thread
        if thread is None:
            return
        if cancel:
            self._cancelled = True
        assert self._queue is not None
        self._queue.put(self._STOP)
        thread.join()
        self._thread = None
        self._queue = None


def _close_quietly(handle: Any) -> None:
    """Close a half-written temporary file (it is removed next); the original error matters more."""
    try:
        handle.close()
    except Exception:
        pass


def md5_of(chunks: Iterable[bytes]) -> str:
    """Return the hex md5 of a byte stream (the same hash every download is checked with)."""
    digest = StreamMd5()
    try:
        for chunk in chunks:
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        digest.close()


def file_md5(path: ObjectStoragePath) -> str:
    """Return the hex md5 of a stored file, read in chunks."""
    with path.open("rb") as handle:
        return md5_of(iter(lambda: handle.read(1024 * 1024), b""))


def same_file_exists(path: ObjectStoragePath, size: int | None, md5: str | None) -> bool:
    """Whether ``path`` already holds exactly the announced bytes (so a re-run can skip it)."""
    try:
        if not path.is_file():
            return False
        if size is not None and path.stat().st_size != int(size):
            return False
    except (OSError, ValueError):
        return False
    return bool(md5) and file_md5(path) == str(md5).lower()


def extract_zip(
    archive: ObjectStoragePath,
    dest: ObjectStoragePath,
    *,
    max_total_bytes: int = 10 * 1024**3,
    max_members: int = 100_000,
) -> list[StoredFile]:
    """
    Extract a zip to ``dest`` safely: no member outside ``dest``, no links, bounded total size.

    The limits stop zip bombs: the sizes the archive declares are checked first, and the bytes
    actually written are counted again while extracting. A broken archive (not a zip, truncated,
    a member whose bytes do not match its header) is an :class:`HpcApiError` naming the archive.
    """
    try:
        return _extract_zip(archive, dest, max_total_bytes=max_total_bytes, max_members=max_members)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise HpcApiError(f"{archive} is not a zip archive that can be extracted: {exc}") from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise UnsafePathError(f"{archive} holds members that clash (a file and a folder of one name): {exc}") from None


def _extract_zip(
    archive: ObjectStoragePath, dest: ObjectStoragePath, *, max_total_bytes: int, max_members: int
) -> list[StoredFile]:
    with archive.open("rb") as handle, zipfile.ZipFile(handle) as zipped:
        members = [m for m in zipped.infolist() if not m.is_dir()]
        if len(members) > max_members:
            raise UnsafePathError(f"{archive} holds {len(members)} files, more than the limit of {max_members}")
        if sum(m.file_size for m in members) > max_total_bytes:
            raise UnsafePathError(f"{archive} would expand beyond the limit of {max_total_bytes} bytes")
        targets = []
        for member in members:
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise UnsafePathError(f"Refusing symbolic link {member.filename!r} in {archive}")
            targets.append((member, safe_join(dest, member.filename)))
        written: list[StoredFile] = []
        budget = max_total_bytes
        for member, target in targets:
            with zipped.open(member) as source:
                stored = write_atomically(iter(lambda: source.read(1024 * 1024), b""), target, max_bytes=budget)
            budget -= stored.size
            written.append(stored)
        return written


def _remove_quietly(path: ObjectStoragePath) -> None:
    """Remove a temporary file if it is there; a failed clean-up must not hide the original error."""
    try:
        if path.exists():
            path.unlink()
    except Exception:
        pass


# ----- where task results go ---------------------------------------------------------------------


def results_base() -> ObjectStoragePath:
    """
    Return the folder under which every task's results go (``[hpc] results_base``, or under AIRFLOW_HOME).

    ``results_base`` is the Airflow option ``[hpc] results_base`` (environment
    ``AIRFLOW__HPC__RESULTS_BASE``): any fsspec URL (``s3://bucket/prefix``, ``gs://...``) or a local
    path. On several machines it must be shared storage: one worker's disk is not seen by another.
    """
    from airflow.sdk.configuration import conf

    configured = conf.get(RESULTS_SECTION, RESULTS_OPTION, fallback=None)
    if configured:
        return as_storage_path(configured)
    airflow_home = os.path.expanduser(os.environ.get("AIRFLOW_HOME", "~/airflow"))
    return as_storage_path(os.path.join(airflow_home, DEFAULT_RESULTS_DIR))


def _segment(value: Any) -> str:
    """Turn a dag id, run id or task id into one path segment that every object store accepts."""
    text = _UNSAFE_SEGMENT_CHARS.sub("_", str(value)).strip("._") or "_"
    return text[:200]


def default_output_path(context: Context) -> ObjectStoragePath:
    """
    Return the task instance's own results folder: ``{results_base}/{dag_id}/{run_id}/{task_id}``.

    A mapped task instance gets ``{task_id}__{map_index}``, so the runs of a sweep never collide;
    tries of one task instance share the folder (every file is replaced atomically).

    :param context: the running task's context.
    """
    ti: Any = context["ti"]
    leaf = _segment(ti.task_id)
    map_index = getattr(ti, "map_index", None)
    if map_index is not None and map_index >= 0:
        leaf = f"{leaf}__{map_index}"
    return results_base() / _segment(ti.dag_id) / _segment(ti.run_id) / leaf


def resolve_output_path(output_path: str | ObjectStoragePath | None, context: Context) -> ObjectStoragePath:
    """
    Return ``output_path`` as an ``ObjectStoragePath``, or the task's default results folder.

    :param output_path: a local path, an fsspec URL or an ``ObjectStoragePath``; empty for the default.
    :param context: the running task's context.
    """
    if output_path:
        return as_storage_path(output_path)
    return default_output_path(context)


def read_zip_text(
    archive: str | ObjectStoragePath, member: str, *, tail_bytes: int | None = None, max_bytes: int = 16 * 1024 * 1024
) -> str | None:
    """
    Return the text of ``member`` in a zip (matched by its base name, the shallowest first), or ``None``.

    Reads from any object store, streaming: with ``tail_bytes`` only the end of the member is kept,
    so a huge stderr costs no memory.

    :param archive: the zip (local path, URL or ``ObjectStoragePath``).
    :param member: the member's base name, e.g. ``__WS__stdout.txt``.
    :param tail_bytes: keep only the last bytes.
    :param max_bytes: without ``tail_bytes``, refuse a member larger than this.
    """
    with as_storage_path(archive).open("rb") as handle, zipfile.ZipFile(handle) as zipped:
        candidates = [i for i in zipped.infolist() if not i.is_dir() and i.filename.rsplit("/", 1)[-1] == member]
        if not candidates:
            return None
        info = min(candidates, key=lambda i: i.filename.count("/"))
        if tail_bytes is None and info.file_size > max_bytes:
            raise HpcApiError(f"{member} in {archive} is {info.file_size} bytes, more than {max_bytes}")
        keep = tail_bytes if tail_bytes is not None else max_bytes
        buffer = b""
        with zipped.open(info) as source:
            while chunk := source.read(64 * 1024):
                buffer = (buffer + chunk)[-keep:]
    return buffer.decode("utf-8", errors="replace")
