"""RescaleSubmitJobOperator: upload inputs, create and submit a Rescale job, wait for every run, durably."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, ObjectStoragePath

from airflow_provider_hpc.durable import TaskState, fingerprint
from airflow_provider_hpc.exceptions import HpcApiError, JobTimeout, RescaleApiError, RescaleRunFailed
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.lineage import LineageMixin, LineageRecord
from airflow_provider_hpc.links.rescale import RescaleJobLink
from airflow_provider_hpc.models.rescale import JobOutcome
from airflow_provider_hpc.settings import default_deferrable
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.triggers._polling import deadline_from_timeout, deferral_timeout, first_poll_after, wait_in_worker
from airflow_provider_hpc.triggers.rescale_job import RescaleJobTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

#: The XCom key the job id is pushed under as soon as the job exists (before any wait).
JOB_ID_XCOM_KEY = "job_id"
#: The ``task_state_store`` key of the job: its name, id, whether it was submitted, what was asked.
JOB_STATE_KEY = "rescale_job"
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._:@=+-]+")


class RescaleSubmitJobOperator(LineageMixin, BaseOperator):
    """
    Start a Rescale job and wait, without holding a worker slot, until every run of it completed.

    The inputs are uploaded (streamed from local paths, URLs or ``ObjectStoragePath``\\ s: a Muse
    result on S3 works), their ids added to the first analysis' ``inputFiles``, the job created
    (``POST /api/v2/jobs/``) and submitted. The job is kept in ``task_state_store`` from the moment
    it exists, so a retry re-attaches to a running job, returns a finished job's outcome, submits a
    job that was created but never submitted, and creates a new one only after a failure or when
    the body or inputs changed. The job's name carries the task instance (DAG, run, task, map
    index), so a retry finds a job whose create answer was lost.

    The job id is also pushed on its own, under the XCom key ``job_id``, as soon as the job is
    submitted: ``task.output["job_id"]`` hands it to the next tasks. The XCom value is ``{"job_id", "run_ids", "status", "outcome", "reason", "message"}`` (see
    ``docs/results.md``). A failed job raises :class:`RescaleRunFailed`. Killing the task stops the
    job (``cancel_on_kill``); a timeout or a triggerer restart never does.

    :param job: the job body as Rescale's API reference gives it: ``name``, ``jobanalyses`` with
        ``analysis`` ``{code, version}``, ``command``, ``hardware``, ``inputFiles``, ``envVars``
        (templated).
    :param input_files: files to upload and give to the first analysis (templated).
    :param rescale_conn_id: the Airflow connection id.
    :param wait_for_completion: wait until every run completed (``False``: return once the job is
        submitted, with ``status`` ``"submitted"``, for tasks that follow the run themselves).
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param poll_interval: seconds between polls at first and after each change.
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param timeout: seconds to wait for the job in all before failing with :class:`JobTimeout`.
    :param outcome_wait: seconds to wait, once every run completed, for the job's ``Completed`` status.
    :param tail_path: a file of the running run's working folder to follow into the task log (templated).
    :param tail_lines: how many lines each tail reads.
    :param cancel_on_kill: stop the job when the task is killed.
    :param durable: keep the job in ``task_state_store`` (``False``: every try starts a new job).
    :param max_poll_failures: consecutive failed polls tolerated.
    :param retry: the HTTP retry policy (default: the connection's).
    """

    template_fields: Sequence[str] = ("job", "input_files", "tail_path")
    template_fields_renderers = {"job": "json"}
    operator_extra_links = (RescaleJobLink(),)
    ui_color = "#d8e8f5"

    def __init__(
        self,
        *,
        job: Mapping[str, Any],
        input_files: Sequence[str | ObjectStoragePath] = (),
        rescale_conn_id: str = RescaleHook.default_conn_name,
        wait_for_completion: bool = True,
        deferrable: bool | None = None,
        poll_interval: float = 30.0,
        max_poll_interval: float = 300.0,
        timeout: float = 7 * 24 * 3600.0,
        outcome_wait: float = 60.0,
        tail_path: str | None = None,
        tail_lines: int = 100,
        cancel_on_kill: bool = True,
        durable: bool = True,
        max_poll_failures: int = 5,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.input_files = input_files
        self.rescale_conn_id = rescale_conn_id
        self.wait_for_completion = wait_for_completion
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.wait_timeout = float(timeout)
        self.outcome_wait = float(outcome_wait)
        self.tail_path = tail_path
        self.tail_lines = tail_lines
        self.cancel_on_kill = cancel_on_kill
        self.durable = durable
        self.max_poll_failures = max_poll_failures
        self.retry = retry
        self._job_id: str | None = None
        self._waiting_here = False

    @cached_property
    def hook(self) -> RescaleHook:
        """The Rescale hook of this task."""
        return RescaleHook(self.rescale_conn_id, retry=self.retry)

    # ----- execute ------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        """Start the job (or re-attach to the previous try's), then wait for every run of it."""
        body = self._checked_body()
        self._record_lineage(None)
        state = TaskState(context, JOB_STATE_KEY, self.log, durable=self.durable)
        asked = fingerprint(job=body, inputs=[str(f) for f in self.input_files or ()])
        job_id = self._resume(state, asked) or self._start(state, body, asked, _job_name(body, context))
        self._job_id = job_id
        self._record_lineage(job_id)
        context["ti"].xcom_push(key=JOB_ID_XCOM_KEY, value=job_id)
        RescaleJobLink.persist(context, hook=self.hook, job_id=job_id)
        if not self.wait_for_completion:
            return self._submitted(context, state, job_id)
        trigger = self._trigger(job_id)
        if self.deferrable:
            self.defer(trigger=trigger, method_name="execute_complete", timeout=deferral_timeout(self.wait_timeout))
        self._waiting_here = True
        try:
            return self.execute_complete(context, wait_in_worker(trigger))
        finally:
            self._waiting_here = False

    def _checked_body(self) -> dict[str, Any]:
        """Return a copy of the job body, refusing one that cannot be right before any request."""
        if not isinstance(self.job, Mapping) or not isinstance(self.job.get("name"), str) or not self.job["name"].strip():
            raise RescaleApiError("The job body needs a non-empty name")
        analyses = self.job.get("jobanalyses")
        if not isinstance(analyses, list) or not analyses or not all(isinstance(a, Mapping) for a in analyses):
            raise RescaleApiError("The job body needs a non-empty jobanalyses list of objects")
        return copy.deepcopy(dict(self.job))

    def _record_lineage(self, job_id: str | None) -> None:
        """Note the inputs, and the job once it exists, for the task's OpenLineage event."""
        analyses = self.job.get("jobanalyses") if isinstance(self.job, Mapping) else None
        first = analyses[0] if isinstance(analyses, list) and analyses and isinstance(analyses[0], Mapping) else {}
        analysis = first.get("analysis") if isinstance(first.get("analysis"), Mapping) else {}
        self.lineage = LineageRecord(
            "rescale",
            job_id=job_id,
            url=self.hook.job_url(job_id) if job_id else None,
            software=str(analysis.get("code")) if analysis.get("code") else None,
            inputs=[str(f) for f in self.input_files or ()],
        )

    def _trigger(self, job_id: str) -> RescaleJobTrigger:
        return RescaleJobTrigger(
            job_id=job_id,
            rescale_conn_id=self.rescale_conn_id,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            deadline=deadline_from_timeout(self.wait_timeout),
            max_poll_failures=self.max_poll_failures,
            retry=self.retry.to_dict() if self.retry else None,
            outcome_wait=self.outcome_wait,
            tail_path=self.tail_path,
            tail_lines=self.tail_lines,
            cancel_on_kill=self.cancel_on_kill,
            first_poll_at=first_poll_after(self.poll_interval),  # the task has just submitted or looked
        )

    # ----- durability ---------------------------------------------------------------------------

    def _start(self, state: TaskState, body: dict[str, Any], asked: str, name: str) -> str:
        """Upload the inputs, create the job under the task's own name, submit it; keep each step."""
        uploaded = [self.hook.upload_file(source) for source in self.input_files or ()]
        first = dict(body["jobanalyses"][0])
        first["inputFiles"] = [*(first.get("inputFiles") or []), *({"id": f.id} for f in uploaded)]
        body = {**body, "name": name, "jobanalyses": [first, *body["jobanalyses"][1:]]}
        what = f"Rescale job {name}"
        # Kept before the create: a retry whose create answer was lost looks the name up.
        state.set({"name": name, "fingerprint": asked, "job_id": None, "submitted": False}, what=what)
        job = self.hook.create_job(body)
        state.set({"name": name, "fingerprint": asked, "job_id": job.id, "submitted": False}, what=f"Rescale job {job.id}")
        return self._submit(state, job.id)

    def _submit(self, state: TaskState, job_id: str) -> str:
        """Submit a created job; one the service says was submitted already is waited on, not failed."""
        entry = state.get() or {}
        state.set({**entry, "job_id": job_id, "submitted": None}, what=f"Rescale job {job_id}")  # asked, answer unknown
        try:
            self.hook.submit_job(job_id)
        except RescaleApiError as exc:
            # Rescale refuses a second submit of a job: a previous try's submit did land after all.
            if exc.status != 400 or not statuses_show_start(self.hook.get_job_statuses(job_id)):
                raise
            self.log.info("Rescale job %s was submitted already (%s): waiting on it", job_id, exc.error or exc.status)
        state.set({**entry, "job_id": job_id, "submitted": True}, what=f"Rescale job {job_id}")
        return job_id

    def _resume(self, state: TaskState, asked: str) -> str | None:
        """Return the job a previous try of this task started and that is worth waiting on, if any."""
        entry = state.get()
        if entry is None:
            return None
        if entry.get("fingerprint") != asked:
            self.log.warning("The previous try's Rescale job was started from another body or other inputs: starting anew")
            return None
        if entry.get("collected") and not state.same_cycle(entry):
            return None  # the task was cleared: a new job is what the user asks for
        job_id = entry.get("job_id") or self._look_up(str(entry.get("name") or ""))
        if not job_id:
            return None
        statuses = self.hook.get_job_statuses(job_id)
        if entry.get("submitted") is not True and not statuses_show_start(statuses):
            # Safe even if the earlier submit landed: the service refuses a second one (see _submit).
            self.log.info("Rescale job %s was created by a previous try and not started: submitting it", job_id)
            return self._submit(state, job_id)
        outcome = JobOutcome.from_statuses(statuses)
        if outcome.completed and not outcome.succeeded:
            self.log.warning("The previous try's Rescale job %s did not succeed (%s): starting anew", job_id, outcome.reason)
            return None
        self.log.info("Re-attaching to the previous try's Rescale job %s (%s)", job_id, " -> ".join(outcome.history) or "no status yet")
        return job_id

    def _look_up(self, name: str) -> str | None:
        """Find the job a try created under ``name`` when the create answer never came back."""
        if not name:
            return None
        found = self.hook.find_jobs(name)
        if not found:
            return None
        self.log.warning("A previous try created Rescale job %s but never heard the answer: adopting it", found[0].id)
        return found[0].id

    # ----- outcomes -----------------------------------------------------------------------------

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """
        Turn the job trigger's event into the task's result or error (safe to call twice with one event).

        :param context: the running task's context.
        :param event: the :class:`RescaleJobTrigger` event payload.
        """
        status = event.get("status")
        self._record_lineage(str(event["job_id"]) if event.get("job_id") else None)
        message = str(event.get("message") or f"Rescale job {event.get('job_id')}: {status}")
        if status == "failed":
            raise RescaleRunFailed(message)
        if status == "timeout":
            raise JobTimeout(f"{message}. A retry of this task re-attaches to the same job.")
        if status != "success":
            raise RescaleApiError(message)
        self.log.info("%s", message)
        state = TaskState(context, JOB_STATE_KEY, self.log, durable=self.durable)
        entry = state.get()
        if entry is not None and entry.get("job_id") == event.get("job_id"):
            state.set({**entry, "collected": True}, what=f"Rescale job {event.get('job_id')}")
        self._announce(context, event)
        return dict(event)

    def _submitted(self, context: Context, state: TaskState, job_id: str) -> dict[str, Any]:
        """Return the started job without waiting for it (``wait_for_completion=False``)."""
        run_ids = [run.id for run in self.hook.list_runs(job_id)]
        outcome = JobOutcome.from_statuses(self.hook.get_job_statuses(job_id))
        entry = state.get()
        if entry is not None:
            # Done with the job: a retry of the next task does not start another; a clear does.
            state.set({**entry, "collected": True}, what=f"Rescale job {job_id}")
        value = {
            "job_id": job_id,
            "run_ids": run_ids,
            "status": "submitted",
            "outcome": outcome.to_dict(),
            "reason": outcome.reason,
            "message": f"Rescale job {job_id} submitted ({len(run_ids)} run(s)); not waiting for it",
        }
        self.log.info("%s", value["message"])
        self._announce(context, value)
        return value

    def _announce(self, context: Context, value: Mapping[str, Any]) -> None:
        """Attach the job's ids to every asset this task declares as an outlet."""
        events: Any = context.get("outlet_events")
        if not self.outlets or events is None:
            return
        for outlet in self.outlets:
            events[outlet].extra.update({"job_id": value.get("job_id"), "run_ids": value.get("run_ids")})

    def on_kill(self) -> None:
        """Stop the job when the task is killed while this worker waits on it (``deferrable=False``)."""
        if not self.cancel_on_kill or not self._waiting_here or not self._job_id:
            return
        self.log.info("The task was killed: stopping Rescale job %s", self._job_id)
        try:
            self.hook.stop_job(self._job_id)
        except HpcApiError as exc:
            self.log.warning("Could not stop Rescale job %s: %s", self._job_id, exc)


def statuses_show_start(statuses: Sequence[Any]) -> bool:
    """Whether a job's statuses show it was submitted (anything past ``Pending``)."""
    return any(str(getattr(s, "status", "")).lower() not in ("pending", "") for s in statuses)


def _job_name(body: Mapping[str, Any], context: Context) -> str:
    """Return the job's name followed by the task instance it belongs to (what a lost create is found by)."""
    ti: Any = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    where = f"{ti.dag_id}.{ti.task_id}{'' if map_index in (None, -1) else f'.{map_index}'}@{ti.run_id}"
    return f"{str(body['name']).strip()[:100]} [{_NAME_UNSAFE.sub('_', where)[:150]}]"
