"""Muse operators: run a software on the Muse cluster and hand its result on; fetch a known run's result."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_hpc.durable import TaskState, fingerprint
from airflow_provider_hpc.exceptions import JobTimeout, MuseApiError, MuseJobFailed
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.links.muse import MuseJobStateLink
from airflow_provider_hpc.models.muse import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_XCOM_STDOUT,
    RESULT_FILE_NAMES,
    MuseReport,
    describe_result,
    is_unknown_run,
    result_value,
)
from airflow_provider_hpc.muse_results import MuseResultMixin, store_result
from airflow_provider_hpc.settings import default_deferrable
from airflow_provider_hpc.storage import resolve_output_path
from airflow_provider_hpc.triggers._polling import deadline_from_timeout, deferral_timeout, first_poll_after, wait_in_worker
from airflow_provider_hpc.triggers.muse import MuseJobTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context, ObjectStoragePath

#: The ``task_state_store`` key holding ``{"name", "key", "state_url"}`` of the submitted run.
STATE_STORE_KEY = "muse_run"
#: The XCom key holding the submitted run's key (for a sensor or a later task to template).
KEY_XCOM_KEY = "muse_key"


def as_flag(value: bool | str | None) -> bool:
    """Read ``todownload`` as the service spells it (``yes``/``no``) or as a boolean (templates give strings)."""
    if isinstance(value, str):
        return value.strip().lower() in ("yes", "true", "1", "on", "y")
    return bool(value)


def as_seconds(value: float | timedelta | None) -> float | None:
    """Return a duration in seconds (``None`` stays ``None``)."""
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class MuseRunOperator(MuseResultMixin, BaseOperator):
    """
    Run a software on the Muse cluster, wait for it without holding a worker slot, and return its result.

    The run's key is persisted (``task_state_store``) and pushed to XCom before any wait, so a retry
    re-attaches to a run still going, returns the result of one already ``OK``, and submits anew only
    after ``NOK`` or when its inputs changed; once the result is collected the entry is marked so: a
    retry collects it again, a cleared task runs the software anew. The returned XCom value is described in ``docs/results.md``; files go
    under ``output_path``. Muse has no cancel endpoint: killing the task leaves the run going.

    :param name: the software name (e.g. ``sw_example``).
    :param cmd: the command run in the software's container (e.g. ``python /add.py 4 5``).
    :param cmd_option: options inserted as ``singularity exec {cmd_option} {image} {cmd}``.
    :param files: input files: local paths, URLs or ``ObjectStoragePath`` (a .zip is unzipped by Muse).
    :param files_order: the order in which the command gets the files (names, e.g. ``["stdin.txt"]``).
    :param returned_type: ``stdout`` (the text goes to XCom), ``stdout.txt`` or ``run.zip`` (files).
    :param todownload: ``yes``/``no`` (or a bool): Muse answers a download key, which is followed.
    :param sbatch_list: SLURM sbatch options (marked "under construction" by Muse).
    :param module_list: modules to load (marked "under construction" by Muse).
    :param output_path: the folder result files go to (default: a folder per DAG/run/task under
        ``[hpc] results_base``).
    :param extract_zip: extract ``run.zip`` safely under ``output_path/run/``.
    :param cluster: ``False`` runs off-cluster (``POST software/run/{name}/``), which answers at once.
    :param muse_conn_id: the Airflow connection of the Muse service.
    :param poll_interval: seconds between state polls, at first and after each state change.
    :param max_poll_interval: the longest wait between polls while nothing changes (backoff).
    :param timeout: give up waiting after this long (seconds or ``timedelta``); the run keeps going.
    :param deferrable: wait in the triggerer, freeing the worker slot (default ``True``, see
        :func:`~airflow_provider_hpc.settings.default_deferrable`); ``False`` waits in the worker with
        the very same polling loop.
    :param max_poll_failures: consecutive failed polls tolerated before the task fails.
    :param max_stdout_chars: the longest stdout put in XCom; a longer one goes to ``stdout.txt``.
    :param max_file_bytes: refuse a result file larger than this (default 64 GiB; ``None``: no limit).
    :param durable: keep the run's key in ``task_state_store`` so a retry re-attaches instead of
        submitting again (``False`` keeps nothing: every try submits, as in the official providers).
    """

    template_fields: Sequence[str] = (
        "name",
        "cmd",
        "cmd_option",
        "files",
        "files_order",
        "returned_type",
        "todownload",
        "sbatch_list",
        "module_list",
        "output_path",
    )
    template_fields_renderers = {"files_order": "json", "sbatch_list": "json", "module_list": "json"}
    operator_extra_links = (MuseJobStateLink(),)
    ui_color = "#d9ead3"

    def __init__(
        self,
        *,
        name: str,
        cmd: str = "",
        cmd_option: str = "",
        files: Sequence[str | ObjectStoragePath] | None = None,
        files_order: Sequence[str] | None = None,
        returned_type: str = "stdout",
        todownload: bool | str = False,
        sbatch_list: Sequence[str] | None = None,
        module_list: Sequence[str] | None = None,
        output_path: str | ObjectStoragePath | None = None,
        extract_zip: bool = False,
        cluster: bool = True,
        muse_conn_id: str = MuseHook.default_conn_name,
        poll_interval: float = 10.0,
        max_poll_interval: float = 300.0,
        timeout: float | timedelta | None = None,
        deferrable: bool | None = None,
        max_poll_failures: int = 5,
        max_stdout_chars: int = DEFAULT_MAX_XCOM_STDOUT,
        max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
        durable: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.durable = durable
        self.name = name
        self.cmd = cmd
        self.cmd_option = cmd_option
        self.files = files or []
        self.files_order = files_order
        self.returned_type = returned_type
        self.todownload = todownload
        self.sbatch_list = sbatch_list
        self.module_list = module_list
        self.output_path = output_path
        self.extract_zip = extract_zip
        self.cluster = cluster
        self.muse_conn_id = muse_conn_id
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.timeout = as_seconds(timeout)
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self.max_poll_failures = max_poll_failures
        self.max_stdout_chars = max_stdout_chars
        self.max_file_bytes = max_file_bytes
        self._key: str | None = None

    # ----- execute ------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        """Submit (or re-attach to) the run, wait for it, and return its result's XCom value."""
        if not self.cluster:
            return self._run_off_cluster(context)
        key, report = self._resume_or_submit(context)
        if report is not None and report.is_successful:
            return self._finish(context, key, report)
        trigger = self._trigger(key)
        if self.deferrable:
            self.defer(
                trigger=trigger,
                method_name="execute_complete",
                timeout=deferral_timeout(self.timeout),
            )
        # Without a triggerer, the worker runs the very same wait the trigger would.
        self.log.info("Waiting for Muse run %s/%s in the worker (deferrable=False)", self.name, key)
        return self.execute_complete(context, wait_in_worker(trigger))

    def _trigger(self, key: str) -> MuseJobTrigger:
        return MuseJobTrigger(
            muse_conn_id=self.muse_conn_id,
            name=self.name,
            key=key,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            deadline=deadline_from_timeout(self.timeout),
            max_poll_failures=self.max_poll_failures,
            first_poll_at=first_poll_after(self.poll_interval),  # the task has just submitted or looked
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """
        Finish after the trigger's event: return the result, or raise why there is none.

        Idempotent: a repeated event fetches the same result to the same place again.

        :param context: the task's context.
        :param event: the trigger's payload (``status``, ``name``, ``key``, ``report``, ``message``).
        """
        name, key = event["name"], event["key"]
        self._key = key
        self._note_run(name, key, inputs=[str(f) for f in self.files or []])
        report = MuseReport.from_dict(event["report"]) if event.get("report") else None
        status = event["status"]
        if status == "ok":
            return self._finish(context, key, report)
        if status == "nok":
            raise self._failure(context, name, key, report)
        state_url = self.hook.state_url(name, key)
        if status == "timeout":
            # A URL ends each message: the Airflow log view links a URL up to the next whitespace.
            raise JobTimeout(
                f"{event['message']} (timeout {self.timeout}s; key {key}). "
                f"A retry of this task re-attaches to the same run; state: {state_url}"
            )
        raise MuseApiError(f"{event['message']} (key {key}); state: {state_url}")

    def _finish(self, context: Context, key: str, report: MuseReport | None) -> dict[str, Any]:
        """Collect the result of a run that ended well, then mark its entry collected (see :meth:`_resume`)."""
        value = self._collect(context, self.name, key, report, self.returned_type)
        state = TaskState(context, STATE_STORE_KEY, self.log, durable=self.durable)
        entry = state.get()
        if entry is not None and entry.get("key") == key:
            # Marked, not dropped: until Airflow has stored the return value, a retry (a dead worker,
            # a failed XCom write) must find the run and collect it again instead of submitting anew.
            state.set({**entry, "collected": True}, what=f"Muse run {self.name}/{key}")
        return value

    # ----- durability ---------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        """A digest of what this task submits: a retry after its inputs changed submits anew."""
        return fingerprint(
            name=self.name, cmd=self.cmd, cmd_option=self.cmd_option, returned_type=self.returned_type,
            todownload=as_flag(self.todownload), files=[str(f) for f in self.files or []], files_order=self.files_order,
            sbatch_list=self.sbatch_list, module_list=self.module_list,
        )

    def _resume_or_submit(self, context: Context) -> tuple[str, MuseReport | None]:
        """
        Return the key to wait on: a stored run still going or already ``OK``, else a new submission.

        Follows the decisions of Airflow's ``ResumableJobMixin``: the key is persisted in
        ``task_state_store`` right after submit, before any wait or deferral, so a retry after a
        dead worker finds it and re-attaches (run still going), collects (run ``OK``) or submits
        anew (run ``NOK``, unknown to the service, or inputs changed). Once the result is collected
        the entry is marked so: a retry collects again, a cleared task runs anew.
        """
        state = TaskState(context, STATE_STORE_KEY, self.log, durable=self.durable)
        if self.durable and not state.available:
            self.log.warning("task_state_store is not available: a retry of this task cannot re-attach to its Muse run")
        submitted = self._fingerprint()
        resumed = self._resume(state, submitted, context)
        if resumed is not None:
            return resumed
        submission = self.hook.submit(
            self.name,
            cmd=self.cmd,
            cmd_option=self.cmd_option,
            returned_type=self.returned_type,
            todownload=as_flag(self.todownload),
            files=list(self.files or []),
            files_order=self.files_order,
            sbatch_list=self.sbatch_list,
            module_list=self.module_list,
        )
        self._key = submission.key
        # Before any wait: a retry must find the run even if this worker dies right now. Should the
        # store keep failing, the wait goes on anyway (the trigger's kwargs hold the key).
        state.set(
            {"name": submission.name, "key": submission.key, "state_url": submission.state_url,
             "fingerprint": submitted, "collected": False},
            what=f"Muse run {submission.name}/{submission.key}",
        )
        self._publish(context, submission.key, submission.state_url)
        return submission.key, None

    def _resume(self, state: TaskState, submitted: str, context: Context) -> tuple[str, MuseReport] | None:
        stored = state.get()
        if stored is None or not stored.get("key"):
            return None
        key = str(stored["key"])
        if stored.get("name") != self.name:
            self.log.warning("The stored Muse run %s ran %r, not %r: submitting anew", key, stored.get("name"), self.name)
            return None
        if stored.get("fingerprint") not in (None, submitted):
            self.log.warning(
                "The previous try's Muse run %s/%s was submitted with other inputs (cmd, files or options changed): "
                "submitting anew", self.name, key,
            )
            return None
        if stored.get("collected") and not state.same_cycle(stored):
            self.log.info("Muse run %s/%s was collected before this task was cleared: submitting anew", self.name, key)
            return None
        try:
            report = self.hook.get_state(self.name, key)
        except MuseApiError as exc:
            if not is_unknown_run(exc):
                raise
            # The error goes last: it may end with a URL, which the Airflow log view links up to the next whitespace.
            self.log.warning("The service no longer knows the previous try's Muse run %s/%s: submitting anew. %s", self.name, key, exc)
            return None
        if report.cr.value == "NOK":
            self.log.warning(
                "The previous try's Muse run %s/%s ended badly (%s): submitting anew", self.name, key, report.state
            )
            return None
        self._key = key
        self._publish(context, key, self.hook.state_url(self.name, key))
        if report.is_successful:
            self.log.info("The previous try's Muse run %s/%s already ended well: fetching its result", self.name, key)
        else:
            self.log.info("Re-attaching to the previous try's Muse run %s/%s (%s)", self.name, key, report.state)
        return key, report

    def _publish(self, context: Context, key: str, state_url: str) -> None:
        self._note_run(self.name, key, inputs=[str(f) for f in self.files or []])
        self.log.info("Muse run %s/%s: follow it at %s", self.name, key, state_url)
        context["ti"].xcom_push(key=KEY_XCOM_KEY, value=key)
        MuseJobStateLink.persist(context, state_url)

    # ----- outcomes -----------------------------------------------------------------------------

    def _run_off_cluster(self, context: Context) -> dict[str, Any]:
        output_path = resolve_output_path(self.output_path, context)
        dest = output_path / RESULT_FILE_NAMES.get(self.returned_type, "result")
        result = self.hook.run(
            self.name,
            cmd=self.cmd,
            cmd_option=self.cmd_option,
            returned_type=self.returned_type,
            todownload=as_flag(self.todownload),
            files=list(self.files or []),
            files_order=self.files_order,
            dest=dest,
            max_bytes=self.max_file_bytes,
        )
        if result.report is not None and result.report.is_terminal and not result.report.is_successful:
            # Off-cluster runs leave no key behind, so there is no content zip to fetch.
            raise MuseJobFailed(
                f"Muse off-cluster run of {self.name} ended badly (cr {result.report.cr.value}); "
                f"its stdout was: {(result.stdout or '')[-1000:]!r}"
            )
        value = result_value(
            name=self.name, key=None, report=result.report, returned_type=self.returned_type,
            state_url=None, output_path=output_path,
        )
        value = store_result(
            self.hook, result, value, dest=dest, extract=self.extract_zip,
            max_stdout_chars=self.max_stdout_chars, max_file_bytes=self.max_file_bytes,
        )
        self.log.info("Muse off-cluster run of %s: %s", self.name, describe_result(value))
        self._note_run(self.name, None, value, inputs=[str(f) for f in self.files or []])
        self._announce(context, value)
        return value

    def on_kill(self) -> None:
        """Say plainly that the remote run keeps going: the Muse API has no cancel endpoint."""
        if not self._key:
            return
        self.log.warning(
            "The task was killed, but Muse offers no way to cancel a run: %s/%s keeps running on the cluster; "
            "follow it at %s",
            self.name, self._key, self.hook.state_url(self.name, self._key),
        )


class MuseGetResultOperator(MuseResultMixin, BaseOperator):
    """
    Fetch the result of a known Muse run (its ``cr`` must be ``OK``) into XCom and object storage.

    The value returned is the same as :class:`MuseRunOperator`'s (see ``docs/results.md``).

    :param name: the software name.
    :param key: the run's key (e.g. ``{{ ti.xcom_pull(task_ids='submit', key='muse_key') }}``).
    :param returned_type: how the run was asked to answer; by default read from the run's report.
    :param output_path: the folder result files go to (default: per DAG/run/task under ``[hpc] results_base``).
    :param extract_zip: extract ``run.zip`` safely under ``output_path/run/``.
    :param muse_conn_id: the Airflow connection of the Muse service.
    :param max_stdout_chars: the longest stdout put in XCom; a longer one goes to ``stdout.txt``.
    :param max_file_bytes: refuse a result file larger than this (default 64 GiB; ``None``: no limit).
    """

    template_fields: Sequence[str] = ("name", "key", "returned_type", "output_path")
    operator_extra_links = (MuseJobStateLink(),)
    ui_color = "#d9ead3"

    def __init__(
        self,
        *,
        name: str,
        key: str,
        returned_type: str | None = None,
        output_path: str | ObjectStoragePath | None = None,
        extract_zip: bool = False,
        muse_conn_id: str = MuseHook.default_conn_name,
        max_stdout_chars: int = DEFAULT_MAX_XCOM_STDOUT,
        max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.name = name
        self.key = key
        self.returned_type = returned_type
        self.output_path = output_path
        self.extract_zip = extract_zip
        self.muse_conn_id = muse_conn_id
        self.max_stdout_chars = max_stdout_chars
        self.max_file_bytes = max_file_bytes

    def execute(self, context: Context) -> dict[str, Any]:
        """Check the run ended well, then fetch its result."""
        report = self.hook.get_state(self.name, self.key)
        MuseJobStateLink.persist(context, self.hook.state_url(self.name, self.key))
        if not report.is_terminal:
            raise MuseApiError(
                f"Muse run {self.name}/{self.key} is still going ({report.state}): wait for it first (MuseJobSensor)"
            )
        if not report.is_successful:
            raise self._failure(context, self.name, self.key, report)
        return self._collect(context, self.name, self.key, report, self.returned_type)
