"""MuseJobTrigger: wait in the triggerer, without blocking, until a Muse cluster run ends."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.models.muse import MuseReport, report_signature
from airflow_provider_hpc.triggers._polling import PollingTrigger

EVENT_STATUSES = ("ok", "nok", "timeout", "error")


class MuseJobTrigger(PollingTrigger):
    """
    Poll a Muse run's state until its ``cr`` is ``OK`` or ``NOK``, then fire exactly one event.

    The event payload is ``{"status", "name", "key", "report", "message"}``: ``status`` is ``ok``,
    ``nok``, ``timeout`` (the deadline passed while the run was still going) or ``error`` (the state
    could not be read ``max_poll_failures`` times in a row, after the transport's own retries, or the
    service answered a permanent error); ``report`` is :meth:`MuseReport.to_dict` of the last report
    read, or ``None``.

    Only plain values are kept (they are stored in the metadata database): never a token, never a
    report; the connection is read again, asynchronously, where the trigger runs.

    :param muse_conn_id: the Airflow connection id of the Muse service.
    :param name: the software name.
    :param key: the run's key.
    :param poll_interval: seconds between polls at first and after each state change.
    :param polling: the loop's other settings (``max_poll_interval``, ``deadline``,
        ``max_poll_failures``, ``retry``, ``first_poll_at``, see :class:`PollingTrigger`), and
        ``end_from_trigger``: end the task in the triggerer when the run ends well, its XCom value
        the run's report (what :class:`MuseJobSensor` returns); only a sensor may ask for it.
    """

    def __init__(self, *, muse_conn_id: str, name: str, key: str, poll_interval: float = 10.0, **polling: Any) -> None:
        super().__init__(conn_id=muse_conn_id, poll_interval=poll_interval, **polling)
        self.muse_conn_id = muse_conn_id
        self.name = name
        self.key = key
        self._report: MuseReport | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the plain keyword arguments that rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"muse_conn_id": self.muse_conn_id, "name": self.name, "key": self.key, **self._polling_kwargs()},
        )

    @cached_property
    def hook(self) -> MuseHook:
        """The hook whose async methods the polls call."""
        return MuseHook(self.muse_conn_id, retry=self.retry_policy)

    @property
    def subject(self) -> str:
        """The run waited on, for log lines and messages."""
        return f"Muse run {self.name}/{self.key}"

    async def _poll(self) -> tuple[dict[str, Any] | None, bool]:
        current = await self.hook.a_get_state(self.name, self.key)
        if current == self._report:
            # The report held is kept: the new one, equal, is freed at once instead of living a
            # whole interval and reaching the garbage collector's oldest generation (it and its
            # request dict and lists, at every poll of every trigger). The report held is not
            # terminal, or the wait would have ended, and nothing changed.
            return None, False
        changed = report_signature(current) != report_signature(self._report)
        if changed:
            self._log_change(self._report, current)
        self._report = current
        return (self._terminal_event(current) if current.is_terminal else None), changed

    def _log_change(self, before: MuseReport | None, after: MuseReport) -> None:
        # A triggerer's supervisor reads its runner's log lines a few KiB per pass, and a pass walks
        # every trigger it holds: at thousands of waits, lines per wait set how fast the triggers
        # start (docs/benchmarks.md, section 1c). So a wait with no change on the way logs nothing
        # of its own: the sensor logged the state it deferred on (the operator its submission), and
        # the end is in the event, which the triggerer logs (PollingTrigger.run logs it otherwise).
        if after.is_terminal:
            return
        if before is None:
            self.log.debug("%s is %s (cr %s, SLURM job %s)", self.subject, after.state, after.cr.value, after.job_id)
        else:
            self.log.info(
                "%s: %s -> %s (cr %s, SLURM job %s)",
                self.subject, before.state, after.state, after.cr.value, after.job_id,
            )

    def _terminal_event(self, report: MuseReport) -> dict[str, Any]:
        if report.is_successful:
            return self._event("ok", f"{self.subject} ended well (job {report.job_id}, {report.state})")
        return self._event(
            "nok",
            f"{self.subject} ended badly: cr NOK, latest_cr {report.latest_cr}, "
            f"latest_state {report.latest_state}, SLURM job {report.job_id}",
        )

    def task_result(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The report of a run that ended well (the sensor's XCom value), else ``None``."""
        # An "ok" event is only ever built from a successful report (see _terminal_event).
        return payload.get("report") if payload.get("status") == "ok" else None

    def _timeout(self) -> dict[str, Any]:
        state = self._report.state if self._report else "unknown"
        return self._event(
            "timeout",
            f"Timed out waiting for {self.subject} (last state {state}); "
            "the run may still be going on the cluster: Muse has no cancel endpoint",
        )

    def _error(self, message: str) -> dict[str, Any]:
        return self._event("error", message)

    def _event(self, status: str, message: str) -> dict[str, Any]:
        return {
            "status": status,
            "name": self.name,
            "key": self.key,
            "report": self._report.to_dict() if self._report else None,
            "message": message,
        }

    async def on_kill(self) -> None:
        """Say plainly that the remote run keeps going: the Muse API has no cancel endpoint."""
        self.log.warning(
            "The task was killed, but Muse offers no way to cancel a run: %s keeps running on the cluster",
            self.subject,
        )
