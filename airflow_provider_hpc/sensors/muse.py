"""MuseJobSensor: wait until a known Muse run ends (deferrable, or poke / reschedule)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowSensorTimeout, AirflowSkipException

from airflow_provider_hpc.exceptions import MuseApiError, MuseJobFailed
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.links.muse import MuseJobStateLink
from airflow_provider_hpc.models.muse import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_XCOM_STDOUT, MuseReport
from airflow_provider_hpc.muse_results import MuseResultMixin
from airflow_provider_hpc.settings import default_deferrable
from airflow_provider_hpc.triggers._polling import deferral_timeout, first_poll_after
from airflow_provider_hpc.triggers.muse import MuseJobTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context, ObjectStoragePath


class MuseJobSensor(MuseResultMixin, BaseSensorOperator):
    """
    Wait until a known Muse run ends; return its report (``MuseReport.to_dict()``) as XCom.

    ``NOK`` raises :class:`MuseJobFailed` (after saving the run folder's zip under ``output_path``
    and logging its stderr tail); with ``soft_fail`` the task is skipped instead, in every mode.
    A wait longer than ``timeout`` raises ``AirflowSensorTimeout`` (or skips with ``soft_fail``),
    deferred or not.

    :param name: the software name.
    :param key: the run's key (e.g. ``{{ ti.xcom_pull(task_ids='submit', key='muse_key') }}``).
    :param muse_conn_id: the Airflow connection of the Muse service.
    :param deferrable: wait in the triggerer (default ``True``, see ``settings.default_deferrable``); ``False`` follows ``mode`` (``poke`` or
        ``reschedule``), checking every ``poke_interval`` seconds.
    :param max_poll_interval: in deferrable mode, the longest wait between polls (backoff from ``poke_interval``).
    :param max_poll_failures: in deferrable mode, consecutive failed polls tolerated.
    :param output_path: where a failed run's folder zip is saved (default: per DAG/run/task).
    :param end_from_trigger: in deferrable mode, when the run ends well, end the task in the triggerer
        with the same XCom value, without starting it again on a worker (``NOK``, a timeout or an
        error still resumes the task, which raises as usual and is retried as usual).
    """

    template_fields: Sequence[str] = ("name", "key", "output_path")
    operator_extra_links = (MuseJobStateLink(),)
    ui_color = "#d9ead3"

    def __init__(
        self,
        *,
        name: str,
        key: str,
        muse_conn_id: str = MuseHook.default_conn_name,
        deferrable: bool | None = None,
        max_poll_interval: float = 300.0,
        max_poll_failures: int = 5,
        output_path: str | ObjectStoragePath | None = None,
        end_from_trigger: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", 30.0)
        super().__init__(**kwargs)
        self.name = name
        self.key = key
        self.muse_conn_id = muse_conn_id
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self.max_poll_interval = max_poll_interval
        self.max_poll_failures = max_poll_failures
        self.output_path = output_path
        self.end_from_trigger = end_from_trigger
        self.extract_zip = False
        self.max_stdout_chars = DEFAULT_MAX_XCOM_STDOUT
        self.max_file_bytes = DEFAULT_MAX_FILE_BYTES

    def execute(self, context: Context) -> Any:
        """Check once; if the run is still going, defer (or fall back to poke/reschedule)."""
        MuseJobStateLink.persist(context, self.hook.state_url(self.name, self.key))
        if not self.deferrable:
            return super().execute(context)
        report = self.hook.get_state(self.name, self.key)
        if report.is_terminal:
            return self._finish(context, report)
        self.log.info("Muse run %s/%s is %s: deferring", self.name, self.key, report.state)
        self.defer(
            trigger=MuseJobTrigger(
                muse_conn_id=self.muse_conn_id,
                name=self.name,
                key=self.key,
                poll_interval=self.poke_interval,
                max_poll_interval=self.max_poll_interval,
                deadline=time.time() + self.timeout,
                max_poll_failures=self.max_poll_failures,
                end_from_trigger=self.end_from_trigger,
                first_poll_at=first_poll_after(self.poke_interval),  # the state was just read above
            ),
            method_name="execute_complete",
            timeout=deferral_timeout(self.timeout),
        )

    def poke(self, context: Context) -> bool | PokeReturnValue:
        """Return done with the report once the run ends well; raise if it ended badly."""
        report = self.hook.get_state(self.name, self.key)
        self.log.info("Muse run %s/%s is %s (cr %s)", self.name, self.key, report.state, report.cr.value)
        if not report.is_terminal:
            return False
        return PokeReturnValue(is_done=True, xcom_value=self._finish(context, report))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """
        Finish after the trigger's event (idempotent: it only reads).

        :param context: the task's context.
        :param event: the trigger's payload.
        """
        if not isinstance(event, dict):
            # A trigger that ended the task itself (end_from_trigger) sends no payload, and
            # `airflow dags test` resumes the task all the same: read the run's state once more.
            return self._finish(context, self.hook.get_state(self.name, self.key))
        status = event["status"]
        if status in ("ok", "nok") and event.get("report"):
            return self._finish(context, MuseReport.from_dict(event["report"]))
        if status == "timeout":
            raise AirflowSensorTimeout(event["message"])
        # The URL ends the message: the Airflow log view links a URL up to the next whitespace.
        raise MuseApiError(f"{event['message']}; state: {self.hook.state_url(self.name, self.key)}")

    def _finish(self, context: Context, report: MuseReport) -> dict[str, Any]:
        if report.is_successful:
            self.log.info("Muse run %s/%s ended well (SLURM job %s)", self.name, self.key, report.job_id)
            return report.to_dict()
        failure: MuseJobFailed = self._failure(context, self.name, self.key, report)
        # Same rule deferred or not: soft_fail skips a failed run (Airflow does it for deferred
        # sensors; a poke that raises would otherwise fail the task).
        if self.soft_fail:
            raise AirflowSkipException(f"Skipping (soft_fail): {failure}")
        raise failure
