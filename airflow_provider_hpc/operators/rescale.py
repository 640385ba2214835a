"""
Rescale operators that act on runs: stop one, snapshot one, list a job's runs.

Harvesting a run's output files is :class:`~airflow_provider_hpc.operators.rescale_download.RescaleDownloadOutputsOperator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, ObjectStoragePath

from airflow_provider_hpc.durable import TaskState
from airflow_provider_hpc.exceptions import HpcApiError, JobTimeout, RescaleApiError
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.links.rescale import RescaleJobLink
from airflow_provider_hpc.models.rescale import OutputFile, SnapshotResult
from airflow_provider_hpc.models.rescale_state import KnownFiles
from airflow_provider_hpc.settings import default_deferrable
from airflow_provider_hpc.storage import resolve_output_path, safe_join
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.triggers._polling import (
    PollingTrigger,
    deadline_from_timeout,
    deferral_timeout,
    first_poll_after,
    wait_in_worker,
)
from airflow_provider_hpc.triggers.rescale import RescaleRunTrigger, RescaleSnapshotTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The ``task_state_store`` key of a snapshot request: its run, what was there before, the answer.
SNAPSHOT_STATE_KEY = "rescale_snapshot"

class _RescaleRunOperator(BaseOperator):
    """
    What the operators acting on one run share: ids, hook, link, waiting settings.

    :param job_id: the Rescale job id (templated).
    :param run_id: the run id within the job (templated).
    :param rescale_conn_id: the Airflow connection id.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param poll_interval: seconds between polls at first and after each change.
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param wait_timeout: seconds to wait in all before failing with :class:`JobTimeout`.
    :param max_poll_failures: consecutive failed polls tolerated in the triggerer.
    :param retry: the HTTP retry policy (default: the connection's).
    """

    template_fields: Sequence[str] = ("job_id", "run_id")
    operator_extra_links = (RescaleJobLink(),)
    ui_color = "#d8e8f5"

    def __init__(
        self,
        *,
        job_id: str,
        run_id: str,
        rescale_conn_id: str = RescaleHook.default_conn_name,
        deferrable: bool | None = None,
        poll_interval: float = 10.0,
        max_poll_interval: float = 120.0,
        wait_timeout: float = 24 * 3600.0,
        max_poll_failures: int = 5,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.job_id = job_id
        self.run_id = run_id
        self.rescale_conn_id = rescale_conn_id
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.wait_timeout = float(wait_timeout)
        self.max_poll_failures = max_poll_failures
        self.retry = retry

    @cached_property
    def hook(self) -> RescaleHook:
        """The Rescale hook of this task."""
        return RescaleHook(self.rescale_conn_id, retry=self.retry)

    def _trigger_kwargs(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "run_id": self.run_id,
            "rescale_conn_id": self.rescale_conn_id,
            "poll_interval": self.poll_interval,
            "max_poll_interval": self.max_poll_interval,
            "deadline": deadline_from_timeout(self.wait_timeout),
            "max_poll_failures": self.max_poll_failures,
            "retry": self.retry.to_dict() if self.retry else None,
            "first_poll_at": first_poll_after(self.poll_interval),  # the task has just read the run
        }

    def _wait(self, context: Context, trigger: PollingTrigger) -> dict[str, Any]:
        """Wait with ``trigger``: in the triggerer when deferrable, else the same loop in this worker."""
        if self.deferrable:
            # What execute_complete needs travels in the trigger's ``carry``, not in defer kwargs,
            # which ``airflow dags test`` drops when it resumes the task.
            self.defer(trigger=trigger, method_name="execute_complete", timeout=deferral_timeout(self.wait_timeout))
        return self.execute_complete(context, wait_in_worker(trigger))

    @staticmethod
    def _raise_for_event(event: dict[str, Any]) -> None:
        """Raise the error a non-success trigger event stands for."""
        status = event.get("status")
        message = str(event.get("message") or status)
        if status == "timeout":
            raise JobTimeout(message)
        if status != "success":
            raise RescaleApiError(message)


class RescaleStopRunOperator(_RescaleRunOperator):
    """
    Stop a Rescale run: its processes are killed and the files it produced become its outputs.

    Idempotent: a run that has already completed is not an error (it is logged), so a retry or a
    second stop is harmless. With ``wait_for_completion``, the task then waits (in the triggerer by
    default) until the run has completed, that is until Rescale has uploaded its output files.

    The XCom value is ``{"job_id", "run_id", "stopped", "run"}``: ``stopped`` tells whether this task
    asked for the stop (``False`` when the run had already completed), ``run`` is
    :meth:`RescaleRun.to_dict` (after completion when waited for).

    :param job_id: the Rescale job id (templated).
    :param run_id: the run id within the job (templated).
    :param rescale_conn_id: the Airflow connection id.
    :param wait_for_completion: wait until the run has completed and its files are uploaded.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param poll_interval: seconds between polls at first and after each change.
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param wait_timeout: seconds to wait in all before failing with :class:`JobTimeout`.
    :param max_poll_failures: consecutive failed polls tolerated in the triggerer.
    :param retry: the HTTP retry policy (default: the connection's).
    """

    def __init__(self, *, wait_for_completion: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wait_for_completion = wait_for_completion

    def execute(self, context: Context) -> dict[str, Any]:
        """Stop the run unless it has completed; wait for its completion when asked."""
        RescaleJobLink.persist(context, hook=self.hook, job_id=self.job_id)
        run = self.hook.get_run(self.job_id, self.run_id)
        stopped = False
        if run.is_completed:
            self.log.info(
                "Run %s of Rescale job %s already completed at %s: nothing to stop", self.run_id, self.job_id, run.date_completed
            )
        else:
            stopped = self._stop()
        if not self.wait_for_completion or run.is_completed:
            return self._result(stopped, run.to_dict())
        trigger = RescaleRunTrigger(
            **self._trigger_kwargs(), accept_any_completion=True, cancel_on_kill=False, carry={"stopped": stopped}
        )
        return self._wait(context, trigger)

    def _stop(self) -> bool:
        try:
            self.hook.stop_run(self.job_id, self.run_id)
        except RescaleApiError as exc:
            # The run may have completed between the read and the stop: then there was nothing to stop.
            if exc.status not in (400, 409) or not self.hook.get_run(self.job_id, self.run_id).is_completed:
                raise
            # The error goes last: it may end with a URL, which the Airflow log view links up to the next whitespace.
            self.log.info("Run %s of Rescale job %s completed meanwhile: nothing to stop. %s", self.run_id, self.job_id, exc)
            return False
        return True

    def _result(self, stopped: bool, run: dict[str, Any] | None) -> dict[str, Any]:
        return {"job_id": str(self.job_id), "run_id": str(self.run_id), "stopped": stopped, "run": run}

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """
        Return the result once the trigger saw the run completed (safe to call twice with one event).

        :param context: the running task's context.
        :param event: the :class:`RescaleRunTrigger` event payload; its ``carry`` tells whether
            :meth:`execute` asked for the stop.
        """
        self._raise_for_event(event)
        self.log.info("Run %s of Rescale job %s has completed after the stop", self.run_id, self.job_id)
        return self._result(bool((event.get("carry") or {}).get("stopped")), event.get("run"))


class RescaleSnapshotRunOperator(_RescaleRunOperator):
    """
    Take a snapshot of an in-progress Rescale run (an archive of its working folder).

    The XCom value is ``{"job_id", "run_id", "last_snapshot_id", "exitcode", "reason", "file",
    "path"}``: ``last_snapshot_id`` is what Rescale answered (the file id of the *previous*
    snapshot); with ``wait_for_file``, the task waits (in the triggerer by default) until the new
    snapshot appears among the run's output files, and ``file`` is that file
    (:meth:`OutputFile.to_dict`); with ``output_path`` too, it is downloaded there (checked against
    its size and md5) and ``path`` is where it landed.

    The snapshot request is never repeated on doubt (a repeat would take a second snapshot).

    :param job_id: the Rescale job id (templated).
    :param run_id: the run id within the job (templated).
    :param rescale_conn_id: the Airflow connection id.
    :param wait_for_file: wait until the snapshot is an output file of the run.
    :param durable: keep the request in ``task_state_store`` so a retry re-attaches to it instead of
        taking a second snapshot (``False`` keeps nothing).
    :param output_path: a folder (local path, fsspec URL or ``ObjectStoragePath``) to download the
        snapshot to, once it appeared (templated; needs ``wait_for_file``).
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param poll_interval: seconds between polls at first and after each change.
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param wait_timeout: seconds to wait in all before failing with :class:`JobTimeout`.
    :param max_poll_failures: consecutive failed polls tolerated in the triggerer.
    :param retry: the HTTP retry policy (default: the connection's).
    """

    template_fields: Sequence[str] = ("job_id", "run_id", "output_path")

    def __init__(
        self,
        *,
        wait_for_file: bool = False,
        output_path: str | ObjectStoragePath | None = None,
        durable: bool = True,
        poll_interval: float = 5.0,
        max_poll_interval: float = 60.0,
        wait_timeout: float = 3600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(poll_interval=poll_interval, max_poll_interval=max_poll_interval, wait_timeout=wait_timeout, **kwargs)
        if output_path and not wait_for_file:
            raise ValueError("output_path needs wait_for_file=True: the snapshot is downloaded once it appeared")
        self.wait_for_file = wait_for_file
        self.output_path = output_path
        self.durable = durable

    def execute(self, context: Context) -> dict[str, Any]:
        """Ask for the snapshot (once per try cycle: a retry re-attaches); wait for its file when asked."""
        RescaleJobLink.persist(context, hook=self.hook, job_id=self.job_id)
        state = TaskState(context, SNAPSHOT_STATE_KEY, self.log, durable=self.durable)
        resumed = self._resumed_request(state)
        result, known = resumed if resumed is not None else self._request(state)
        if not self.wait_for_file:
            return result
        trigger = RescaleSnapshotTrigger(**self._trigger_kwargs(), known=known.to_dict(), carry={"snapshot": result})
        return self._wait(context, trigger)

    def _request(self, state: TaskState) -> tuple[dict[str, Any], KnownFiles]:
        """Take the snapshot, the request kept in ``task_state_store`` before it is sent and once answered."""
        run = self.hook.get_run(self.job_id, self.run_id)
        if run.is_completed:
            raise RescaleApiError(
                f"Run {self.run_id} of Rescale job {self.job_id} has already completed: snapshots only apply to runs "
                "in progress (its files are output files now)"
            )
        before = self.hook.list_output_files(self.job_id, self.run_id) if self.wait_for_file else []
        what = f"the snapshot request of run {self.run_id} of Rescale job {self.job_id}"
        # Kept before it is sent: a try that dies before hearing the answer must not take a second one.
        state.set(self._entry(KnownFiles.of(before), None), what=what)
        try:
            snapshot = self.hook.snapshot_run(self.job_id, self.run_id)
        except HpcApiError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                state.delete()  # refused: no snapshot was taken, a retry may ask again
            raise
        if snapshot.exitcode not in (0, None):
            state.delete()  # answered, and no snapshot came of it
            raise RescaleApiError(
                f"The snapshot of run {self.run_id} of Rescale job {self.job_id} failed: exit code {snapshot.exitcode}, "
                f"reason {snapshot.reason!r}"
            )
        self.log.info("Asked for a snapshot of run %s of Rescale job %s: %s", self.run_id, self.job_id, snapshot.reason)
        result = self._snapshot_result(snapshot)
        # The previous snapshot may still be uploading: its id must not be taken for the new one's.
        known = KnownFiles.of(before, snapshot.last_snapshot_id)
        state.set(self._entry(known, result), what=what)
        return result, known

    def _entry(self, known: KnownFiles, result: dict[str, Any] | None) -> dict[str, Any]:
        return {"job_id": str(self.job_id), "run_id": str(self.run_id), "known": known.to_dict(), "result": result}

    def _resumed_request(self, state: TaskState) -> tuple[dict[str, Any], KnownFiles] | None:
        """Return the request a previous try of this try cycle made on this run, if any (never a second snapshot)."""
        entry = state.get()
        if entry is None or (entry.get("job_id"), entry.get("run_id")) != (str(self.job_id), str(self.run_id)):
            return None
        if not state.same_cycle(entry):
            return None  # the task was cleared: a new snapshot is what the user asks for
        result = entry.get("result")
        if isinstance(result, dict):
            self.log.info(
                "A previous try already took the snapshot of run %s of Rescale job %s: re-attaching to it", self.run_id, self.job_id
            )
        elif not self.wait_for_file:
            # Nothing tells whether that snapshot was taken: say so rather than claim one.
            raise RescaleApiError(
                f"A previous try asked for a snapshot of run {self.run_id} of Rescale job {self.job_id} and never heard "
                "the answer; not asking again (a repeat would take a second snapshot). Look at the run's output files, "
                "or clear the task to ask anew"
            )
        else:
            self.log.warning(
                "A previous try asked for a snapshot of run %s of Rescale job %s and never heard the answer: not asking "
                "again (a repeat would take a second snapshot); waiting for the file it asked for", self.run_id, self.job_id,
            )
            result = self._snapshot_result(None)
        return result, KnownFiles.from_dict(entry.get("known"))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """
        Record (and download) the snapshot file the trigger found (safe to call twice with one event).

        :param context: the running task's context.
        :param event: the :class:`RescaleSnapshotTrigger` event payload; its ``carry`` holds the
            result :meth:`execute` built before deferring.
        """
        self._raise_for_event(event)
        file = OutputFile(**event["file"])
        requested = (event.get("carry") or {}).get("snapshot") or self._snapshot_result(None)
        return self._with_file(context, dict(requested), file)

    def _snapshot_result(self, snapshot: SnapshotResult | None) -> dict[str, Any]:
        """Return the XCom value before the file is known (``None``: the snapshot answer was lost)."""
        return {
            "job_id": str(self.job_id),
            "run_id": str(self.run_id),
            "last_snapshot_id": snapshot.last_snapshot_id if snapshot else None,
            "exitcode": snapshot.exitcode if snapshot else None,
            "reason": snapshot.reason if snapshot else None,
            "file": None,
            "path": None,
        }

    def _with_file(self, context: Context, result: dict[str, Any], file: OutputFile) -> dict[str, Any]:
        self.log.info("The snapshot is output file %s (%s, %s bytes)", file.id, file.relative_path, file.decrypted_size)
        result["file"] = file.to_dict()
        if self.output_path:
            folder = resolve_output_path(self.output_path, context)
            name = file.name or file.relative_path.rsplit("/", 1)[-1]
            stored = self.hook.download_file(file, safe_join(folder, name))
            self.log.info("Downloaded the snapshot to %s", stored.path)
            result["path"] = stored.path
        return result


class RescaleListRunsOperator(BaseOperator):
    """
    List the runs of a Rescale job with their variables, for a DAG to pick one or map over them.

    The XCom value is a list of :meth:`RescaleRun.to_dict` (``id``, ``date_started``,
    ``date_completed``, ``is_optimal``, ``type``, ``output_file_count``, ``output_file_size``,
    ``variables`` as ``{name: value}``...), in the API's display order. Pick the optimal run with
    ``[r for r in runs if r["is_optimal"]]``, or map a sensor over the run ids with ``.expand``.

    :param job_id: the Rescale job id (templated).
    :param rescale_conn_id: the Airflow connection id.
    :param completed_only: keep only the runs that have completed.
    :param optimal_only: keep only the runs Rescale marks ``isOptimal``.
    :param max_runs: refuse a job with more runs than this (the list lands in XCom; each run keeps
        at most 200 variables).
    :param page_size: runs asked per page.
    :param retry: the HTTP retry policy (default: the connection's).
    """

    template_fields: Sequence[str] = ("job_id",)
    operator_extra_links = (RescaleJobLink(),)
    ui_color = "#d8e8f5"

    def __init__(
        self,
        *,
        job_id: str,
        rescale_conn_id: str = RescaleHook.default_conn_name,
        completed_only: bool = False,
        optimal_only: bool = False,
        max_runs: int = 1000,
        page_size: int = 100,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.job_id = job_id
        self.rescale_conn_id = rescale_conn_id
        self.completed_only = completed_only
        self.optimal_only = optimal_only
        self.max_runs = max_runs
        self.page_size = page_size
        self.retry = retry

    @cached_property
    def hook(self) -> RescaleHook:
        """The Rescale hook of this task."""
        return RescaleHook(self.rescale_conn_id, retry=self.retry)

    def execute(self, context: Context) -> list[dict[str, Any]]:
        """Return the job's runs (filtered) as plain dicts."""
        RescaleJobLink.persist(context, hook=self.hook, job_id=self.job_id)
        # One run past the cap is enough to refuse: the pages after it are never asked.
        runs = self.hook.list_runs(self.job_id, page_size=self.page_size, limit=self.max_runs + 1)
        if len(runs) > self.max_runs:
            raise HpcApiError(
                f"Rescale job {self.job_id} has more than max_runs={self.max_runs} runs, too many for XCom "
                "(it lives in the metadata database): raise max_runs, or harvest or map over the runs another way"
            )
        kept = [r for r in runs if (r.is_completed or not self.completed_only) and (r.is_optimal or not self.optimal_only)]
        self.log.info("Rescale job %s has %d runs; returning %d", self.job_id, len(runs), len(kept))
        return [r.to_dict() for r in kept]
