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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from airflow_provider_hpc.exceptions import HpcApiError
from airflow_provider_hpc.hooks.rescale import FAILURE_STATUSES, JobOutcome, JobStatus, OutputFile, RescaleHook, RescaleRun
from airflow_provider_hpc.triggers._polling import PollingTrigger

#: The ``status`` values of a :class:`RescaleRunTrigger` event.
RUN_EVENT_STATUSES = ("success", "failed", "timeout", "error")
#: The most lines one tail request asks for (the API reads them from the end of the file).
MAX_TAIL_LINES = 1000
#: Seconds :meth:`RescaleRunTrigger.on_kill` gives the stop request (retries included).
ON_KILL_TIMEOUT = 20.0


# ----- deciding a completed run's outcome (shared with the sensor's poke mode) --------------------


def outcome_to_dict(outcome: JobOutcome) -> dict[str, Any]:
    """
    Return a job outcome as JSON-able values (trigger events, XCom).

    :param outcome: the outcome read from the job's statuses.
    """
    return {
        "completed": outcome.completed,
        "succeeded": outcome.succeeded,
        "reason": outcome.reason,
        "history": list(outcome.history),
    }


@dataclass(frozen=True)
class RunVerdict:
    """
    What a completed run's job statuses say: ``success`` or ``failed``, why, and the outcome seen.

    :param status: ``success`` or ``failed``.
    :param reason: the status reason that decided it (or a note when the job is still going).
    :param outcome: the job outcome read from the date-sorted statuses.
    """

    status: str
    reason: str | None
    outcome: JobOutcome


def judge_completed_run(
    statuses: Sequence[JobStatus],
    *,
    accept_any_completion: bool,
    waited_for_job: float,
    outcome_wait: float,
) -> RunVerdict | None:
    """
    Decide whether a completed run succeeded from its job's status history, or ``None`` to ask again.

    Rescale keeps statuses per job, not per run. A ``Completed`` job decides through
    :meth:`JobOutcome.from_statuses` (a ``Stopping``/``Stopped`` on the way or a failure
    ``statusReason`` is a failure). A job that has not completed yet (its ``Completed`` status may
    lag the run's ``dateCompleted`` by a moment, or other runs of the job are still going) is
    waited for up to ``outcome_wait`` seconds; past that, the run counts as a success unless a stop
    or failure status is already in the history.

    :param statuses: the job's statuses, sorted by date.
    :param accept_any_completion: count any completion as a success (a stopped run included).
    :param waited_for_job: seconds since the run was first seen completed.
    :param outcome_wait: the longest wait for the job's ``Completed`` status.
    """
    outcome = JobOutcome.from_statuses(list(statuses))
    troubled = [s for s in statuses if s.status.lower() in FAILURE_STATUSES]
    if accept_any_completion:
        return RunVerdict("success", outcome.reason, outcome)
    if outcome.completed:
        return RunVerdict("success" if outcome.succeeded else "failed", outcome.reason, outcome)
    if troubled:
        return RunVerdict("failed", troubled[0].status_reason or troubled[0].status, outcome)
    if waited_for_job < outcome_wait:
        return None
    note = "the run completed; its job has not completed yet (other runs still going?), no failure status so far"
    return RunVerdict("success", note, outcome)


def run_result(job_id: str, run_id: str, run: dict[str, Any] | None, verdict_outcome: dict[str, Any] | None,
               status: str, reason: str | None, message: str) -> dict[str, Any]:
    """
    Return the XCom value of a finished wait: ``{"job_id", "run_id", "status", "run", "outcome", "reason", "message"}``.

    :param job_id: the job id.
    :param run_id: the run id.
    :param run: :meth:`RescaleRun.to_dict` of the completed run.
    :param verdict_outcome: the job outcome as :func:`outcome_to_dict` gives it.
    :param status: ``success`` or ``failed``.
    :param reason: the status reason that decided.
    :param message: the one-line summary.
    """
    return {
        "job_id": job_id,
        "run_id": run_id,
        "status": status,
        "run": run,
        "outcome": verdict_outcome,
        "reason": reason,
        "message": message,
    }


def run_message(job_id: str, run_id: str, verdict: RunVerdict) -> str:
    """
    Return the one-line summary of a completed run for logs, events and errors.

    :param job_id: the job id.
    :param run_id: the run id.
    :param verdict: the decision read from the job's statuses.
    """
    history = " -> ".join(verdict.outcome.history) or "no statuses"
    word = "completed successfully" if verdict.status == "success" else "did not succeed"
    return f"Rescale run {run_id} of job {job_id} {word}: {verdict.reason or 'no reason given'} (job statuses: {history})"


# ----- following a file of a run in progress ------------------------------------------------------


def fresh_lines(previous: Sequence[str], current: Sequence[str]) -> tuple[list[str], bool]:
    """
    Return the lines of ``current`` not already shown in ``previous``, and whether some were missed.

    Both are the last lines of the same growing file, read at two moments. The longest suffix of
    ``previous`` that is also a prefix of ``current`` is what both tails share; what follows it is
    new. No overlap at all means more lines were appended than one tail returns (or the file was
    rewritten): every line of ``current`` is new, and some lines between the two tails were missed.

    :param previous: the tail shown last time (empty at first).
    :param current: the tail just read.
    """
    previous, current = list(previous), list(current)
    if not previous:
        return current, False
    for overlap in range(min(len(previous), len(current)), 0, -1):
        if previous[-overlap:] == current[:overlap]:
            return current[overlap:], False
    return current, bool(current)


@dataclass
class TailFollower:
    """
    Remember what was shown of a growing file, so each new line is logged once.

    :param path: the file's path in the run's working folder (as ``directory-contents`` lists it).
    :param lines: how many lines each tail asks for.
    """

    path: str
    lines: int = 100
    found: bool = False
    shown: list[str] = field(default_factory=list)

    def take(self, current: Sequence[str]) -> tuple[list[str], bool]:
        """
        Return the new lines of a fresh tail (and whether some were missed), remembering it.

        :param current: the tail just read.
        """
        new, gap = fresh_lines(self.shown, current)
        self.shown = list(current)
        return new, gap


def tail_is_over(exc: HpcApiError) -> bool:
    """
    Tell whether a failed tail or listing only means the file or the run's working folder is gone.

    ``directory-contents`` and ``tail`` answer 400 once the run is no longer in progress and 404 for
    a file that does not exist (yet): neither is worth a warning.

    :param exc: the error of the tail or listing request.
    """
    return exc.status in (400, 404)


# ----- the triggers -------------------------------------------------------------------------------


class _RescalePollingTrigger(PollingTrigger):
    """
    What both Rescale triggers share: the run they poll, its hook, and the ``carry`` they hand back.

    :param job_id: the Rescale job id.
    :param run_id: the run id within the job.
    :param rescale_conn_id: the Airflow connection id.
    :param poll_interval: seconds between polls at first and after each change.
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param deadline: epoch seconds after which a ``timeout`` event fires (``None``: wait forever).
    :param max_poll_failures: consecutive failed polls tolerated (after the transport's own retries).
    :param retry: the transport's retry policy as plain numbers (:meth:`RetryPolicy.to_dict`).
    :param carry: plain values the deferring task needs back, returned as the event's ``carry``.
        The task's own ``defer(kwargs=...)`` are not enough: ``airflow dags test`` drops them when
        it resumes a task, so a task that must behave the same under test keeps its state here.
    :param end_from_trigger: end the task in the triggerer when the wait ends well (see
        :class:`PollingTrigger`).
    :param first_poll_at: epoch seconds before which the trigger does not poll (``None``: at once).
    """

    def __init__(
        self,
        *,
        job_id: str,
        run_id: str,
        rescale_conn_id: str = RescaleHook.default_conn_name,
        poll_interval: float = 30.0,
        max_poll_interval: float = 300.0,
        deadline: float | None = None,
        max_poll_failures: int = 5,
        retry: Mapping[str, Any] | None = None,
        carry: Mapping[str, Any] | None = None,
        end_from_trigger: bool = False,
        first_poll_at: float | None = None,
    ) -> None:
        super().__init__(
            conn_id=rescale_conn_id,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            deadline=deadline,
            max_poll_failures=max_poll_failures,
            retry=retry,
            end_from_trigger=end_from_trigger,
            first_poll_at=first_poll_at,
        )
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
    :func:`judge_completed_run`), ``timeout`` (the deadline passed while the run was going) or
    ``error`` (polling failed ``max_poll_failures`` times in a row, or Rescale refused a request);
    ``run`` is :meth:`RescaleRun.to_dict` of the last run read (or ``None``), ``outcome`` the job
    outcome (or ``None``).

    While the run is in progress, new lines of ``tail_path`` (found through ``directory-contents``,
    read with ``tail``) go to the task log, each line once. When the user kills the task while it
    is deferred, :meth:`on_kill` stops the run (unless ``cancel_on_kill`` is off); a triggerer
    restart or a timeout never stops it.

    :param job_id: the Rescale job id.
    :param run_id: the run id within the job.
    :param rescale_conn_id: the Airflow connection id.
    :param poll_interval: seconds between polls at first and after each change.
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param deadline: epoch seconds after which a ``timeout`` event fires (``None``: wait forever).
    :param max_poll_failures: consecutive failed polls tolerated (after the transport's own retries).
    :param retry: the transport's retry policy as plain numbers (:meth:`RetryPolicy.to_dict`).
    :param carry: plain values the deferring task needs back, returned as the event's ``carry``.
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
            if self._tail and self._tail.found:
                # The last lines written before completion: the file may still be readable once.
                await self._follow_tail()
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
        (self.log.info if verdict.status == "success" else self.log.warning)("%s", message)
        return self._event(verdict.status, message, outcome=verdict.outcome, reason=verdict.reason), changed

    def _note_run(self, run: RescaleRun) -> bool:
        """Remember the run just read; log and return whether it moved (started, completed)."""
        before = self._run
        self._run = run
        moved = before is None or (before.date_started, before.date_completed) != (run.date_started, run.date_completed)
        if moved:
            state = "completed" if run.is_completed else "running" if run.date_started else "waiting to start"
            self.log.info("Rescale run %s of job %s is %s", self.run_id, self.job_id, state)
        return moved

    async def _follow_tail(self) -> int:
        """Log the lines of ``tail_path`` written since the last poll; return how many were shown."""
        tail = self._tail
        assert tail is not None
        try:
            if not tail.found:
                entries = await self.hook.a_get_directory_contents(self.job_id, self.run_id)
                tail.found = any(entry.path == tail.path for entry in entries)
                if not tail.found:
                    return 0
            current = await self.hook.a_tail(self.job_id, self.run_id, tail.path, tail.lines)
        except HpcApiError as exc:
            # Following the file is a courtesy: it never fails the wait.
            if not tail_is_over(exc):
                self.log.warning("Could not tail %s of run %s: %s", tail.path, self.run_id, exc)
            return 0
        new, gap = tail.take(current)
        if gap:
            self.log.info("[%s] ... (more than %d lines since the last poll; some were skipped)", tail.path, tail.lines)
        for line in new:
            self.log.info("[%s] %s", tail.path, line)
        return len(new)

    def _event(
        self, status: str, message: str, *, outcome: JobOutcome | None = None, reason: str | None = None
    ) -> dict[str, Any]:
        return {
            "status": status,
            "job_id": self.job_id,
            "run_id": self.run_id,
            "run": self._run.to_dict() if self._run else None,
            "outcome": outcome_to_dict(outcome) if outcome else None,
            "reason": reason,
            "message": message,
            "carry": self.carry,
        }

    def task_result(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The sensor's XCom value for a run that succeeded, else ``None``."""
        if payload.get("status") != "success":
            return None
        return run_result(self.job_id, self.run_id, payload.get("run"), payload.get("outcome"), "success",
                          payload.get("reason"), str(payload.get("message")))

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
        if not self.cancel_on_kill:
            self.log.info(
                "The task was killed; run %s of Rescale job %s keeps going (cancel_on_kill is off)",
                self.run_id, self.job_id,
            )
            return
        self.log.info("The task was killed: stopping run %s of Rescale job %s", self.run_id, self.job_id)
        try:
            # Airflow bounds on_kill too ([triggerer] on_kill_timeout); this bound comes first so
            # the log says what happened instead of a bare cancellation.
            await asyncio.wait_for(self.hook.a_stop_run(self.job_id, self.run_id), timeout=ON_KILL_TIMEOUT)
        except HpcApiError as exc:
            self.log.warning("Could not stop run %s of Rescale job %s: %s", self.run_id, self.job_id, exc)
        except asyncio.TimeoutError:
            self.log.warning(
                "Could not stop run %s of Rescale job %s within %.0f s; stop it on the platform",
                self.run_id, self.job_id, ON_KILL_TIMEOUT,
            )


class RescaleSnapshotTrigger(_RescalePollingTrigger):
    """
    Poll a run's output files until a snapshot taken after ``known_file_ids`` were listed appears.

    A snapshot "is uploaded to Rescale Cloud Storage and is made available as a run output file",
    under a file id nobody knows in advance (the snapshot request answers the *previous* snapshot's
    id). The new snapshot is thus the output file that was not listed before the request: when
    several new files appear (the run completed meanwhile and uploaded all its outputs), the one
    whose name says ``snapshot`` and was uploaded last.

    The event payload is ``{"status", "job_id", "run_id", "file", "message", "carry"}``: ``status``
    is ``success`` (``file`` is :meth:`OutputFile.to_dict`), ``timeout`` or ``error``.

    :param job_id: the Rescale job id.
    :param run_id: the run id within the job.
    :param known_file_ids: the ids of the run's output files listed before the snapshot request.
    :param rescale_conn_id: the Airflow connection id.
    :param poll_interval: seconds between polls at first and after each change.
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param deadline: epoch seconds after which a ``timeout`` event fires (``None``: wait forever).
    :param max_poll_failures: consecutive failed polls tolerated (after the transport's own retries).
    :param retry: the transport's retry policy as plain numbers (:meth:`RetryPolicy.to_dict`).
    :param carry: plain values the deferring task needs back, returned as the event's ``carry``.
    """

    def __init__(self, *, known_file_ids: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.known_file_ids = [str(i) for i in known_file_ids]

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the plain keyword arguments that rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {**self._common_kwargs(), "known_file_ids": list(self.known_file_ids)},
        )

    async def _poll(self) -> tuple[dict[str, Any] | None, bool]:
        files = await self.hook.a_list_output_files(self.job_id, self.run_id)
        snapshot = pick_new_snapshot(files, self.known_file_ids)
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


def pick_new_snapshot(files: Sequence[OutputFile], known_file_ids: Sequence[str]) -> OutputFile | None:
    """
    Return the output file that is the new snapshot, or ``None`` while it has not appeared.

    :param files: the run's output files now.
    :param known_file_ids: the ids listed before the snapshot was requested.
    """
    known = set(known_file_ids)
    new = [f for f in files if f.id not in known and f.is_uploaded]
    if len(new) <= 1:
        return new[0] if new else None
    named = [f for f in new if "snapshot" in f.relative_path.lower()] or new
    return max(named, key=lambda f: f.date_uploaded or "")
