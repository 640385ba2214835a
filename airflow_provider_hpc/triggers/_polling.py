"""
The one wait loop: the backoff between polls, the deadline, the budget of failed polls, one pooled
session for the trigger's whole life, and exactly one event.

Every wait runs it: in the triggerer when a task defers, in the worker (:func:`wait_in_worker`)
when it does not.
"""

from __future__ import annotations

import asyncio
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

from airflow_provider_hpc.exceptions import HpcApiError, InvalidIdentifierError
from airflow_provider_hpc.transport.retry import RetryPolicy

if TYPE_CHECKING:
    from airflow_provider_hpc.hooks._base import HpcHttpHook

_timeout = getattr(asyncio, "timeout", None)

#: How much longer than the trigger's own deadline Airflow's deferral timeout is set, so the
#: trigger's clearer ``timeout`` event normally arrives first. It covers a poll still in flight at
#: the deadline, retries included (up to five attempts with backoffs of up to 30 s each).
DEFERRAL_TIMEOUT_MARGIN = timedelta(minutes=5)
#: Seconds a poll may still take past the deadline before it is cut (see ``_poll_loop_within_deadline``).
LAST_POLL_GRACE = 5.0


@dataclass
class PollSchedule:
    """
    When to poll next: start at ``interval``, grow by ``factor`` after each unchanged poll, up to
    ``max_interval``; back to ``interval`` when the remote state changes (things are moving).

    Long HPC runs thus cost few requests, and a run's end is seen within ``max_interval``. A wait
    counts from the start of the poll before it (see :meth:`next_wait`).

    :param interval: seconds between the first poll's start and the next one's.
    :param max_interval: the longest wait between two polls.
    :param factor: growth of the wait after each poll that saw no change.
    :param deadline: epoch seconds after which the wait gives up (``None``: never).
    """

    interval: float
    max_interval: float
    factor: float = 1.5
    deadline: float | None = None

    def __post_init__(self) -> None:
        self.interval = max(0.0, float(self.interval))
        self.max_interval = max(self.interval, float(self.max_interval))
        self._current = self.interval

    def next_wait(self, changed: bool, elapsed: float = 0.0) -> float:
        """
        Return the seconds to sleep before the next poll, never past the deadline.

        :param changed: whether the poll just made saw the remote state change.
        :param elapsed: seconds the poll just made took: the sleep is that much shorter, so polls
            start one wait apart. Never less than half the wait: a poll slowed by the server
            (retries, ``Retry-After``) is still followed by a pause.
        """
        self._current = self.interval if changed else min(self._current * self.factor, self.max_interval)
        wait = max(self._current - elapsed, self._current / 2)
        if self.deadline is not None:
            wait = max(0.0, min(wait, self.deadline - time.time()))
        return wait

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.deadline is not None and time.time() >= self.deadline


def deadline_from_timeout(timeout: float | None) -> float | None:
    """Return the epoch deadline for a timeout in seconds from now (``None`` for no timeout)."""
    return None if timeout is None else time.time() + float(timeout)


def first_poll_after(poll_interval: float) -> float:
    """
    Return when a trigger should first poll a run the deferring task has just looked at itself.

    One ``poll_interval`` ahead: an immediate poll would only repeat the task's own look. It also
    keeps a run that ends within seconds from firing the trigger before the scheduler has seen the
    deferral: Airflow 3.3 can report a deferred task's exit up to 5 s late and then takes the
    resumed task for one killed externally (apache/airflow#71580, #72716).

    :param poll_interval: the trigger's ``poll_interval``, in seconds.
    """
    return time.time() + float(poll_interval)


def deferral_timeout(timeout: float | None) -> timedelta | None:
    """
    Return the ``timeout`` to give ``defer()`` for a wait of ``timeout`` seconds (``None``: no limit).

    :param timeout: the wait's own limit, which the trigger's deadline enforces.
    """
    return None if timeout is None else timedelta(seconds=float(timeout)) + DEFERRAL_TIMEOUT_MARGIN


def wait_in_worker(trigger: PollingTrigger) -> dict[str, Any]:
    """
    Run a trigger's wait in the calling (worker) thread and return its event payload.

    What a task does with ``deferrable=False``: the very same loop as in the triggerer, so both
    paths poll, back off, time out and fail alike.

    :param trigger: the trigger the task would have deferred to.
    """
    return asyncio.run(trigger.wait())


def is_transient(exc: HpcApiError) -> bool:
    """
    Tell whether another poll may succeed after ``exc`` (no answer, 429, 5xx, a non-JSON body).

    :param exc: the error of a poll, after the transport's own retries.
    """
    if isinstance(exc, InvalidIdentifierError):
        return False
    if exc.retryable:
        return True
    if exc.status is not None:
        return exc.status >= 500 or exc.status == 429
    # No status: either the connection failed, or the body was not JSON; a server's own error words
    # (an unknown key, a refused name) will not change with another poll.
    return exc.error is None


class PollingTrigger(BaseTrigger):
    """
    Poll a remote run until there is something to report, then fire exactly one event.

    Subclasses say what one poll does (:meth:`_poll`), what they wait on (:attr:`subject`), and
    build their ``error`` and ``timeout`` payloads; the loop, its backoff, its deadline and its
    budget of failed polls are here. Only plain values are kept (they are stored in the metadata
    database): never a token; the connection is read again, asynchronously, where the trigger runs.

    :param conn_id: the Airflow connection id.
    :param poll_interval: seconds between polls at first and after each change.
    :param max_poll_interval: the longest wait between two polls while nothing changes.
    :param deadline: epoch seconds after which a ``timeout`` event fires (``None``: wait forever).
    :param max_poll_failures: consecutive failed polls tolerated (after the transport's own retries).
    :param retry: the transport's retry policy as plain numbers (:meth:`RetryPolicy.to_dict`).
    :param end_from_trigger: when the wait ends well, end the task here with its XCom value
        (:meth:`task_result`) instead of resuming it on a worker; any other outcome still resumes
        the task, which raises its usual error (and is retried as usual).
    :param first_poll_at: epoch seconds before which the trigger does not poll (``None``: at once).
        A task that has just looked at the run itself sets it one ``poll_interval`` ahead (see
        :func:`first_poll_after`).
    """

    def __init__(
        self,
        *,
        conn_id: str,
        poll_interval: float,
        max_poll_interval: float = 300.0,
        deadline: float | None = None,
        max_poll_failures: int = 5,
        retry: Mapping[str, Any] | None = None,
        end_from_trigger: bool = False,
        first_poll_at: float | None = None,
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.max_poll_failures = max(1, int(max_poll_failures))
        self.retry = dict(retry) if retry else None
        self.end_from_trigger = bool(end_from_trigger)
        self.first_poll_at = None if first_poll_at is None else float(first_poll_at)

    def _polling_kwargs(self) -> dict[str, Any]:
        """The serialized form of the loop's settings, for the subclasses' ``serialize``."""
        return {
            "poll_interval": self.poll_interval,
            "max_poll_interval": self.max_poll_interval,
            "deadline": self.deadline,
            "max_poll_failures": self.max_poll_failures,
            "retry": RetryPolicy.from_dict(self.retry).to_dict() if self.retry else None,
            "end_from_trigger": self.end_from_trigger,
            "first_poll_at": self.first_poll_at,
        }

    @property
    def retry_policy(self) -> RetryPolicy | None:
        """The transport's retry policy, when the task gave one."""
        return RetryPolicy.from_dict(self.retry) if self.retry else None

    @property
    @abstractmethod
    def hook(self) -> HpcHttpHook:
        """The hook whose async methods the polls call (one per trigger instance)."""

    @property
    @abstractmethod
    def subject(self) -> str:
        """What is waited on, for log lines and messages (``Muse run sw_example/KEY``)."""

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until there is something to report; yield exactly one event."""
        payload = await self.wait()
        # The event leaves after the session lease ended, so nothing stays open while it is handled.
        result = self.task_result(payload) if self.end_from_trigger else None
        if result is None:
            yield TriggerEvent(payload)
            return
        # The task ends here: no worker starts again only to turn this payload into the XCom value.
        # The triggerer logs a success event without its payload, so this line says how the run ended.
        self.log.info("%s; the task ends from the triggerer, without resuming on a worker", payload.get("message") or self.subject)
        yield TaskSuccessEvent(xcoms={"return_value": result})

    def task_result(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """
        Return the task's XCom value when ``payload`` is a wait that ended well, else ``None``.

        It must be exactly what the waiting task's ``execute_complete`` returns for the same payload.
        By default nothing ends in the triggerer.

        :param payload: the event payload :meth:`wait` returned.
        """
        return None

    async def wait(self) -> dict[str, Any]:
        """Return the event payload once the wait is over (the body of :meth:`run`)."""
        try:
            transport = await self.hook.async_transport()
        except Exception as exc:  # a missing or broken connection: the task must hear why
            return self._error(f"Cannot read connection {self.conn_id!r}: {exc}")
        # One lease for the trigger's whole life: every poll reuses the same pooled session.
        async with transport.session_lease():
            if self.deadline is None:
                return await self._poll_loop()
            return await self._poll_loop_within_deadline()

    async def _poll_loop_within_deadline(self) -> dict[str, Any]:
        """
        Run the poll loop under one timer, :data:`LAST_POLL_GRACE` seconds past the deadline.

        The loop's sleeps never pass the deadline, so the timer only cuts a poll still in flight
        then, and the timeout names the last state seen. One timer for the trigger's whole wait,
        not one per poll: thousands of triggers would each arm and cancel one every poll.
        """
        assert self.deadline is not None
        limit = max(self.deadline - time.time(), 0.0) + LAST_POLL_GRACE
        try:
            if _timeout is not None:  # Python 3.11+: no task built, as wait_for builds one
                async with _timeout(limit):
                    return await self._poll_loop()
            return await asyncio.wait_for(self._poll_loop(), timeout=limit)
        except asyncio.TimeoutError:
            return self._timeout()

    async def _poll_loop(self) -> dict[str, Any]:
        schedule = PollSchedule(self.poll_interval, self.max_poll_interval, deadline=self.deadline)
        if self.first_poll_at is not None:
            # Never past the deadline, so that a timeout still fires on time.
            start = self.first_poll_at if self.deadline is None else min(self.first_poll_at, self.deadline)
            await asyncio.sleep(max(0.0, start - time.time()))
        failures = 0
        clock = asyncio.get_running_loop().time
        while True:
            # Polls start one wait apart: with thousands of triggers a poll may queue for a pooled
            # connection, and the whole wait after its end would push every later poll back by as
            # much (and a run's end past one interval). A failed poll is followed by a whole wait.
            started = clock()
            try:
                payload, changed = await self._poll()
                elapsed = clock() - started
            except HpcApiError as exc:
                failures += 1
                if not is_transient(exc) or failures >= self.max_poll_failures:
                    return self._error(self._failure_message(exc, failures))
                self.log.warning(
                    "Could not poll %s (%d of %d tolerated failures): %s",
                    self.subject, failures, self.max_poll_failures - 1, exc,
                )
                payload, changed, elapsed = None, False, 0.0
            else:
                failures = 0
            if payload is not None:
                return payload
            if schedule.expired:
                return self._timeout()
            await asyncio.sleep(schedule.next_wait(changed, elapsed))

    def _failure_message(self, exc: HpcApiError, failures: int) -> str:
        if is_transient(exc):
            return f"Could not poll {self.subject} {failures} times in a row: {exc}"
        return f"The service refused a request about {self.subject}: {exc}"

    @abstractmethod
    async def _poll(self) -> tuple[dict[str, Any] | None, bool]:
        """Poll once: return the event payload when the wait is over, and whether anything changed."""

    @abstractmethod
    def _error(self, message: str) -> dict[str, Any]:
        """Return the ``error`` event payload carrying ``message``."""

    @abstractmethod
    def _timeout(self) -> dict[str, Any]:
        """Return the ``timeout`` event payload."""
