"""
RescaleJobTrigger: wait in the triggerer, without blocking, until every run of a Rescale job completed.

The job is judged as :class:`~airflow_provider_hpc.triggers.rescale.RescaleRunTrigger` judges one
run: once every run has completed, the job's statuses sorted by date decide (a ``Stopping`` on the
way or a failure reason is a failure), waiting up to ``outcome_wait`` for the job's own
``Completed``. Kwargs are plain values only: ids, numbers, flags, never the API key.
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any

from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.models.rescale import RescaleRun
from airflow_provider_hpc.models.rescale_state import (
    MAX_TAIL_LINES,
    job_message,
    job_result,
    judge_completed_run,
)
from airflow_provider_hpc.models.rescale_tail import TailFollower
from airflow_provider_hpc.triggers._polling import PollingTrigger
from airflow_provider_hpc.triggers.rescale import finish_tail, follow_tail, stop_when_killed

#: The most runs of one job a wait follows (a larger job fails the wait, saying so).
MAX_JOB_RUNS = 1000


class RescaleJobTrigger(PollingTrigger):
    """
    Poll a Rescale job until every run has completed and the job's statuses say how; fire one event.

    The event payload is :func:`~airflow_provider_hpc.models.rescale_state.job_result`:
    ``{"job_id", "run_ids", "status", "outcome", "reason", "message"}``, ``status`` being
    ``success``, ``failed``, ``timeout`` or ``error``. While runs are in progress, new lines of
    ``tail_path`` in the first run still going go to the task log; when that run completes, the
    lines its last tail missed are read from its output file. When the user kills the
    deferred task, :meth:`on_kill` stops the whole job (unless ``cancel_on_kill`` is off); a
    triggerer restart or a timeout never stops it.

    :param job_id: the Rescale job id.
    :param rescale_conn_id: the Airflow connection id.
    :param poll_interval: seconds between polls at first and after each change.
    :param outcome_wait: seconds to wait, once every run completed, for the job's ``Completed`` status.
    :param tail_path: a file of the running run's working folder to follow into the task log.
    :param tail_lines: how many lines each tail reads.
    :param cancel_on_kill: stop the job when the user kills the deferred task.
    :param polling: the loop's other settings (``max_poll_interval``, ``deadline``,
        ``max_poll_failures``, ``retry``, ``first_poll_at``, see :class:`PollingTrigger`).
    """

    def __init__(
        self,
        *,
        job_id: str,
        rescale_conn_id: str = RescaleHook.default_conn_name,
        poll_interval: float = 30.0,
        outcome_wait: float = 60.0,
        tail_path: str | None = None,
        tail_lines: int = 100,
        cancel_on_kill: bool = True,
        **polling: Any,
    ) -> None:
        super().__init__(conn_id=rescale_conn_id, poll_interval=poll_interval, **polling)
        self.job_id = str(job_id)
        self.rescale_conn_id = rescale_conn_id
        self.outcome_wait = float(outcome_wait)
        self.tail_path = tail_path or None
        self.tail_lines = max(1, min(int(tail_lines), MAX_TAIL_LINES))
        self.cancel_on_kill = bool(cancel_on_kill)
        self._runs: list[RescaleRun] = []
        self._completed_seen_at: float | None = None
        self._tail: TailFollower | None = None
        self._tail_run: str | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the plain keyword arguments that rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "rescale_conn_id": self.rescale_conn_id,
                **self._polling_kwargs(),
                "outcome_wait": self.outcome_wait,
                "tail_path": self.tail_path,
                "tail_lines": self.tail_lines,
                "cancel_on_kill": self.cancel_on_kill,
            },
        )

    @cached_property
    def hook(self) -> RescaleHook:
        """The hook (one per trigger instance; ``on_kill`` reuses the one ``run`` used)."""
        return RescaleHook(self.rescale_conn_id, retry=self.retry_policy)

    @property
    def subject(self) -> str:
        """The job waited on, for log lines and messages."""
        return f"Rescale job {self.job_id}"

    async def _poll(self) -> tuple[dict[str, Any] | None, bool]:
        runs = await self.hook.a_list_runs(self.job_id, limit=MAX_JOB_RUNS + 1)
        if len(runs) > MAX_JOB_RUNS:
            return self._error(f"{self.subject} has more than {MAX_JOB_RUNS} runs: too many to wait on in one task"), False
        changed = self._note_runs(runs)
        going = [run for run in runs if not run.is_completed]
        if self.tail_path and self._tail is None and runs and not going:
            # Completed before any poll saw it going: its output file still shows the followed file once.
            self._tail, self._tail_run = TailFollower(str(self.tail_path), self.tail_lines), runs[0].id
        if self._tail is not None and not self._tail.finished and self._tail_run not in {run.id for run in going}:
            # The followed run completed: the lines its last tail missed are in its output file.
            changed = await finish_tail(self._tail, self.hook, self.job_id, str(self._tail_run), self.log) > 0 or changed
        if going or not runs:
            shown = await self._follow_tail(going[0]) if going and self.tail_path else 0
            return None, changed or shown > 0
        if self._completed_seen_at is None:
            self._completed_seen_at = time.monotonic()
        verdict = judge_completed_run(
            await self.hook.a_get_job_statuses(self.job_id),
            accept_any_completion=False,
            waited_for_job=time.monotonic() - self._completed_seen_at,
            outcome_wait=self.outcome_wait,
        )
        if verdict is None:
            return None, changed
        message = job_message(self.job_id, len(runs), verdict)
        (self.log.info if verdict.is_successful else self.log.warning)("%s", message)
        return self._event(verdict.status, message, verdict), changed

    def _note_runs(self, runs: list[RescaleRun]) -> bool:
        """Remember the runs just read; log and return whether any moved (appeared, started, completed)."""
        before = {run.id: (run.date_started, run.date_completed) for run in self._runs}
        self._runs = runs
        now = {run.id: (run.date_started, run.date_completed) for run in runs}
        if now == before:
            return False
        done = sum(1 for run in runs if run.is_completed)
        self.log.info("%s: %d of %d runs completed", self.subject, done, len(runs))
        return True

    async def _follow_tail(self, run: RescaleRun) -> int:
        """Log the new lines of ``tail_path`` in ``run``; return how many were shown."""
        if self._tail is None or self._tail_run != run.id:
            self._tail, self._tail_run = TailFollower(str(self.tail_path), self.tail_lines), run.id
        return await follow_tail(self._tail, self.hook, self.job_id, run.id, self.log)

    def _event(self, status: str, message: str, verdict: Any = None) -> dict[str, Any]:
        return job_result(self.job_id, [run.id for run in self._runs], status, message, verdict=verdict)

    def _error(self, message: str) -> dict[str, Any]:
        return self._event("error", message)

    def _timeout(self) -> dict[str, Any]:
        done = sum(1 for run in self._runs if run.is_completed)
        return self._event(
            "timeout",
            f"Timed out waiting for {self.subject} ({done} of {len(self._runs)} runs completed); the job was not stopped",
        )

    async def on_kill(self) -> None:
        """Stop the job: the user killed the deferred task (mark failed/success, clear)."""
        await stop_when_killed(self, lambda: self.hook.a_stop_job(self.job_id), cancel=self.cancel_on_kill)
