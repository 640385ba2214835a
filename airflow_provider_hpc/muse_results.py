"""
Collecting a Muse run's result: the XCom value, files streamed under an ``ObjectStoragePath``, and a
failed run's evidence.

Layout under a task's output folder (``output_path``, by default
``{results_base}/{dag_id}/{run_id}/{task_id}[__{map_index}]``, see
:func:`~airflow_provider_hpc.storage.default_output_path`)::

    stdout.txt     returned_type stdout.txt, or a stdout too large for XCom
    run.zip        returned_type run.zip
    run/           run.zip extracted (extract_zip=True)
    content.zip    a failed run's folder, fetched to investigate

:class:`MuseResultMixin` is what the Muse operators and the sensor share on top of it. The XCom
value is described in ``docs/results.md``.
"""

from __future__ import annotations

import zipfile
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset

from airflow_provider_hpc.exceptions import HpcApiError, MuseJobFailed
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.lineage import LineageMixin, LineageRecord
from airflow_provider_hpc.models.muse import (
    DEFAULT_MAX_FILE_BYTES,
    CONTENT_ZIP_NAME,
    DEFAULT_MAX_XCOM_STDOUT,
    EXTRACT_DIR_NAME,
    MAX_CONTENT_ZIP_BYTES,
    RESULT_FILE_NAMES,
    STDERR_MEMBER,
    STDERR_TAIL_BYTES,
    MuseReport,
    MuseResult,
    asset_extra,
    describe_result,
    result_value,
)
from airflow_provider_hpc.models.values import SHORT_TEXT, capped
from airflow_provider_hpc.storage import (
    StoredFile,
    as_storage_path,
    extract_zip,
    read_zip_text,
    resolve_output_path,
    write_atomically,
)

if TYPE_CHECKING:
    from airflow.sdk import Context, ObjectStoragePath


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
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
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
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
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


def failure_message(
    name: str, key: str, report: MuseReport | None, stored: StoredFile | None, missing: str | None, state_url: str
) -> str:
    """
    Return a failed run's error: a short first line (key, state, where the content zip is), details below.

    Each line is bounded, and a URL or path ends its line: the Airflow log view links a URL up to
    the next whitespace.
    """
    state = report.latest_state if report and report.latest_state else (report.cr.value if report else "unknown")
    where = f"content zip at {stored.path}" if stored else "the content zip could not be fetched"
    lines = [
        f"Muse run {name}/{key} ended badly: latest_state {capped(str(state), SHORT_TEXT)}; {where}",
        f"SLURM job {report.job_id if report else None}, latest_cr {capped(str(report.latest_cr if report else None), SHORT_TEXT)}",
    ]
    if stored is None and missing:
        lines.append(f"why no content zip: {capped(' '.join(str(missing).split()), 300)}")
    lines.append(f"state: {state_url}")
    return "\n".join(lines)


def _is_zip(stored: StoredFile) -> bool:
    path = as_storage_path(stored.path)
    # Four bytes asked for, not a read-ahead block: on an object store that is one small range request.
    return path.fs.cat_file(path.path, start=0, end=4) == b"PK\x03\x04"


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
        stored = hook.get_content(name, key, output_path / CONTENT_ZIP_NAME, max_bytes=MAX_CONTENT_ZIP_BYTES)
    except HpcApiError as exc:
        return None, None, str(exc)
    try:
        tail = read_zip_text(stored.path, STDERR_MEMBER, tail_bytes=STDERR_TAIL_BYTES)
    except (OSError, zipfile.BadZipFile) as exc:
        return stored, None, f"the content zip could not be read: {exc}"
    return stored, tail, None


class MuseResultMixin(LineageMixin):
    """
    What the Muse operators and the sensor share: the hook, the output folder, fetching results,
    announcing assets, and the lineage of the run (:meth:`_note_run`).
    """

    muse_conn_id: str
    output_path: str | ObjectStoragePath | None
    extract_zip: bool
    max_stdout_chars: int
    max_file_bytes: int | None
    outlets: list[Any]
    log: Any

    @cached_property
    def hook(self) -> MuseHook:
        """The Muse hook of this task's connection."""
        return MuseHook(self.muse_conn_id)

    def _collect(
        self, context: Context, name: str, key: str, report: MuseReport | None, returned_type: str | None
    ) -> dict[str, Any]:
        returned_type = returned_type or (report.request.get("returned_type") if report else None) or "stdout"
        value = fetch_result(
            self.hook,
            name=name,
            key=key,
            report=report,
            returned_type=returned_type,
            output_path=resolve_output_path(self.output_path, context),
            state_url=self.hook.state_url(name, key),
            extract=self.extract_zip,
            max_stdout_chars=self.max_stdout_chars,
            max_file_bytes=self.max_file_bytes,
        )
        self.log.info("Muse run %s/%s result: %s", name, key, describe_result(value))
        self._note_run(name, key, value)
        self._announce(context, value)
        return value

    def _note_run(self, name: str, key: str | None, value: dict[str, Any] | None = None, inputs: list[str] | None = None) -> None:
        """Note the run, the files sent and the result files stored, for the task's OpenLineage event."""
        record = self.lineage or LineageRecord("muse")
        record.software, record.job_id = name, key or record.job_id
        record.url = self.hook.state_url(name, key) if key else record.url
        if inputs is not None:
            record.inputs = inputs
        if value:
            stored = [value.get("file"), value.get("extracted")]
            record.outputs = [entry["path"] for entry in stored if isinstance(entry, dict) and entry.get("path")]
        self.lineage = record

    def _failure(self, context: Context, name: str, key: str, report: MuseReport | None) -> MuseJobFailed:
        """Fetch a failed run's folder, log its stderr tail, and return the error naming where it is."""
        self._note_run(name, key)
        output_path = resolve_output_path(self.output_path, context)
        stored, stderr_tail, missing = fetch_failure_evidence(self.hook, name=name, key=key, output_path=output_path)
        if stderr_tail:
            self.log.error("Tail of %s of Muse run %s/%s:\n%s", STDERR_MEMBER, name, key, stderr_tail)
        elif stored is not None:
            self.log.error("Muse run %s/%s left no %s to show (%s)", name, key, STDERR_MEMBER, missing or "missing or empty")
        return MuseJobFailed(failure_message(name, key, report, stored, missing, self.hook.state_url(name, key)))

    def _announce(self, context: Context, value: dict[str, Any]) -> None:
        """Attach the result's summary to every asset this task declares as an outlet."""
        assets = [outlet for outlet in self.outlets or () if isinstance(outlet, Asset)]
        if not assets:
            return
        extra = asset_extra(value)
        for asset in assets:
            context["outlet_events"][asset].extra.update(extra)
