"""RescaleHook: runs of Rescale jobs (state, stop, snapshot, files, directory, tail, download, statuses)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from airflow_provider_hpc.exceptions import RescaleApiError, TransferIntegrityError
from airflow_provider_hpc.hooks._base import HpcHttpHook, clean_secret
from airflow_provider_hpc.hooks._forms import RESCALE_PLATFORM_URL
from airflow_provider_hpc.models.rescale import (
    DirectoryEntry,
    JobOutcome,
    JobStatus,
    OutputFile,
    RescaleJob,
    RescaleRun,
    RunVariable,
    SnapshotResult,
    directory_from_answer,
    statuses_from_answer,
    tail_lines_from_answer,
)
from airflow_provider_hpc.models.rescale_tail import same_path
from airflow_provider_hpc.models.values import validate_segment
from airflow_provider_hpc.storage import StoredFile, as_storage_path, file_sink
from airflow_provider_hpc.transport.base import TransportSettings, UploadFile
from airflow_provider_hpc.transport.multipart import MultipartBody
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.transport.urls import with_query

if TYPE_CHECKING:
    from airflow.sdk import Connection, ObjectStoragePath

DEFAULT_PLATFORM_URL = RESCALE_PLATFORM_URL
#: Job submission (uploads, jobs, statuses) is Rescale's v2 API, whatever ``api_version`` says.
JOBS_PREFIX = "api/v2/"
#: The most output files looked at to find one file (``find_output_file``): 100 pages of 100.
MAX_FILES_SEARCHED = 10_000
# A job id no platform hands out, used to check the API key where the jobs list is not served.
_PROBE_JOB_ID = "airflow-connection-test"

__all__ = [
    "DirectoryEntry", "JobOutcome", "JobStatus", "OutputFile", "RescaleHook", "RescaleJob", "RescaleRun", "RunVariable",
    "SnapshotResult",
]


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

    # ----- connection ---------------------------------------------------------------------------

    def _settings(self, conn: Connection) -> TransportSettings:
        settings = super()._settings(conn)
        # The platform URL is an origin; the API paths carry their own /api/ prefix.
        parts = urlsplit(settings.base_url)
        return replace(settings, base_url=f"{parts.scheme}://{parts.netloc}/")

    def _api_key(self, conn: Connection) -> str:
        key = clean_secret(conn.password, "API key", conn.conn_id) or clean_secret(
            self.extra(conn, "api_key"), "API key", conn.conn_id
        )
        if not key:
            raise RescaleApiError(f"Connection {conn.conn_id!r} has no API key (put it in the password field)")
        return key

    def _prefix(self, conn: Connection) -> str:
        version = str(self.extra(conn, "api_version", "v1")).strip().lower()
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

    def list_runs(self, job_id: str, *, page_size: int = 100, limit: int | None = None) -> list[RescaleRun]:
        """
        Return the runs of a job (all pages, or the first ``limit`` runs: the pages after are not asked).

        :param limit: the most runs read.
        """
        items = self.transport.iter_pages(self._run_path(job_id), page_size=page_size, headers=self._headers)
        return [RescaleRun.from_api(r) for r in itertools.islice(items, limit)]

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
        return SnapshotResult.from_api(answer)

    def list_output_files(self, job_id: str, run_id: str, *, page_size: int = 100) -> list[OutputFile]:
        """Return every output file of a completed run (all pages)."""
        path = self._run_path(job_id, run_id, "files/")
        return [OutputFile.from_api(f) for f in self.transport.iter_pages(path, page_size=page_size, headers=self._headers)]

    def find_output_file(
        self, job_id: str, run_id: str, relative_path: str, *, page_size: int = 100, limit: int = MAX_FILES_SEARCHED
    ) -> OutputFile | None:
        """
        Return the completed run's output file at ``relative_path``, or ``None``; the pages after it are not asked.

        :param relative_path: the file's path in the run's folder (``./`` and a leading ``/`` aside).
        :param limit: the most files looked at (a run with more is not listed to its end for one file).
        """
        path = self._run_path(job_id, run_id, "files/")
        items = itertools.islice(self.transport.iter_pages(path, page_size=page_size, headers=self._headers), limit)
        return next((f for f in map(OutputFile.from_api, items) if same_path(f.relative_path, relative_path)), None)

    def read_output_file(self, file: OutputFile, *, max_bytes: int) -> bytes | None:
        """
        Return a small output file's bytes (to show it in a log), or ``None`` when it holds more than ``max_bytes``.

        Read into memory, bounded: a file meant to be kept is streamed with :meth:`download_file`.
        """
        return self.transport.get_bytes(self._contents_path(file), limit=max_bytes, headers=self._headers)

    def _contents_path(self, file: OutputFile, prefix: str | None = None) -> str:
        return f"{prefix or self._prefix(self.connection)}files/{validate_segment(file.id, 'File id')}/contents/"

    def get_directory_contents(self, job_id: str, run_id: str) -> list[DirectoryEntry]:
        """Return the files of an in-progress run's working folder."""
        answer = self.transport.get_json(self._run_path(job_id, run_id, "directory-contents/"), headers=self._headers)
        return directory_from_answer(answer)

    def tail(self, job_id: str, run_id: str, path: str, lines: int = 100) -> list[str]:
        """Return the last ``lines`` lines of a file of an in-progress run."""
        answer = self.transport.get_json(self._tail_path(job_id, run_id, path), params={"lines": int(lines)}, headers=self._headers)
        return tail_lines_from_answer(answer)

    def tail_raw(self, job_id: str, run_id: str, path: str, dest: ObjectStoragePath) -> StoredFile:
        """Stream the whole file of an in-progress run (``tail`` without ``lines``) to ``dest``."""
        return self.transport.download(self._tail_path(job_id, run_id, path), file_sink(as_storage_path(dest)), headers=self._headers)

    def _tail_path(self, job_id: str, run_id: str, path: str, prefix: str | None = None) -> str:
        parts = str(path).split("/")
        if not path or any(p in ("", ".", "..") for p in parts):
            raise RescaleApiError(f"Refusing tail path {path!r}")
        return self._run_path(job_id, run_id, f"tail/{quote(path)}/", prefix)

    def download_file(self, file: OutputFile, dest: ObjectStoragePath, *, max_bytes: int | None = None) -> StoredFile:
        """
        Stream one output file to ``dest``, checked against its ``decryptedSize`` and ``md5``.

        :param max_bytes: refuse a body longer than this, whatever size the listing announced (or not).
        """
        path = f"{self._prefix(self.connection)}files/{validate_segment(file.id, 'File id')}/contents/"
        sink = file_sink(
            as_storage_path(dest), expected_size=file.decrypted_size, expected_md5=file.md5, max_bytes=max_bytes
        )
        return self.transport.download(path, sink, headers=self._headers)

    def get_job_statuses(self, job_id: str) -> list[JobStatus]:
        """Return a job's status history, sorted by date (the API's order is not reliable)."""
        answer = self.transport.get_json(f"{JOBS_PREFIX}jobs/{validate_segment(job_id, 'Job id')}/statuses/", headers=self._headers)
        return statuses_from_answer(answer)

    # ----- jobs (v2: Rescale's job submission API) ----------------------------------------------

    def upload_file(self, source: str | ObjectStoragePath, *, name: str | None = None) -> OutputFile:
        """
        Upload an input file (``POST /api/v2/files/contents/``), streamed: memory stays flat.

        The answer's ``decryptedSize`` and ``md5`` must be what was sent, else the upload is tried
        again (a :class:`TransferIntegrityError`). Trying again after an unclear failure may leave a
        second, unused copy on the platform: it costs storage, never a run.

        :param source: a local path, an fsspec URL or an ``ObjectStoragePath`` (a Muse result on S3...).
        :param name: the name the platform shows (default: the file's own name).
        """
        path = as_storage_path(source)
        if not path.is_file():
            raise RescaleApiError(f"Input file {source} does not exist")
        part = UploadFile("file", name or path.name, lambda: path.open("rb"), path.stat().st_size)
        endpoint = f"POST /{JOBS_PREFIX}files/contents/"

        def received_as_sent(answer: Any, sent: MultipartBody) -> OutputFile:
            uploaded = OutputFile.from_api(answer)
            if uploaded.decrypted_size != part.size or (uploaded.md5 or "").lower() != sent.md5():
                raise TransferIntegrityError(
                    f"The platform says it received {uploaded.decrypted_size} bytes (md5 {uploaded.md5}) of "
                    f"{part.filename}; {part.size} bytes (md5 {sent.md5()}) were sent",
                    endpoint=endpoint,
                )
            return uploaded

        uploaded = self.transport.send_files(
            "POST", f"{JOBS_PREFIX}files/contents/", [part], headers=self._headers, idempotent=True, check=received_as_sent
        )
        self.log.info("Uploaded %s to Rescale as file %s (%d bytes)", part.filename, uploaded.id, part.size)
        return uploaded

    def create_job(self, body: Mapping[str, Any]) -> RescaleJob:
        """
        Create a job, not started (``POST /api/v2/jobs/``), from a body as Rescale's API reference gives it.

        Sent once: a retry happens only when the request surely never reached the platform.
        """
        if not isinstance(body, Mapping) or not body.get("name") or not body.get("jobanalyses"):
            raise RescaleApiError("A job body needs a name and a non-empty jobanalyses list")
        answer = self.transport.request_json(
            "POST", f"{JOBS_PREFIX}jobs/", json_body=dict(body), headers=self._headers, idempotent=False
        )
        job = RescaleJob.from_api(answer)
        self.log.info("Created Rescale job %s (%s)", job.id, job.name)
        return job

    def submit_job(self, job_id: str) -> None:
        """
        Start a created job (``POST /api/v2/jobs/{job_id}/submit/``).

        Rescale limits submissions per user and hour: a ``429`` is waited out (its ``Retry-After``),
        since it surely started nothing; any other doubt is not retried, a second submit being an error.
        """
        path = f"{JOBS_PREFIX}jobs/{validate_segment(job_id, 'Job id')}/submit/"
        self.transport.request_json("POST", path, headers=self._headers, idempotent=False)
        self.log.info("Submitted Rescale job %s", job_id)

    def get_job(self, job_id: str) -> RescaleJob:
        """Return a job (``GET /api/v2/jobs/{job_id}/``)."""
        path = f"{JOBS_PREFIX}jobs/{validate_segment(job_id, 'Job id')}/"
        return RescaleJob.from_api(self.transport.get_json(path, headers=self._headers))

    def find_jobs(self, name: str, *, limit: int = 50) -> list[RescaleJob]:
        """
        Return the jobs whose name is exactly ``name``, newest first, among the first ``limit`` the search gives.

        :param name: the job name looked for (``GET /api/v2/jobs/?search=...``).
        :param limit: the most jobs read from the search.
        """
        path = with_query(f"{JOBS_PREFIX}jobs/", search=name)
        found = itertools.islice(self.transport.iter_pages(path, page_size=min(limit, 100), headers=self._headers), limit)
        return [job for job in map(RescaleJob.from_api, found) if job.name == name]

    def stop_job(self, job_id: str) -> None:
        """Stop every run of a job (``POST /api/v2/jobs/{job_id}/stop/``); stopping twice stops once."""
        path = f"{JOBS_PREFIX}jobs/{validate_segment(job_id, 'Job id')}/stop/"
        self.transport.request_json("POST", path, headers=self._headers, idempotent=True)
        self.log.info("Asked Rescale to stop job %s", job_id)

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
        return statuses_from_answer(await self._aget(f"{JOBS_PREFIX}jobs/{validate_segment(job_id, 'Job id')}/statuses/"))

    async def a_get_directory_contents(self, job_id: str, run_id: str) -> list[DirectoryEntry]:
        """Return an in-progress run's files without blocking the event loop."""
        return directory_from_answer(await self._aget(await self._a_run_path(job_id, run_id, "directory-contents/")))

    async def a_tail(self, job_id: str, run_id: str, path: str, lines: int = 100) -> list[str]:
        """Return the last lines of an in-progress run's file without blocking the event loop."""
        await self.async_transport()
        answer = await self._aget(self._tail_path(job_id, run_id, path, self._async_prefix), {"lines": int(lines)})
        return tail_lines_from_answer(answer)

    async def a_list_output_files(self, job_id: str, run_id: str, *, page_size: int = 100) -> list[OutputFile]:
        """Return every output file of a run without blocking the event loop."""
        transport = await self.async_transport()
        path = await self._a_run_path(job_id, run_id, "files/")
        return [OutputFile.from_api(f) async for f in transport.iter_pages(path, page_size=page_size, headers=self._async_headers)]

    async def a_find_output_file(
        self, job_id: str, run_id: str, relative_path: str, *, page_size: int = 100, limit: int = MAX_FILES_SEARCHED
    ) -> OutputFile | None:
        """Return the completed run's output file at ``relative_path``, or ``None``, without blocking the event loop."""
        transport = await self.async_transport()
        path = await self._a_run_path(job_id, run_id, "files/")
        async with aclosing(transport.iter_pages(path, page_size=page_size, headers=self._async_headers)) as items:
            looked = 0
            async for item in items:
                if looked >= limit:
                    break
                looked += 1
                file = OutputFile.from_api(item)
                if same_path(file.relative_path, relative_path):
                    return file
        return None

    async def a_read_output_file(self, file: OutputFile, *, max_bytes: int) -> bytes | None:
        """Return a small output file's bytes, or ``None`` when it holds more than ``max_bytes``, without blocking."""
        transport = await self.async_transport()
        return await transport.get_bytes(
            self._contents_path(file, self._async_prefix), limit=max_bytes, headers=self._async_headers
        )

    async def a_list_runs(self, job_id: str, *, page_size: int = 100, limit: int | None = None) -> list[RescaleRun]:
        """Return the runs of a job (the first ``limit``) without blocking the event loop."""
        transport = await self.async_transport()
        path = self._run_path(job_id, prefix=self._async_prefix)
        runs: list[RescaleRun] = []
        async for item in transport.iter_pages(path, page_size=page_size, headers=self._async_headers):
            runs.append(RescaleRun.from_api(item))
            if limit is not None and len(runs) >= limit:
                break
        return runs

    async def a_stop_job(self, job_id: str) -> None:
        """Stop every run of a job without blocking the event loop (a trigger's ``on_kill``)."""
        transport = await self.async_transport()
        path = f"{JOBS_PREFIX}jobs/{validate_segment(job_id, 'Job id')}/stop/"
        await transport.request_json("POST", path, headers=self._async_headers, idempotent=True)
        self.log.info("Asked Rescale to stop job %s", job_id)

    async def a_stop_run(self, job_id: str, run_id: str) -> None:
        """Stop a run without blocking the event loop (a trigger's ``on_kill``)."""
        transport = await self.async_transport()
        await transport.request_json(
            "POST", await self._a_run_path(job_id, run_id, "stop/"), headers=self._async_headers, idempotent=True
        )
        self.log.info("Asked Rescale to stop run %s of job %s", run_id, job_id)
