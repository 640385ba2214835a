"""MuseJobTrigger: wait in the triggerer, without blocking, until a Muse cluster run ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_hpc.exceptions import HpcApiError, InvalidIdentifierError
from airflow_provider_hpc.hooks._http import RetryPolicy
from airflow_provider_hpc.hooks.muse import MuseHook, MuseReport
from airflow_provider_hpc.triggers._polling import PollSchedule

EVENT_STATUSES = ("ok", "nok", "timeout", "error")


class MuseJobTrigger(BaseTrigger):
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
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param deadline: epoch seconds after which a ``timeout`` event fires (``None``: wait forever).
    :param max_poll_failures: consecutive failed polls tolerated before an ``error`` event.
    :param retry: the transport's retry policy as plain numbers (:meth:`RetryPolicy.to_dict`).
    """

    def __init__(
        self,
        *,
        muse_conn_id: str,
        name: str,
        key: str,
        poll_interval: float = 10.0,
        max_poll_interval: float = 300.0,
        deadline: float | None = None,
        max_poll_failures: int = 5,
        retry: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.muse_conn_id = muse_conn_id
        self.name = name
        self.key = key
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.max_poll_failures = max(1, int(max_poll_failures))
        self.retry = dict(retry) if retry else None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the plain keyword arguments that rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "muse_conn_id": self.muse_conn_id,
                "name": self.name,
                "key": self.key,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "deadline": self.deadline,
                "max_poll_failures": self.max_poll_failures,
                "retry": RetryPolicy.from_dict(self.retry).to_dict() if self.retry else None,
            },
        )

    def _hook(self) -> MuseHook:
        policy = RetryPolicy.from_dict(self.retry) if self.retry else None
        return MuseHook(self.muse_conn_id, retry=policy)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the run ends, the deadline passes or polling keeps failing; yield one event."""
        payload = await self.wait()
        # The event leaves after the session lease ended, so nothing stays open while it is handled.
        yield TriggerEvent(payload)

    async def wait(self) -> dict[str, Any]:
        """Return the event payload once the wait is over (the body of :meth:`run`)."""
        hook = self._hook()
        try:
            transport = await hook.async_transport()
        except Exception as exc:  # a missing or broken connection: the task must hear why
            return self._event("error", None, f"Cannot read connection {self.muse_conn_id!r}: {exc}")
        # One lease for the trigger's whole life: every poll reuses the same pooled session.
        async with transport.session_lease():
            return await self._poll(hook)

    async def _poll(self, hook: MuseHook) -> dict[str, Any]:
        schedule = PollSchedule(self.poll_interval, self.max_poll_interval, deadline=self.deadline)
        report: MuseReport | None = None
        failures = 0
        while True:
            try:
                current = await hook.a_get_state(self.name, self.key)
            except HpcApiError as exc:
                failures += 1
                if not _is_transient(exc) or failures >= self.max_poll_failures:
                    return self._event("error", report, self._failure_message(exc, failures))
                self.log.warning(
                    "Could not read the state of Muse run %s/%s (%d of %d tolerated failures): %s",
                    self.name, self.key, failures, self.max_poll_failures - 1, exc,
                )
                changed = False
            else:
                failures = 0
                changed = _signature(current) != _signature(report)
                if changed:
                    self._log_change(report, current)
                report = current
                if report.is_terminal:
                    return self._terminal_event(report)
            if schedule.expired:
                return self._event("timeout", report, self._timeout_message(report))
            await asyncio.sleep(schedule.next_wait(changed))

    def _log_change(self, before: MuseReport | None, after: MuseReport) -> None:
        if before is None:
            self.log.info(
                "Muse run %s/%s is %s (cr %s, SLURM job %s)", self.name, self.key, after.state, after.cr.value, after.job_id
            )
        else:
            self.log.info(
                "Muse run %s/%s: %s -> %s (cr %s, SLURM job %s)",
                self.name, self.key, before.state, after.state, after.cr.value, after.job_id,
            )

    def _terminal_event(self, report: MuseReport) -> dict[str, Any]:
        if report.is_successful:
            return self._event("ok", report, f"Muse run {self.name}/{self.key} ended well (job {report.job_id}, {report.state})")
        return self._event(
            "nok",
            report,
            f"Muse run {self.name}/{self.key} ended badly: cr NOK, latest_cr {report.latest_cr}, "
            f"latest_state {report.latest_state}, SLURM job {report.job_id}",
        )

    def _timeout_message(self, report: MuseReport | None) -> str:
        state = report.state if report else "unknown"
        return (
            f"Timed out waiting for Muse run {self.name}/{self.key} (last state {state}); "
            "the run may still be going on the cluster: Muse has no cancel endpoint"
        )

    def _failure_message(self, exc: HpcApiError, failures: int) -> str:
        if _is_transient(exc):
            return f"Could not read the state of Muse run {self.name}/{self.key} {failures} times in a row: {exc}"
        return f"The Muse service refused the state of run {self.name}/{self.key}: {exc}"

    def _event(self, status: str, report: MuseReport | None, message: str) -> dict[str, Any]:
        return {
            "status": status,
            "name": self.name,
            "key": self.key,
            "report": report.to_dict() if report else None,
            "message": message,
        }

    async def on_kill(self) -> None:
        """Say plainly that the remote run keeps going: the Muse API has no cancel endpoint."""
        self.log.warning(
            "The task was killed, but Muse offers no way to cancel a run: %s/%s keeps running on the cluster",
            self.name, self.key,
        )


def _signature(report: MuseReport | None) -> tuple[Any, ...] | None:
    """What counts as a state change: cr, latest_cr or latest_state moved."""
    return None if report is None else (report.cr, report.latest_cr, report.latest_state)


def _is_transient(exc: HpcApiError) -> bool:
    """Whether another poll may succeed: no answer, a 5xx/429, or a body that was not the expected JSON."""
    if isinstance(exc, InvalidIdentifierError):
        return False
    if exc.retryable:
        return True
    if exc.status is not None:
        return exc.status >= 500 or exc.status == 429
    # No status: either the connection failed, or the body was not JSON; a server's own error words
    # (an unknown key, a refused name) will not change with another poll.
    return exc.error is None
