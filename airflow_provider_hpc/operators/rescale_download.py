"""RescaleDownloadOutputsOperator: harvest a completed run's output files to object storage."""

from __future__ import annotations

import fnmatch
import json
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, ObjectStoragePath

from airflow_provider_hpc.exceptions import HpcApiError, RescaleApiError, UnsafePathError
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.lineage import LineageMixin, LineageRecord
from airflow_provider_hpc.links.rescale import RescaleJobLink
from airflow_provider_hpc.models.rescale import OutputFile
from airflow_provider_hpc.storage import resolve_output_path, safe_join, same_file_exists, write_atomically
from airflow_provider_hpc.transport.retry import RetryPolicy

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The name of the full manifest written next to the files.
MANIFEST_NAME = "_rescale_manifest.json"
#: Files downloaded at once by default: the largest concurrency that kept at least 80% of its ideal
#: speed-up over one at a time in the harvest benchmark (1,000 files of 256 KiB, 20 ms added to
#: every request: 4 reached 3.82x, 8 6.37x, just under 6.4; docs/benchmarks.md, section 3b). More
#: still finishes sooner (8 took 4.10 s there, 4 took 6.84 s), at a lower yield per thread: raise
#: ``concurrency`` for a distant platform.
DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 64
#: Above this many files, the XCom value keeps the counts and the manifest's path, not the list.
DEFAULT_MAX_XCOM_FILES = 1000


def _patterns(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(p) for p in value]


def select_files(
    files: Sequence[OutputFile],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_file_size: int | None = None,
) -> tuple[list[OutputFile], dict[str, int]]:
    """
    Return the files to download and how many were left out, and why.

    Patterns are ``fnmatch`` globs matched against the whole ``relativePath`` (``*`` also matches
    ``/``: ``*.csv`` keeps every CSV file at any depth, ``results/*`` everything under ``results``).

    :param files: every output file of the run.
    :param include: keep only files matching one of these (empty: every file).
    :param exclude: then drop files matching one of these.
    :param max_file_size: drop files larger than this many bytes.
    """
    kept: list[OutputFile] = []
    dropped = {"not_included": 0, "excluded": 0, "too_large": 0, "not_uploaded": 0}
    for file in files:
        path = file.relative_path
        if include and not any(fnmatch.fnmatchcase(path, p) for p in include):
            dropped["not_included"] += 1
        elif any(fnmatch.fnmatchcase(path, p) for p in exclude):
            dropped["excluded"] += 1
        elif max_file_size is not None and (file.decrypted_size or 0) > max_file_size:
            dropped["too_large"] += 1
        elif not file.is_uploaded:
            dropped["not_uploaded"] += 1
        else:
            kept.append(file)
    return kept, dropped


def plan_destinations(root: ObjectStoragePath, files: Sequence[OutputFile]) -> list[tuple[OutputFile, ObjectStoragePath]]:
    """
    Return where each file goes under ``root``, refusing any unsafe or clashing path before anything is written.

    :param root: the destination folder.
    :param files: the files to download.
    """
    plan: list[tuple[OutputFile, ObjectStoragePath]] = []
    seen: dict[str, str] = {}
    for file in files:
        if file.relative_path == MANIFEST_NAME:
            raise UnsafePathError(f"Output file {file.id} is named {MANIFEST_NAME!r}, which the manifest would overwrite")
        dest = safe_join(root, file.relative_path)
        if file.relative_path in seen:
            raise UnsafePathError(
                f"Output files {seen[file.relative_path]} and {file.id} share the relativePath {file.relative_path!r}"
            )
        seen[file.relative_path] = file.id
        plan.append((file, dest))
    return plan


class RescaleDownloadOutputsOperator(LineageMixin, BaseOperator):
    """
    Download a completed Rescale run's output files to object storage, verified, in parallel.

    Every page of the run's output files is listed, filtered (``include``/``exclude`` globs on
    ``relativePath``, ``max_file_size``), and each file is streamed to ``output_path /
    relativePath`` (a ``relativePath`` that would land outside ``output_path`` is refused with
    :class:`UnsafePathError` before anything is written), written atomically and checked against its
    ``decryptedSize`` and ``md5`` (a mismatch or a dropped connection retries the transfer; a
    ``429``/``5xx`` waits and retries). A file already there with the same size and md5 is skipped,
    so a re-run downloads only what is missing. Up to ``concurrency`` files travel at once, each
    thread with its own HTTP session.

    The full manifest is written to ``output_path / _rescale_manifest.json``; the XCom value is::

        {"job_id", "run_id", "output_path", "manifest_path", "file_count", "files_truncated",
         "files": [{"relative_path", "path", "size", "md5", "skipped"}, ...],
         "downloaded", "skipped", "bytes", "bytes_downloaded"}

    With more than ``max_xcom_files`` files, ``files`` is empty and ``files_truncated`` true: read the
    manifest instead (XCom lives in the metadata database). With ``outlets``, each asset event carries
    ``{"job_id", "run_id", "output_path", "manifest_path", "file_count"}`` as its extra.

    :param job_id: the Rescale job id (templated).
    :param run_id: the run id within the job (templated).
    :param output_path: the destination folder: local path, fsspec URL or ``ObjectStoragePath``
        (templated; default ``{[hpc] results_base}/{dag_id}/{run_id}/{task_id}``).
    :param include: glob(s) of the files to keep (templated; default every file).
    :param exclude: glob(s) of the files to leave out (templated).
    :param max_file_size: leave out files larger than this many bytes.
    :param concurrency: files downloaded at once (1 to 64; default 4, see :data:`DEFAULT_CONCURRENCY`).
    :param require_completed: refuse a run that has not completed (its outputs are not uploaded yet).
    :param max_xcom_files: the most file entries kept in the XCom value.
    :param page_size: files asked per page of the listing.
    :param rescale_conn_id: the Airflow connection id.
    :param retry: the HTTP retry policy (default: the connection's).
    """

    template_fields: Sequence[str] = ("job_id", "run_id", "output_path", "include", "exclude")
    operator_extra_links = (RescaleJobLink(),)
    ui_color = "#d8e8f5"

    def __init__(
        self,
        *,
        job_id: str,
        run_id: str,
        output_path: str | ObjectStoragePath | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        max_file_size: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        require_completed: bool = True,
        max_xcom_files: int = DEFAULT_MAX_XCOM_FILES,
        page_size: int = 100,
        rescale_conn_id: str = RescaleHook.default_conn_name,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 1 <= int(concurrency) <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, not {concurrency}")
        self.job_id = job_id
        self.run_id = run_id
        self.output_path = output_path
        self.include = include
        self.exclude = exclude
        self.max_file_size = max_file_size
        self.concurrency = int(concurrency)
        self.require_completed = require_completed
        self.max_xcom_files = max_xcom_files
        self.page_size = page_size
        self.rescale_conn_id = rescale_conn_id
        self.retry = retry
        self._local = threading.local()
        self._thread_hooks: list[RescaleHook] = []
        self._hooks_lock = threading.Lock()

    @cached_property
    def hook(self) -> RescaleHook:
        """The Rescale hook of this task (the listing; the downloads use one hook per thread)."""
        return RescaleHook(self.rescale_conn_id, retry=self.retry)

    def execute(self, context: Context) -> dict[str, Any]:
        """List, filter, download and verify the run's output files; return the manifest."""
        RescaleJobLink.persist(context, hook=self.hook, job_id=self.job_id)
        self.lineage = LineageRecord("rescale", job_id=str(self.job_id), url=self.hook.job_url(str(self.job_id)))
        self._check_completed()
        root = resolve_output_path(self.output_path, context)
        self.lineage.outputs = [str(root)]
        files = self.hook.list_output_files(self.job_id, self.run_id, page_size=self.page_size)
        selected, dropped = select_files(
            files, include=_patterns(self.include), exclude=_patterns(self.exclude), max_file_size=self.max_file_size
        )
        self.log.info(
            "Run %s of Rescale job %s has %d output files; %d selected (left out: %s)",
            self.run_id, self.job_id, len(files), len(selected), {k: v for k, v in dropped.items() if v} or "none",
        )
        plan = plan_destinations(root, selected)
        try:
            entries = self._download_all(plan)
        finally:
            self._close_thread_hooks()
        manifest = self._manifest(root, entries)
        manifest_path = root / MANIFEST_NAME
        write_atomically([json.dumps(manifest, indent=1).encode()], manifest_path)
        self._annotate_outlets(context, root, manifest_path, len(entries))
        self.log.info(
            "Harvested run %s of Rescale job %s to %s: %d downloaded, %d already there, %d bytes in all",
            self.run_id, self.job_id, root, manifest["downloaded"], manifest["skipped"], manifest["bytes"],
        )
        return self._xcom_value(manifest, str(manifest_path))

    def _check_completed(self) -> None:
        if not self.require_completed:
            return
        run = self.hook.get_run(self.job_id, self.run_id)
        if not run.is_completed:
            raise RescaleApiError(
                f"Run {self.run_id} of Rescale job {self.job_id} has not completed: its output files are uploaded "
                "when it completes (wait with RescaleRunSensor first, or set require_completed=False)"
            )

    # ----- downloads in parallel ----------------------------------------------------------------

    def _download_all(self, plan: Sequence[tuple[OutputFile, ObjectStoragePath]]) -> list[dict[str, Any]]:
        if not plan:
            return []
        # The connection is read once, here: pool threads reuse it instead of asking the supervisor.
        self.hook.connection  # noqa: B018
        entries: list[dict[str, Any] | None] = [None] * len(plan)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(plan)), thread_name_prefix="rescale-dl") as pool:
            futures: dict[Future[dict[str, Any]], int] = {
                pool.submit(self._fetch, file, dest): index for index, (file, dest) in enumerate(plan)
            }
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for future in pending:
                    future.cancel()
                error = failed[0].exception()
                finished = sum(1 for f in done if f.exception() is None)
                self.log.error(
                    "Downloading stopped after an error: %d of %d files are complete and verified (a re-run skips them)",
                    finished, len(plan),
                )
                assert error is not None
                raise error
            for future, index in futures.items():
                entries[index] = future.result()
        return [e for e in entries if e is not None]

    def _thread_hook(self) -> RescaleHook:
        """Return this thread's hook: its own ``requests`` session, the connection shared."""
        hook = getattr(self._local, "hook", None)
        if hook is None:
            hook = RescaleHook(self.rescale_conn_id, retry=self.retry)
            # Seed the cached connection read in the main thread (no per-thread lookup).
            hook.__dict__["connection"] = self.hook.connection
            self._local.hook = hook
            with self._hooks_lock:
                self._thread_hooks.append(hook)
        return hook

    def _close_thread_hooks(self) -> None:
        with self._hooks_lock:
            hooks, self._thread_hooks = self._thread_hooks, []
        for hook in hooks:
            hook.close()

    def _fetch(self, file: OutputFile, dest: ObjectStoragePath) -> dict[str, Any]:
        entry = {"relative_path": file.relative_path, "path": str(dest), "size": file.decrypted_size, "md5": file.md5}
        if same_file_exists(dest, file.decrypted_size, file.md5):
            self.log.debug("Skipping %s: the same bytes are already at %s", file.relative_path, dest)
            return {**entry, "skipped": True}
        try:
            # max_file_size bounds what is read too: a file whose size was not announced is cut there.
            stored = self._thread_hook().download_file(file, dest, max_bytes=self.max_file_size)
        except HpcApiError as exc:
            # The error names the endpoint (file id); the log adds which relativePath it was.
            self.log.error("Output file %s (%s) could not be downloaded: %s", file.id, file.relative_path, exc)
            raise
        self.log.debug("Downloaded %s (%d bytes, md5 %s)", file.relative_path, stored.size, stored.md5)
        return {**entry, "path": stored.path, "size": stored.size, "md5": stored.md5, "skipped": False}

    # ----- results ------------------------------------------------------------------------------

    def _manifest(self, root: ObjectStoragePath, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
        downloaded = [e for e in entries if not e["skipped"]]
        return {
            "job_id": str(self.job_id),
            "run_id": str(self.run_id),
            "output_path": str(root),
            "files": list(entries),
            "downloaded": len(downloaded),
            "skipped": len(entries) - len(downloaded),
            "bytes": sum(e["size"] or 0 for e in entries),
            "bytes_downloaded": sum(e["size"] or 0 for e in downloaded),
        }

    def _xcom_value(self, manifest: dict[str, Any], manifest_path: str) -> dict[str, Any]:
        truncated = len(manifest["files"]) > self.max_xcom_files
        if truncated:
            self.log.info(
                "%d files: more than max_xcom_files=%d, so XCom keeps the counts; the list is in %s",
                len(manifest["files"]), self.max_xcom_files, manifest_path,
            )
        return {
            **manifest,
            "files": [] if truncated else manifest["files"],
            "file_count": len(manifest["files"]),
            "files_truncated": truncated,
            "manifest_path": manifest_path,
        }

    def _annotate_outlets(self, context: Context, root: ObjectStoragePath, manifest_path: ObjectStoragePath, count: int) -> None:
        if not self.outlets:
            return
        extra = {
            "job_id": str(self.job_id),
            "run_id": str(self.run_id),
            "output_path": str(root),
            "manifest_path": str(manifest_path),
            "file_count": count,
        }
        events: Any = context.get("outlet_events")
        if events is None:
            return
        for outlet in self.outlets:
            events[outlet].extra = extra
