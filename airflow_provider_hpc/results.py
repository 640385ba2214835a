"""
Where Muse results go: a small JSON-able XCom value, and files streamed under an ``ObjectStoragePath``.

Layout under a task's output folder (``output_path``, by default
``{results_base}/{dag_id}/{run_id}/{task_id}[__{map_index}]``)::

    stdout.txt     returned_type stdout.txt, or a stdout too large for XCom
    run.zip        returned_type run.zip
    run/           run.zip extracted (extract_zip=True)
    content.zip    a failed run's folder, fetched to investigate

``results_base`` is the Airflow option ``[hpc] results_base`` (environment
``AIRFLOW__HPC__RESULTS_BASE``): any fsspec URL (``s3://bucket/prefix``, ``gs://...``) or a local
path; by default ``{AIRFLOW_HOME}/hpc-results``. The XCom value is described in ``docs/results.md``.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_hpc.exceptions import HpcApiError
from airflow_provider_hpc.storage import StoredFile, as_storage_path, extract_zip, write_atomically

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_hpc.hooks.muse import MuseHook, MuseReport, MuseResult

RESULTS_SECTION = "hpc"
RESULTS_OPTION = "results_base"
DEFAULT_RESULTS_DIR = "hpc-results"
#: A stdout longer than this (characters) is written to ``stdout.txt`` instead of XCom.
DEFAULT_MAX_XCOM_STDOUT = 64 * 1024
#: The bytes of ``__WS__stderr.txt`` shown in the log of a failed run.
STDERR_TAIL_BYTES = 4096
STDOUT_MEMBER = "__WS__stdout.txt"
STDERR_MEMBER = "__WS__stderr.txt"
RESULT_FILE_NAMES = {"stdout": "stdout.txt", "stdout.txt": "stdout.txt", "run.zip": "run.zip"}
CONTENT_ZIP_NAME = "content.zip"
EXTRACT_DIR_NAME = "run"
_UNSAFE_SEGMENT_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")


def results_base() -> ObjectStoragePath:
    """Return the folder under which every task's results go (``[hpc] results_base``, or under AIRFLOW_HOME)."""
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


def result_value(
    *,
    name: str,
    key: str | None,
    report: MuseReport | None,
    returned_type: str,
    state_url: str | None,
    output_path: ObjectStoragePath,
) -> dict[str, Any]:
    """Return the XCom value's common part (what ran, where), before the result itself is added."""
    return {
        "name": name,
        "key": key,
        "job_id": report.job_id if report else None,
        "state": report.state if report else None,
        "state_url": state_url,
        "returned_type": returned_type,
        "stdout": None,
        "file": None,
        "download": None,
        "extracted": None,
        "output_path": str(output_path),
    }


def fetch_result(
    hook: MuseHook,
    *,
    name: str,
    key: str,
    report: MuseReport | None,
    returned_type: str,
    output_path: ObjectStoragePath,
    state_url: str | None = None,
    extract: bool = False,
    max_stdout_chars: int = DEFAULT_MAX_XCOM_STDOUT,
    max_file_bytes: int | None = None,
) -> dict[str, Any]:
    """
    Fetch the result of a run whose ``cr`` is ``OK`` and return the XCom value.

    :param hook: the Muse hook.
    :param name: the software name.
    :param key: the run's key.
    :param report: the run's last report (gives the job id and state).
    :param returned_type: ``stdout``, ``stdout.txt`` or ``run.zip`` (decides the file name).
    :param output_path: the folder files are written to.
    :param state_url: the run's state URL, kept in the value for people reading it.
    :param extract: extract ``run.zip`` safely under ``output_path / "run"``.
    :param max_stdout_chars: the longest stdout kept in XCom; a longer one goes to ``stdout.txt``.
    :param max_file_bytes: refuse a result file larger than this.
    """
    dest = output_path / RESULT_FILE_NAMES.get(returned_type, "result")
    result = hook.get_result(name, key, dest, max_bytes=max_file_bytes)
    value = result_value(
        name=name, key=key, report=report or result.report, returned_type=returned_type,
        state_url=state_url, output_path=output_path,
    )
    return store_result(
        hook, result, value, dest=dest, extract=extract,
        max_stdout_chars=max_stdout_chars, max_file_bytes=max_file_bytes,
    )


def store_result(
    hook: MuseHook,
    result: MuseResult,
    value: dict[str, Any],
    *,
    dest: ObjectStoragePath,
    extract: bool = False,
    max_stdout_chars: int = DEFAULT_MAX_XCOM_STDOUT,
    max_file_bytes: int | None = None,
) -> dict[str, Any]:
    """
    Put a hook's :class:`MuseResult` into ``value``: the stdout, the written file, the followed download.

    :param hook: the Muse hook (to follow a download key).
    :param result: what the service answered.
    :param value: the XCom value from :func:`result_value`, completed in place and returned.
    :param dest: the file a file result goes to.
    :param extract: extract a zip result next to ``dest``.
    :param max_stdout_chars: the longest stdout kept in XCom.
    :param max_file_bytes: refuse a downloaded file larger than this.
    """
    stored: StoredFile | None = result.file
    if result.kind == "stdout":
        text = result.stdout or ""
        if len(text) <= max_stdout_chars:
            value["stdout"] = text
        else:
            # XCom lives in the metadata database: a large stdout goes to storage instead.
            stored = write_atomically([text.encode("utf-8")], dest)
    elif result.kind == "download":
        value["download"] = {"key": result.download_key, "url": result.download_url}
        stored = hook.download(result.download_key or "", dest, max_bytes=max_file_bytes)
    if stored is not None:
        value["file"] = stored.to_dict()
        if extract and _is_zip(stored):
            value["extracted"] = extract_result(stored, dest.parent / EXTRACT_DIR_NAME)
    return value


def _is_zip(stored: StoredFile) -> bool:
    with as_storage_path(stored.path).open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def extract_result(stored: StoredFile, target: ObjectStoragePath) -> dict[str, Any]:
    """Extract a zip result safely under ``target``; return ``{"path", "files", "size"}``."""
    written = extract_zip(as_storage_path(stored.path), target)
    return {"path": str(target), "files": len(written), "size": sum(f.size for f in written)}


def fetch_failure_evidence(
    hook: MuseHook, *, name: str, key: str, output_path: ObjectStoragePath
) -> tuple[StoredFile | None, str | None, str | None]:
    """
    Fetch a failed run's folder (content zip) and read the tail of its stderr.

    Never raises for a missing piece: the failure being reported matters more than the evidence.
    Returns ``(stored zip or None, stderr tail or None, why the zip is missing or None)``.

    :param hook: the Muse hook.
    :param name: the software name.
    :param key: the run's key.
    :param output_path: the folder ``content.zip`` is written to.
    """
    try:
        stored = hook.get_content(name, key, output_path / CONTENT_ZIP_NAME)
    except HpcApiError as exc:
        return None, None, str(exc)
    try:
        tail = read_zip_text(stored.path, STDERR_MEMBER, tail_bytes=STDERR_TAIL_BYTES)
    except (OSError, zipfile.BadZipFile) as exc:
        return stored, None, f"the content zip could not be read: {exc}"
    return stored, tail, None


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


def asset_extra(value: Mapping[str, Any]) -> dict[str, Any]:
    """Return the small part of a result worth attaching to an asset event (no stdout, no download key)."""
    extra = {k: value.get(k) for k in ("name", "key", "job_id", "state", "returned_type", "output_path")}
    if value.get("file"):
        extra["file"] = value["file"]["path"]
        extra["size"] = value["file"]["size"]
    return extra
