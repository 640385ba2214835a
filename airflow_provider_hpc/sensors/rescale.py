"""RescaleRunSensor: wait until a run of a Rescale job has completed, in the triggerer by default."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowSensorTimeout

from airflow_provider_hpc.durable import TaskState
from airflow_provider_hpc.exceptions import HpcApiError, RescaleApiError, RescaleRunFailed
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.links.rescale import RescaleJobLink
from airflow_provider_hpc.models.rescale import MAX_FOLLOWED_FILE_BYTES, RescaleRun
from airflow_provider_hpc.models.rescale_state import (
    MAX_TAIL_LINES,
    RescaleRunState,
    RunVerdict,
    judge_completed_run,
    run_message,
    run_result,
    run_result_of,
)
from airflow_provider_hpc.models.rescale_tail import TailFollower
from airflow_provider_hpc.settings import default_deferrable
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.triggers._polling import deadline_from_timeout, deferral_timeout, first_poll_after
from airflow_provider_hpc.triggers.rescale import RescaleRunTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The ``task_state_store`` key of when the run was first seen completed (reschedule mode).
COMPLETED_STATE_KEY = "rescale_completed_seen"


class RescaleRunSensor(BaseSensorOperator):
    """
    Wait until a Rescale run has completed (``dateCompleted`` set) and tell success from failure.

    Success is read from the job's statuses sorted by date: a ``Stopping``/``Stopped`` on the way or
    a failure ``statusReason`` (``Exceeded max number of restarts``...) fails the task with
    :class:`RescaleRunFailed`, unless ``accept_any_completion``. The XCom value is
    ``{"job_id", "run_id", "status", "run", "outcome", "reason", "message"}`` (``run`` is
    :meth:`RescaleRun.to_dict`, ``outcome`` ``{"completed", "succeeded", "reason", "history"}``).

    Deferrable by default (see :func:`default_deferrable`): the wait runs in the triggerer
    (:class:`RescaleRunTrigger`) and frees the worker slot. With ``tail_path``, the new lines of that
    file of the run's working folder are written to the task log while the run is in progress, and
    the lines the last tail missed are read from the run's output file once it completed.
    When the task is killed (marked failed or success, or cleared), the run is
    stopped, unless ``cancel_on_kill=False``.

    :param job_id: the Rescale job id (templated).
    :param run_id: the run id within the job (templated).
    :param rescale_conn_id: the Airflow connection id.
    :param poll_interval: seconds between polls at first and after each change.
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param timeout: seconds to wait in all before failing with ``AirflowSensorTimeout``.
    :param accept_any_completion: succeed on any completion, a stopped or failed run included.
    :param outcome_wait: seconds to wait, once the run completed, for the job's ``Completed`` status.
    :param tail_path: a file of the run's working folder to follow into the task log (templated).
    :param tail_lines: how many lines each tail reads; more than the file grows between two polls.
    :param cancel_on_kill: stop the run when the task is killed.
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param max_poll_failures: consecutive failed polls tolerated in the triggerer.
    :param retry: the HTTP retry policy (default: the connection's).
    :param end_from_trigger: in deferrable mode, when the run succeeds, end the task in the triggerer
        with the same XCom value, without starting it again on a worker (a failure, a timeout or an
        error still resumes the task, which raises as usual and is retried as usual).
    """

    template_fields: Sequence[str] = ("job_id", "run_id", "tail_path")
    operator_extra_links = (RescaleJobLink(),)
    ui_color = "#d8e8f5"

    def __init__(
        self,
        *,
        job_id: str,
        run_id: str,
        rescale_conn_id: str = RescaleHook.default_conn_name,
        poll_interval: float = 30.0,
        max_poll_interval: float = 300.0,
        accept_any_completion: bool = False,
        outcome_wait: float = 60.0,
        tail_path: str | None = None,
        tail_lines: int = 100,
        cancel_on_kill: bool = True,
        deferrable: bool | None = None,
        max_poll_failures: int = 5,
        retry: RetryPolicy | None = None,
        end_from_trigger: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        super().__init__(**kwargs)
        self.job_id = job_id
        self.run_id = run_id
        self.rescale_conn_id = rescale_conn_id
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.accept_any_completion = accept_any_completion
        self.outcome_wait = float(outcome_wait)
        self.tail_path = tail_path
        self.tail_lines = max(1, min(int(tail_lines), MAX_TAIL_LINES))
        self.cancel_on_kill = cancel_on_kill
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self.max_poll_failures = max_poll_failures
        self.retry = retry
        self.end_from_trigger = end_from_trigger
        self._tail: TailFollower | None = None
        self._completed_seen_at: float | None = None
        self._first_saw_completion = False
        self._watching = False
        self._last_state: str | None = None

    @cached_property
    def hook(self) -> RescaleHook:
        """The Rescale hook of this task."""
        return RescaleHook(self.rescale_conn_id, retry=self.retry)

    def execute(self, context: Context) -> Any:
        """Show the job's link, then wait: one poll here, the rest in the triggerer or in poke mode."""
        RescaleJobLink.persist(context, hook=self.hook, job_id=self.job_id)
        if not self.deferrable:
            return super().execute(context)
        # Completed already, the run's output file shows the followed file once (no trigger will).
        done = self._check(context, follow_tail=False, finish_tail=True)
        if done:
            return done.xcom_value if isinstance(done, PokeReturnValue) else None
        self.defer(
            trigger=self.make_trigger(),
            method_name="execute_complete",
            timeout=deferral_timeout(self.timeout),
        )

    def make_trigger(self) -> RescaleRunTrigger:
        """Return the trigger that waits for this run (plain values only, no secret)."""
        return RescaleRunTrigger(
            job_id=self.job_id,
            run_id=self.run_id,
            rescale_conn_id=self.rescale_conn_id,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            deadline=deadline_from_timeout(self.timeout),
            max_poll_failures=self.max_poll_failures,
            retry=self.retry.to_dict() if self.retry else None,
            accept_any_completion=self.accept_any_completion,
            outcome_wait=self.outcome_wait,
            tail_path=self.tail_path,
            tail_lines=self.tail_lines,
            cancel_on_kill=self.cancel_on_kill,
            end_from_trigger=self.end_from_trigger,
            first_poll_at=first_poll_after(self.poll_interval),  # execute has just read the run
        )

    def poke(self, context: Context) -> bool | PokeReturnValue:
        """
        Read the run once: ``False`` while it goes on (new tail lines logged), its result once completed.

        :param context: the running task's context.
        """
        return self._check(context, follow_tail=True, finish_tail=True)

    def _check(self, context: Context, *, follow_tail: bool, finish_tail: bool = False) -> bool | PokeReturnValue:
        """
        Read the run once; follow ``tail_path`` while it runs, and show its last lines once it completed, when asked.

        Before deferring, the tail is left to the trigger: a line logged here would be logged again
        by the trigger's first tail, which starts from nothing; after the trigger, its lines were shown.
        """
        run = self.hook.get_run(self.job_id, self.run_id)
        if not run.is_completed:
            self._watching = True
            if follow_tail:
                self._follow_tail()
            state = RescaleRunState.of(run).life_cycle
            if state != self._last_state:
                self.log.info("Run %s of Rescale job %s is %s", self.run_id, self.job_id, state)
                self._last_state = state
            return False
        self._watching = False
        waited = self._completed_since(context)
        if finish_tail and self._first_saw_completion:
            self._finish_tail()
        verdict = judge_completed_run(
            self.hook.get_job_statuses(self.job_id),
            accept_any_completion=self.accept_any_completion,
            waited_for_job=waited,
            outcome_wait=self.outcome_wait,
        )
        if verdict is None:
            self.log.info("Run %s completed; waiting for job %s to report its final status", self.run_id, self.job_id)
            return False
        return PokeReturnValue(True, self._verdict_result(run, verdict))

    def _completed_since(self, context: Context) -> float:
        """
        Return the seconds since this task first saw the run completed.

        Kept in ``task_state_store`` too: in ``mode="reschedule"`` every poke is a new instance, and
        ``outcome_wait`` must elapse across them, not start again at each.
        """
        now = time.time()
        if self._completed_seen_at is None:
            state = TaskState(context, COMPLETED_STATE_KEY, self.log)
            entry = state.get()
            seen = entry.get("at") if entry and entry.get("run") == [str(self.job_id), str(self.run_id)] else None
            if isinstance(seen, (int, float)) and state.same_cycle(entry):
                self._completed_seen_at = float(seen)
            else:
                # This look is the first to see it completed (in reschedule mode too): the output
                # file's last lines are shown now, and by no later poke.
                self._first_saw_completion = True
                self._completed_seen_at = now
                state.set(
                    {"run": [str(self.job_id), str(self.run_id)], "at": now},
                    what=f"when run {self.run_id} of Rescale job {self.job_id} was seen completed",
                )
        return max(0.0, now - self._completed_seen_at)

    def _verdict_result(self, run: RescaleRun, verdict: RunVerdict) -> dict[str, Any]:
        message = run_message(self.job_id, self.run_id, verdict)
        if not verdict.is_successful:
            raise RescaleRunFailed(message)
        self.log.info("%s", message)
        return run_result(self.job_id, self.run_id, verdict.status, message, run=run.to_dict(), verdict=verdict)

    def _follow_tail(self) -> None:
        if not self.tail_path:
            return
        tail = self._tail = self._tail or TailFollower(self.tail_path, self.tail_lines)
        try:
            if not tail.found:
                entries = self.hook.get_directory_contents(self.job_id, self.run_id)
                if not tail.spot([entry.path for entry in entries]):
                    return
            tail.show(self.hook.tail(self.job_id, self.run_id, tail.path, tail.lines), self.log)
        except HpcApiError as exc:
            tail.note_failure(exc, self.run_id, self.log)

    def _finish_tail(self) -> None:
        """Log the lines of ``tail_path`` the tail missed, from the completed run's output file (once)."""
        if not self.tail_path:
            return
        tail = self._tail = self._tail or TailFollower(self.tail_path, self.tail_lines)
        if tail.finished:
            return
        tail.finished = True
        try:
            file = self.hook.find_output_file(self.job_id, self.run_id, tail.path)
            if tail.pick_output(file, self.run_id, self.log):
                assert file is not None
                tail.show_rest(self.hook.read_output_file(file, max_bytes=MAX_FOLLOWED_FILE_BYTES), self.run_id, self.log)
        except HpcApiError as exc:
            self.log.warning("Could not read the output file %s of run %s for its last lines: %s", tail.path, self.run_id, exc)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """
        Turn the trigger's event into the task's result or error (safe to call twice with one event).

        :param context: the running task's context.
        :param event: the :class:`RescaleRunTrigger` event payload.
        """
        if not isinstance(event, dict):
            # A trigger that ended the task itself (end_from_trigger) sends no payload, and
            # `airflow dags test` resumes the task all the same: read the run once more.
            done = self._check(context, follow_tail=False)
            if isinstance(done, PokeReturnValue):
                return done.xcom_value
            raise RescaleApiError(f"Run {self.run_id} of Rescale job {self.job_id} has not completed after all")
        status = event.get("status")
        message = str(event.get("message") or f"Rescale run {self.run_id} of job {self.job_id}: {status}")
        if status == "success":
            self.log.info("%s", message)
            return run_result_of(event)
        if status == "failed":
            raise RescaleRunFailed(message)
        if status == "timeout":
            raise AirflowSensorTimeout(message)
        raise RescaleApiError(message)

    def on_kill(self) -> None:
        """Stop the run when the task is killed while this worker is waiting on it (poke mode)."""
        if not self.cancel_on_kill or not self._watching:
            return
        self.log.info("The task was killed: stopping run %s of Rescale job %s", self.run_id, self.job_id)
        try:
            self.hook.stop_run(self.job_id, self.run_id)
        except HpcApiError as exc:
            self.log.warning("Could not stop run %s of Rescale job %s: %s", self.run_id, self.job_id, exc)
