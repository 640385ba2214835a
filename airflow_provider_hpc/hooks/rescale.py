"""RescaleHook: runs of Rescale jobs (state, stop, snapshot, files, directory, tail, download, statuses)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from airflow_provider_hpc.exceptions import RescaleApiError
from airflow_provider_hpc.hooks._base import HpcHttpHook
from airflow_provider_hpc.hooks._forms import RESCALE_PLATFORM_URL, connection_form_widgets, ui_field_behaviour
from airflow_provider_hpc.hooks._http import (
    RetryPolicy,
    connection_extra,
    next_page_link,
    optional_int,
    page_results,
    validate_segment,
    with_query,
)
from airflow_provider_hpc.storage import StoredFile, as_storage_path

if TYPE_CHECKING:
    from airflow.sdk import Connection, ObjectStoragePath

DEFAULT_PLATFORM_URL = RESCALE_PLATFORM_URL
# Statuses on the way to Completed that mean the job did not succeed, whatever the final reason says.
FAILURE_STATUSES = frozenset({"stopping", "stopped", "failed", "terminated", "terminating"})
# A job id no platform hands out, used to check the API key where the jobs list is not served.
_PROBE_JOB_ID = "airflow-connection-test"
_SUCCESS_WORD = re.compile(r"\bsuccess", re.IGNORECASE)
_NEGATED_SUCCESS = re.compile(r"\b(?:not|no|never)\s+(?:\w+\s+)?success", re.IGNORECASE)


@dataclass(frozen=True)
class RunVariable:
    """A run's variable: ``name``, numeric ``value`` and ``displayValue``."""

    name: str
    value: Any
    display_value: str | None = None
    is_relative: bool = False


@dataclass(frozen=True)
class RescaleRun:
    """
    One run of a Rescale job.

    :param id: the run id within the job.
    :param date_started: ISO 8601 start, ``None`` until started.
    :param date_completed: ISO 8601 end, ``None`` until the run completed.
    :param type: 1 optimization, 2 iteration, 3 case.
    """

    id: str
    date_started: str | None = None
    date_completed: str | None = None
    display_order: int | None = None
    is_optimal: bool = False
    output_file_count: int | None = None
    output_file_size: int | None = None
    parent: str | None = None
    type: int | None = None
    variables: tuple[RunVariable, ...] = ()

    @property
    def is_completed(self) -> bool:
        """Whether the run has completed (its output files can be listed)."""
        return bool(self.date_completed)

    @property
    def variables_dict(self) -> dict[str, Any]:
        """The variables as ``{name: value}``."""
        return {v.name: v.value for v in self.variables}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (XCom, trigger events)."""
        data = asdict(self)
        data["variables"] = self.variables_dict
        return data

    @classmethod
    def from_api(cls, data: Any) -> RescaleRun:
        """Parse a run object of the API; a malformed one is a :class:`RescaleApiError`."""
        if not isinstance(data, dict) or data.get("id") in (None, ""):
            raise RescaleApiError("A run object has no id", excerpt=str(data)[:300])
        listed = data.get("variables")
        variables = tuple(
            RunVariable(
                name=str(v.get("name")),
                value=v.get("value"),
                display_value=v.get("displayValue"),
                is_relative=bool(v.get("isRelative")),
            )
            for v in (listed if isinstance(listed, list) else [])
            if isinstance(v, dict) and v.get("name") is not None
        )
        return cls(
            id=str(data["id"]),
            date_started=data.get("dateStarted"),
            date_completed=data.get("dateCompleted"),
            display_order=optional_int(data.get("displayOrder")),
            is_optimal=bool(data.get("isOptimal")),
            output_file_count=optional_int(data.get("outputFileCount")),
            output_file_size=optional_int(data.get("outputFileSize")),
            parent=None if data.get("parent") is None else str(data.get("parent")),
            type=optional_int(data.get("type")),
            variables=variables,
        )


@dataclass(frozen=True)
class OutputFile:
    """
    One output file of a run, as listed by ``GET .../runs/{run_id}/files/``.

    :param relative_path: the path under the run's folder (untrusted: join it with ``safe_join``).
    :param decrypted_size: the size in bytes.
    :param md5: the hex md5 of the bytes.
    """

    id: str
    name: str
    relative_path: str
    decrypted_size: int | None = None
    md5: str | None = None
    path: str | None = None
    date_uploaded: str | None = None
    is_uploaded: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_api(cls, data: Any) -> OutputFile:
        """Parse a file object of the API."""
        if not isinstance(data, dict) or not data.get("id"):
            raise RescaleApiError("An output file object has no id", excerpt=str(data)[:300])
        name = data.get("name") if isinstance(data.get("name"), str) else ""
        relative = data.get("relativePath") if isinstance(data.get("relativePath"), str) else ""
        if not (relative or name):
            raise RescaleApiError("An output file object has neither relativePath nor name", excerpt=str(data)[:300])
        return cls(
            id=str(data["id"]),
            name=name,
            relative_path=relative or name,
            decrypted_size=optional_int(data.get("decryptedSize")),
            md5=data.get("md5") if isinstance(data.get("md5"), str) else None,
            path=data.get("path"),
            date_uploaded=data.get("dateUploaded"),
            is_uploaded=bool(data.get("isUploaded", True)),
        )


@dataclass(frozen=True)
class JobStatus:
    """One entry of a job's status history."""

    status: str
    status_date: datetime
    status_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {"status": self.status, "statusDate": self.status_date.isoformat(), "statusReason": self.status_reason}


@dataclass(frozen=True)
class JobOutcome:
    """
    Whether a job's history says it succeeded, read from its statuses sorted by date.

    :param completed: a ``Completed`` status is present.
    :param succeeded: completed, with no stop or failure on the way and no failure reason.
    :param reason: why it did not succeed (or the success reason).
    """

    completed: bool
    succeeded: bool
    reason: str | None = None
    history: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_statuses(cls, statuses: list[JobStatus]) -> JobOutcome:
        """Decide from a date-sorted status history."""
        history = tuple(s.status for s in statuses)
        completed = [s for s in statuses if s.status.lower() == "completed"]
        if not completed:
            return cls(completed=False, succeeded=False, reason=None, history=history)
        final = completed[-1]
        troubled = [s for s in statuses if s.status.lower() in FAILURE_STATUSES]
        if troubled:
            return cls(True, False, troubled[0].status_reason or troubled[0].status, history)
        reason = (final.status_reason or "").strip()
        # "Completed successfully" is the good reason; "unsuccessfully" / "not successful" are not.
        succeeded = not reason or (bool(_SUCCESS_WORD.search(reason)) and not _NEGATED_SUCCESS.search(reason))
        return cls(True, succeeded, reason or None, history)


@dataclass(frozen=True)
class SnapshotResult:
    """What a snapshot request answered: ``lastSnapshotID`` is the file id of the previous snapshot."""

    exitcode: int | None
    last_snapshot_id: str | None
    reason: str | None = None
    data: str | None = None


@dataclass(frozen=True)
class DirectoryEntry:
    """A file of an in-progress run's working folder."""

    path: str
    resource: str | None = None


class RescaleHook(HpcHttpHook):
    """
    Talk to the Rescale API about runs of jobs.

    Connection (type ``rescale``): ``host`` is the platform URL of your region (default
    ``https://platform.rescale.com``; ``https://eu.rescale.com``, ``https://platform.rescale.jp``...),
    ``password`` the API key (sent as ``Authorization: Token <key>``). Extras: ``api_version``
    (``v1`` for ``/api/jobs/...``, the default, or ``v2``), ``verify``, ``ca_bundle``,
    ``connect_timeout``, ``read_timeout``, ``max_attempts`` (see ``docs/connections.md``).

    :param rescale_conn_id: the Airflow connection id.
    :param retry: a retry policy overriding the connection's.
    """

    conn_name_attr = "rescale_conn_id"
    default_conn_name = "rescale_default"
    conn_type = "rescale"
    hook_name = "Rescale"
    error_class = RescaleApiError
    default_url = DEFAULT_PLATFORM_URL

    def __init__(self, rescale_conn_id: str = default_conn_name, *, retry: RetryPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(rescale_conn_id, retry=retry, **kwargs)
        self.rescale_conn_id = rescale_conn_id
        self._async_headers: dict[str, str] | None = None
        self._async_prefix = "api/"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Return the connection form's labels, placeholders and hidden fields (for forms that ask the hook)."""
        return ui_field_behaviour(cls.conn_type)

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Return the connection form's extra fields as WTForms fields (for forms that ask the hook)."""
        return connection_form_widgets(cls.conn_type)

    # ----- connection ---------------------------------------------------------------------------

    def _settings(self, conn: Connection):
        settings = super()._settings(conn)
        # The platform URL is an origin; the API paths carry their own /api/ prefix.
        parts = urlsplit(settings.base_url)
        return type(settings)(**{**settings.__dict__, "base_url": f"{parts.scheme}://{parts.netloc}/"})

    @staticmethod
    def _api_key(conn: Connection) -> str:
        key = conn.password or connection_extra(conn, "api_key")
        if not key:
            raise RescaleApiError(f"Connection {conn.conn_id!r} has no API key (put it in the password field)")
        return key

    @staticmethod
    def _prefix(conn: Connection) -> str:
        version = str(connection_extra(conn, "api_version", "v1")).strip().lower()
        if version not in ("v1", "v2"):
            raise RescaleApiError(f"api_version {version!r} is not v1 or v2")
        return "api/" if version == "v1" else "api/v2/"

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self._api_key(self.connection)}"}

    def _on_async_connection(self, conn: Connection) -> None:
        self._async_headers = {"Authorization": f"Token {self._api_key(conn)}"}
        self._async_prefix = self._prefix(conn)

    def _run_path(self, job_id: str, run_id: str | None = None, suffix: str = "", prefix: str | None = None) -> str:
        job = validate_segment(job_id, "Job id")
        path = f"{prefix or self._prefix(self.connection)}jobs/{job}/runs/"
        if run_id is not None:
            path += f"{validate_segment(run_id, 'Run id')}/{suffix}"
        return path

    def job_url(self, job_id: str) -> str:
        """Return the job's page on the platform (the UI link)."""
        return f"{self.base_url}jobs/{validate_segment(job_id, 'Job id')}/"

    # ----- sync ---------------------------------------------------------------------------------

    def list_runs(self, job_id: str, *, page_size: int = 100) -> list[RescaleRun]:
        """Return every run of a job (all pages)."""
        return [
            RescaleRun.from_api(r)
            for r in self.transport.iter_pages(self._run_path(job_id), page_size=page_size, headers=self._headers)
        ]

    def get_run(self, job_id: str, run_id: str) -> RescaleRun:
        """Return one run."""
        return RescaleRun.from_api(self.transport.get_json(self._run_path(job_id, run_id), headers=self._headers))

    def stop_run(self, job_id: str, run_id: str) -> None:
        """Stop an in-progress run (its files produced so far become outputs)."""
        # Stopping twice stops once: the request may be repeated safely.
        self.transport.request_json("POST", self._run_path(job_id, run_id, "stop/"), headers=self._headers, idempotent=True)
        self.log.info("Asked Rescale to stop run %s of job %s", run_id, job_id)

    def snapshot_run(self, job_id: str, run_id: str) -> SnapshotResult:
        """Take a snapshot of an in-progress run; it later appears as a run output file."""
        # Not repeated on doubt: a repeat would take a second snapshot.
        answer = self.transport.request_json(
            "POST", self._run_path(job_id, run_id, "snapshot/"), headers=self._headers, idempotent=False
        )
        if not isinstance(answer, dict):
            raise RescaleApiError("The snapshot answer is not a JSON object", excerpt=str(answer)[:300])
        last = answer.get("lastSnapshotID")
        return SnapshotResult(
            exitcode=optional_int(answer.get("exitcode")),
            last_snapshot_id=str(last) if last not in (None, "") else None,
            reason=answer.get("reason"),
            data=answer.get("data"),
        )

    def list_output_files(self, job_id: str, run_id: str, *, page_size: int = 100) -> list[OutputFile]:
        """Return every output file of a completed run (all pages)."""
        path = self._run_path(job_id, run_id, "files/")
        return [OutputFile.from_api(f) for f in self.transport.iter_pages(path, page_size=page_size, headers=self._headers)]

    def get_directory_contents(self, job_id: str, run_id: str) -> list[DirectoryEntry]:
        """Return the files of an in-progress run's working folder."""
        answer = self.transport.get_json(self._run_path(job_id, run_id, "directory-contents/"), headers=self._headers)
        return _directory(answer)

    def tail(self, job_id: str, run_id: str, path: str, lines: int = 100) -> list[str]:
        """Return the last ``lines`` lines of a file of an in-progress run."""
        answer = self.transport.get_json(self._tail_path(job_id, run_id, path), params={"lines": int(lines)}, headers=self._headers)
        return _tail_lines(answer)

    def tail_raw(self, job_id: str, run_id: str, path: str, dest: ObjectStoragePath) -> StoredFile:
        """Stream the whole file of an in-progress run (``tail`` without ``lines``) to ``dest``."""
        return self.transport.download(self._tail_path(job_id, run_id, path), as_storage_path(dest), headers=self._headers)

    def _tail_path(self, job_id: str, run_id: str, path: str, prefix: str | None = None) -> str:
        parts = str(path).split("/")
        if not path or any(p in ("", ".", "..") for p in parts):
            raise RescaleApiError(f"Refusing tail path {path!r}")
        return self._run_path(job_id, run_id, f"tail/{quote(path)}/", prefix)

    def download_file(self, file: OutputFile, dest: ObjectStoragePath) -> StoredFile:
        """Stream one output file to ``dest``, checked against its ``decryptedSize`` and ``md5``."""
        path = f"{self._prefix(self.connection)}files/{validate_segment(file.id, 'File id')}/contents/"
        return self.transport.download(
            path, as_storage_path(dest), headers=self._headers, expected_size=file.decrypted_size, expected_md5=file.md5
        )

    def get_job_statuses(self, job_id: str) -> list[JobStatus]:
        """Return a job's status history, sorted by date (the API's order is not reliable)."""
        answer = self.transport.get_json(f"api/v2/jobs/{validate_segment(job_id, 'Job id')}/statuses/", headers=self._headers)
        return _statuses(answer)

    def test_connection(self) -> tuple[bool, str]:
        """
        Check the platform answers and accepts the API key (the UI's Test button).

        Lists one job. Where the jobs list is not served (404/405), asks for the runs of a job that
        does not exist: the platform checks the key first, so ``404`` means the key was accepted
        and ``401``/``403`` that it was refused.
        """
        try:
            prefix = self._prefix(self.connection)
            try:
                self.transport.get_json(with_query(f"{prefix}jobs/", page_size=1), headers=self._headers)
            except RescaleApiError as exc:
                if exc.status not in (404, 405):
                    raise
                try:
                    self.transport.get_json(f"{prefix}jobs/{_PROBE_JOB_ID}/runs/", headers=self._headers)
                except RescaleApiError as probe:
                    if probe.status != 404:
                        raise
        except Exception as exc:  # the UI shows the message, whatever went wrong
            return False, str(exc)
        return True, f"Connected to {self.base_url} with the API key"

    # ----- async (triggers) ---------------------------------------------------------------------

    async def _aget(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        transport = await self.async_transport()
        return await transport.get_json(path, params=params, headers=self._async_headers)

    async def _a_run_path(self, job_id: str, run_id: str, suffix: str = "") -> str:
        await self.async_transport()
        return self._run_path(job_id, run_id, suffix, prefix=self._async_prefix)

    async def a_get_run(self, job_id: str, run_id: str) -> RescaleRun:
        """Return one run without blocking the event loop."""
        return RescaleRun.from_api(await self._aget(await self._a_run_path(job_id, run_id)))

    async def a_get_job_statuses(self, job_id: str) -> list[JobStatus]:
        """Return a job's sorted status history without blocking the event loop."""
        return _statuses(await self._aget(f"api/v2/jobs/{validate_segment(job_id, 'Job id')}/statuses/"))

    async def a_get_directory_contents(self, job_id: str, run_id: str) -> list[DirectoryEntry]:
        """Return an in-progress run's files without blocking the event loop."""
        return _directory(await self._aget(await self._a_run_path(job_id, run_id, "directory-contents/")))

    async def a_tail(self, job_id: str, run_id: str, path: str, lines: int = 100) -> list[str]:
        """Return the last lines of an in-progress run's file without blocking the event loop."""
        await self.async_transport()
        answer = await self._aget(self._tail_path(job_id, run_id, path, self._async_prefix), {"lines": int(lines)})
        return _tail_lines(answer)

    async def a_list_output_files(self, job_id: str, run_id: str, *, page_size: int = 100) -> list[OutputFile]:
        """Return every output file of a run without blocking the event loop."""
        transport = await self.async_transport()
        url: str | None = with_query(transport.url(await self._a_run_path(job_id, run_id, "files/")), page=1, page_size=page_size)
        files: list[OutputFile] = []
        seen: set[str] = set()
        while url:
            if url in seen:
                raise RescaleApiError(f"The server's next page repeats an earlier one ({url}); stopping")
            seen.add(url)
            page = await transport.get_json(url, headers=self._async_headers)
            endpoint = f"GET {urlsplit(url).path}"
            files += [OutputFile.from_api(f) for f in page_results(page, RescaleApiError, endpoint)]
            following = next_page_link(page, RescaleApiError, endpoint)
            url = with_query(transport.url(following), page_size=page_size) if following else None
        return files

    async def a_stop_run(self, job_id: str, run_id: str) -> None:
        """Stop a run without blocking the event loop (a trigger's ``on_kill``)."""
        transport = await self.async_transport()
        await transport.request_json(
            "POST", await self._a_run_path(job_id, run_id, "stop/"), headers=self._async_headers, idempotent=True
        )
        self.log.info("Asked Rescale to stop run %s of job %s", run_id, job_id)


def _directory(answer: Any) -> list[DirectoryEntry]:
    if not isinstance(answer, list):
        raise RescaleApiError("directory-contents did not answer a list", excerpt=str(answer)[:300])
    return [DirectoryEntry(path=str(e["path"]), resource=e.get("resource")) for e in answer if isinstance(e, dict) and e.get("path")]


def _tail_lines(answer: Any) -> list[str]:
    lines = answer.get("lines") if isinstance(answer, dict) else None
    if not isinstance(lines, list):
        raise RescaleApiError("tail did not answer a lines list", excerpt=str(answer)[:300])
    return [str(line) for line in lines]


def _statuses(answer: Any) -> list[JobStatus]:
    items = answer.get("results") if isinstance(answer, dict) else answer
    if not isinstance(items, list):
        raise RescaleApiError("statuses did not answer a results list", excerpt=str(answer)[:300])
    statuses = []
    for item in items:
        if not isinstance(item, dict) or not item.get("status"):
            continue
        reason = item.get("statusReason")
        if reason is not None and not isinstance(reason, str):
            reason = json.dumps(reason, default=str)  # read as text rather than refused: it is only shown
        statuses.append(JobStatus(str(item["status"]), _date(item.get("statusDate")), reason))
    return sorted(statuses, key=lambda s: s.status_date)


def _date(value: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise RescaleApiError(f"Unreadable statusDate {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
