"""
Writing remote bytes to object storage safely: confined to a destination, atomic and verified;
the folders task results go to; the one md5 of the provider.

Every file lands through :func:`~airflow_provider_hpc.storage_sink.write_atomically` (in
``storage_sink``, re-exported here): on a local disk a temporary file beside the destination then
``os.replace``; on S3 a multipart upload completed only after the size and md5 check; elsewhere a
temporary object then a copy. A failed or interrupted transfer leaves nothing under the final name.
"""

from __future__ import annotations

import os
import posixpath
import re
import zipfile
import zlib
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_hpc.exceptions import HpcApiError, UnsafePathError
from airflow_provider_hpc.storage_sink import (
    LOCAL_PROTOCOLS,
    PART_BYTES,
    TEMP_PREFIX,
    AtomicWrite,
    StoredFile,
    StreamMd5,
    file_sink,
    write_atomically,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = [
    "TEMP_PREFIX", "AtomicWrite", "StoredFile", "StreamMd5", "as_storage_path", "default_output_path", "extract_zip",
    "file_md5", "file_sink", "md5_of", "open_for_reading", "read_zip_text", "resolve_output_path", "results_base",
    "safe_join", "same_file_exists", "write_atomically",
]

RESULTS_SECTION = "hpc"
RESULTS_OPTION = "results_base"
DEFAULT_RESULTS_DIR = "hpc-results"
_UNSAFE_SEGMENT_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")
#: How much of a remote file one read fetches ahead (s3fs would read 50 MiB ahead otherwise).
READ_BLOCK_BYTES = PART_BYTES


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
    if getattr(root, "protocol", None) not in LOCAL_PROTOCOLS:
        return  # object stores have no symbolic links
    base = os.path.realpath(root.path)
    folder = os.path.realpath(target.parent.path)
    if folder != base and not folder.startswith(base + os.sep):
        raise UnsafePathError(f"Refusing path {relative!r}: a symbolic link under {root} leads outside it")


def open_for_reading(path: ObjectStoragePath) -> IO[bytes]:
    """
    Open a stored file for reading with a bounded read-ahead, so reading a large file (an md5, a
    zip's members) from an object store keeps memory flat.
    """
    if path.protocol in LOCAL_PROTOCOLS:
        return path.open("rb")
    return path.open("rb", block_size=READ_BLOCK_BYTES)


def md5_of(chunks: Iterable[bytes]) -> str:
    """Return the hex md5 of a byte stream (the same hash every download is checked with)."""
    digest = StreamMd5()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_md5(path: ObjectStoragePath) -> str:
    """Return the hex md5 of a stored file, read in chunks."""
    with open_for_reading(path) as handle:
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
    with open_for_reading(archive) as handle, zipfile.ZipFile(handle) as zipped:
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
    with open_for_reading(as_storage_path(archive)) as handle, zipfile.ZipFile(handle) as zipped:
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
