"""
Rescale triggers: wait in the triggerer, without blocking, for a run to complete or a snapshot to appear.

Both triggers poll through :class:`~airflow_provider_hpc.hooks.rescale.RescaleHook`'s ``a_*``
methods, hold one pooled aiohttp session for their whole life (``session_lease``), back off while
nothing changes (:class:`PollSchedule`), survive a bounded number of transient failures, and fire
exactly one event. Their keyword arguments are plain values only: ids, numbers, flags; never the
API key, which is read again from the connection where the trigger runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import cached_property
from typing import Any

from airflow_provider_hpc.exceptions import HpcApiError
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.models.rescale import MAX_FOLLOWED_FILE_BYTES, OutputFile, RescaleRun
from airflow_provider_hpc.models.rescale_state import (
    MAX_TAIL_LINES,
    KnownFiles,
    RescaleRunState,
    RunVerdict,
    judge_completed_run,
    pick_new_snapshot,
    run_message,
    run_result,
    run_result_of,
)
from airflow_provider_hpc.models.rescale_tail import TailFollower
from airflow_provider_hpc.triggers._polling import PollingTrigger

#: The ``status`` values of a :class:`RescaleRunTrigger` event.
RUN_EVENT_STATUSES = ("success", "failed", "timeout", "error")
#: Seconds :meth:`RescaleRunTrigger.on_kill` gives the stop request (retries included).
ON_KILL_TIMEOUT = 20.0


# ----- the triggers -------------------------------------------------------------------------------


class _RescalePollingTrigger(PollingTrigger):
    """
    What both Rescale triggers share: the run they poll, its hook, and the ``carry`` they hand back.

    :param job_id: the Rescale job id.
    :param run_id: the run id within the job.
    :param rescale_conn_id: the Airflow connection id.
    :param poll_interval: seconds between polls at first and after each change.
    :param carry: plain values the deferring task needs back, returned as the event's ``carry``.
        The task's own ``defer(kwargs=...)`` are not enough: ``airflow dags test`` drops them when
        it resumes a task, so a task that must behave the same under test keeps its state here.
    :param polling: the loop's other settings (``max_poll_interval``, ``deadline``,
        ``max_poll_failures``, ``retry``, ``end_from_trigger``, ``first_poll_at``, see
        :class:`PollingTrigger`).
    """

    def __init__(
        self,
        *,
        job_id: str,
        run_id: str,
        rescale_conn_id: str = RescaleHook.default_conn_name,
        poll_interval: float = 30.0,
        carry: Mapping[str, Any] | None = None,
        **polling: Any,
    ) -> None:
        super().__init__(conn_id=rescale_conn_id, poll_interval=poll_interval, **polling)
        self.job_id = str(job_id)
        self.run_id = str(run_id)
        self.rescale_conn_id = rescale_conn_id
        self.carry = dict(carry) if carry else None

    def _common_kwargs(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "run_id": self.run_id,
            "rescale_conn_id": self.rescale_conn_id,
            **self._polling_kwargs(),
            "carry": self.carry,
        }

    @cached_property
    def hook(self) -> RescaleHook:
        """The hook (one per trigger instance; ``on_kill`` reuses the one ``run`` used)."""
        return RescaleHook(self.rescale_conn_id, retry=self.retry_policy)

    @property
    def subject(self) -> str:
        """The run waited on, for log lines and messages."""
        return f"run {self.run_id} of Rescale job {self.job_id}"


class RescaleRunTrigger(_RescalePollingTrigger):
    """
    Poll a Rescale run until it has completed (``dateCompleted`` set), then fire exactly one event.

    The event payload is ``{"status", "job_id", "run_id", "run", "outcome", "reason", "message", "carry"}``:
    ``status`` is ``success``, ``failed`` (the job's statuses show a stop or a failure reason, see
    :func:`~airflow_provider_hpc.models.rescale_state.judge_completed_run`), ``timeout`` (the deadline passed while the run was going) or
    ``error`` (polling failed ``max_poll_failures`` times in a row, or Rescale refused a request);
    ``run`` is :meth:`RescaleRun.to_dict` of the last run read (or ``None``), ``outcome`` the job
    outcome (or ``None``).

    While the run is in progress, new lines of ``tail_path`` (found through ``directory-contents``,
    read with ``tail``) go to the task log, each line once; once it completed, the lines the last
    tail missed are read from the run's output file of that path (see :func:`finish_tail`). When
    the user kills the task while it is deferred, :meth:`on_kill` stops the run (unless
    ``cancel_on_kill`` is off); a triggerer restart or a timeout never stops it.

    The run, the connection, ``carry`` and the loop's settings are those of :class:`_RescalePollingTrigger`.

    :param accept_any_completion: report ``success`` for any completion, a stopped run included.
    :param outcome_wait: seconds to wait, once the run completed, for its job's ``Completed`` status.
    :param tail_path: a file of the run's working folder to follow into the task log.
    :param tail_lines: how many lines each tail reads (more than the file grows between two polls).
    :param cancel_on_kill: stop the run when the user kills the deferred task.
    :param end_from_trigger: end the task in the triggerer when the run succeeds, its XCom value
        :func:`run_result` (what :class:`RescaleRunSensor` returns); only a sensor may ask for it.
    """

    def __init__(
        self,
        *,
        accept_any_completion: bool = False,
        outcome_wait: float = 60.0,
        tail_path: str | None = None,
        tail_lines: int = 100,
        cancel_on_kill: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.accept_any_completion = bool(accept_any_completion)
        self.outcome_wait = float(outcome_wait)
        self.tail_path = tail_path or None
        self.tail_lines = max(1, min(int(tail_lines), MAX_TAIL_LINES))
        self.cancel_on_kill = bool(cancel_on_kill)
        self._run: RescaleRun | None = None
        self._completed_seen_at: float | None = None
        self._tail = TailFollower(self.tail_path, self.tail_lines) if self.tail_path else None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the plain keyword arguments that rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                **self._common_kwargs(),
                "accept_any_completion": self.accept_any_completion,
                "outcome_wait": self.outcome_wait,
                "tail_path": self.tail_path,
                "tail_lines": self.tail_lines,
                "cancel_on_kill": self.cancel_on_kill,
            },
        )

    async def _poll(self) -> tuple[dict[str, Any] | None, bool]:
        run = await self.hook.a_get_run(self.job_id, self.run_id)
        changed = self._note_run(run)
        if not run.is_completed:
            shown = await self._follow_tail() if self._tail else 0
            return None, changed or shown > 0
        if self._completed_seen_at is None:
            self._completed_seen_at = time.monotonic()
        if self._tail and not self._tail.finished:
            # The lines written after the last tail: tail answers 400 now, the output file has them.
            await finish_tail(self._tail, self.hook, self.job_id, self.run_id, self.log)
        statuses = await self.hook.a_get_job_statuses(self.job_id)
        verdict = judge_completed_run(
            statuses,
            accept_any_completion=self.accept_any_completion,
            waited_for_job=time.monotonic() - self._completed_seen_at,
            outcome_wait=self.outcome_wait,
        )
        if verdict is None:
            return None, changed
        message = run_message(self.job_id, self.run_id, verdict)
        (self.log.info if verdict.is_successful else self.log.warning)("%s", message)
        return self._event(verdict.status, message, verdict), changed

    def _note_run(self, run: RescaleRun) -> bool:
        """Remember the run just read; log and return whether it moved (started, completed)."""
        before = self._run
        self._run = run
        moved = before is None or (before.date_started, before.date_completed) != (run.date_started, run.date_completed)
        if moved:
            self.log.info("Rescale run %s of job %s is %s", self.run_id, self.job_id, RescaleRunState.of(run).life_cycle)
        return moved

    async def _follow_tail(self) -> int:
        """Log the lines of ``tail_path`` written since the last poll; return how many were shown."""
        assert self._tail is not None
        return await follow_tail(self._tail, self.hook, self.job_id, self.run_id, self.log)

    def _event(self, status: str, message: str, verdict: RunVerdict | None = None) -> dict[str, Any]:
        run = self._run.to_dict() if self._run else None
        return {**run_result(self.job_id, self.run_id, status, message, run=run, verdict=verdict), "carry": self.carry}

    def task_result(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The sensor's XCom value for a run that succeeded, else ``None``."""
        return run_result_of(payload) if payload.get("status") == "success" else None

    def _error(self, message: str) -> dict[str, Any]:
        return self._event("error", message)

    def _timeout(self) -> dict[str, Any]:
        state = "completed" if self._run and self._run.is_completed else "still in progress"
        message = (
            f"Timed out waiting for run {self.run_id} of Rescale job {self.job_id} ({state}); "
            "the run was not stopped"
        )
        return self._event("timeout", message)

    async def on_kill(self) -> None:
        """Stop the run: the user killed the deferred task (mark failed/success, clear)."""
        await stop_when_killed(self, lambda: self.hook.a_stop_run(self.job_id, self.run_id), cancel=self.cancel_on_kill)


async def follow_tail(tail: TailFollower, hook: RescaleHook, job_id: str, run_id: str, log: Any) -> int:
    """
    Log the lines of a run's followed file written since the last look; return how many were shown.

    The file is looked for in the run's working folder first; a failed look never fails the wait.

    :param tail: what was shown so far of the file.
    :param hook: the hook of the trigger following it.
    :param job_id: the job id.
    :param run_id: the run whose working folder holds the file.
    :param log: the trigger's logger.
    """
    try:
        if not tail.found:
            entries = await hook.a_get_directory_contents(job_id, run_id)
            if not tail.spot([entry.path for entry in entries]):
                return 0
        return tail.show(await hook.a_tail(job_id, run_id, tail.path, tail.lines), log)
    except HpcApiError as exc:
        tail.note_failure(exc, run_id, log)
        return 0


async def finish_tail(tail: TailFollower, hook: RescaleHook, job_id: str, run_id: str, log: Any) -> int:
    """
    Once the run completed, log the lines of its followed file the tail missed; return how many.

    They are read from the run's output file of that path (found in its output files list, read
    whole up to ``MAX_FOLLOWED_FILE_BYTES``); a file that is absent or larger is said in one log
    line. Looked at once per run; a failed look never fails the wait.

    :param tail: what was shown so far of the file.
    :param hook: the hook of the trigger following it.
    :param job_id: the job id.
    :param run_id: the completed run.
    :param log: the trigger's logger.
    """
    tail.finished = True
    try:
        file = await hook.a_find_output_file(job_id, run_id, tail.path)
        if not tail.pick_output(file, run_id, log):
            return 0
        assert file is not None
        body = await hook.a_read_output_file(file, max_bytes=MAX_FOLLOWED_FILE_BYTES)
    except HpcApiError as exc:
        log.warning("Could not read the output file %s of run %s for its last lines: %s", tail.path, run_id, exc)
        return 0
    return tail.show_rest(body, run_id, log)


async def stop_when_killed(trigger: PollingTrigger, stop: Callable[[], Awaitable[None]], *, cancel: bool) -> None:
    """
    Stop what ``trigger`` waits on, as its ``on_kill``: once, bounded, never raising.

    :param trigger: the trigger being killed (its ``subject`` and ``log`` name what is stopped).
    :param stop: sends the stop request.
    :param cancel: the task's ``cancel_on_kill``; off, the remote work keeps going and the log says so.
    """
    if not cancel:
        trigger.log.info("The task was killed; %s keeps going (cancel_on_kill is off)", trigger.subject)
        return
    trigger.log.info("The task was killed: stopping %s", trigger.subject)
    try:
        # Airflow bounds on_kill too ([triggerer] on_kill_timeout); this bound comes first so
        # the log says what happened instead of a bare cancellation.
        await asyncio.wait_for(stop(), timeout=ON_KILL_TIMEOUT)
    except HpcApiError as exc:
        trigger.log.warning("Could not stop %s: %s", trigger.subject, exc)
    except asyncio.TimeoutError:
        trigger.log.warning("Could not stop %s within %.0f s; stop it on the platform", trigger.subject, ON_KILL_TIMEOUT)


class RescaleSnapshotTrigger(_RescalePollingTrigger):
    """
    Poll a run's output files until a snapshot taken after ``known`` files were listed appears.

    A snapshot "is uploaded to Rescale Cloud Storage and is made available as a run output file",
    under a file id nobody knows in advance (the snapshot request answers the *previous* snapshot's
    id). The new snapshot is thus the output file that was not listed before the request: when
    several new files appear (the run completed meanwhile and uploaded all its outputs), the one
    whose name says ``snapshot`` and was uploaded last.

    The event payload is ``{"status", "job_id", "run_id", "file", "message", "carry"}``: ``status``
    is ``success`` (``file`` is :meth:`OutputFile.to_dict`), ``timeout`` or ``error``.

    The run, the connection, ``carry`` and the loop's settings are those of :class:`_RescalePollingTrigger`.

    :param known: what the run's output files were before the snapshot request
        (:meth:`KnownFiles.to_dict`: bounded, whatever the number of files).
    :param known_file_ids: the form earlier versions stored (every id listed); read, never written.
    """

    def __init__(
        self, *, known: dict[str, Any] | None = None, known_file_ids: Sequence[str] = (), **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        # known_file_ids is how earlier versions stored it: trigger rows written then still load.
        self.known = KnownFiles.from_dict(known) if known or not known_file_ids else KnownFiles(None, tuple(map(str, known_file_ids)))

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the plain keyword arguments that rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {**self._common_kwargs(), "known": self.known.to_dict()},
        )

    async def _poll(self) -> tuple[dict[str, Any] | None, bool]:
        files = await self.hook.a_list_output_files(self.job_id, self.run_id)
        snapshot = pick_new_snapshot(files, self.known)
        if snapshot is None:
            return None, False
        message = f"Snapshot {snapshot.id} ({snapshot.relative_path}) of run {self.run_id} of Rescale job {self.job_id} is available"
        self.log.info("%s", message)
        return self._event("success", message, snapshot), True

    def _event(self, status: str, message: str, file: OutputFile | None = None) -> dict[str, Any]:
        return {
            "status": status,
            "job_id": self.job_id,
            "run_id": self.run_id,
            "file": file.to_dict() if file else None,
            "message": message,
            "carry": self.carry,
        }

    def _error(self, message: str) -> dict[str, Any]:
        return self._event("error", message)

    def _timeout(self) -> dict[str, Any]:
        return self._event(
            "timeout", f"Timed out waiting for the snapshot of run {self.run_id} of Rescale job {self.job_id} to appear"
        )
