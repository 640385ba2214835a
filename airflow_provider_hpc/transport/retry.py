"""The retry policy both transports share: what is tried again, how often, and how long to wait."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import tenacity

from airflow_provider_hpc.transport.errors import TransportError, describe


@dataclass(frozen=True)
class RetryPolicy:
    """
    How many times and how long to retry a request; plain numbers so it crosses into triggers.

    :param max_attempts: attempts in all, the first included.
    :param initial_wait: seconds before the first retry; doubles each time, with jitter.
    :param max_wait: the longest backoff between two attempts.
    :param max_retry_after: the longest ``Retry-After`` honoured; longer asks are capped.
    """

    max_attempts: int = 5
    initial_wait: float = 1.0
    max_wait: float = 30.0
    max_retry_after: float = 300.0

    def to_dict(self) -> dict[str, float]:
        """Return the policy as JSON-able numbers (trigger kwargs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RetryPolicy:
        """Build a policy from :meth:`to_dict` output; missing keys take defaults."""
        data = data or {}
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if data.get(k) is not None})

    def backoff(self, attempt: int) -> float:
        """
        Return the exponential backoff with jitter before retry number ``attempt`` (from 1).

        ``initial_wait * 2 ** (attempt - 1)`` plus up to ``initial_wait`` of jitter, at most ``max_wait``.
        """
        exponential = self.initial_wait * 2 ** min(max(attempt, 1) - 1, 60)
        return max(0.0, min(self.max_wait, exponential + random.uniform(0, self.initial_wait)))

    def wait_for(self, exc: BaseException, attempt: int) -> float:
        """Return how long to wait after ``exc``: the server's ``Retry-After`` (capped) or the backoff."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return max(0.0, min(float(retry_after), self.max_retry_after))
        return self.backoff(attempt)


def parse_retry_after(value: str | None) -> float | None:
    """Return the seconds a ``Retry-After`` header asks for (seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


class Retrier:
    """Runs an attempt function under a :class:`RetryPolicy`, logging each retry with its reason."""

    def __init__(self, policy: RetryPolicy, log: logging.Logger | Any) -> None:
        self.policy = policy
        self.log = log

    def _kwargs(self, endpoint: str, done: int = 0) -> dict[str, Any]:
        """Tenacity's settings; ``done`` attempts already failed before tenacity took over."""
        policy = self.policy

        def wait(state: tenacity.RetryCallState) -> float:
            return policy.wait_for(state.outcome.exception(), state.attempt_number + done)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            self._log_retry(endpoint, state.outcome.exception(), state.attempt_number + done,
                            state.next_action.sleep if state.next_action else 0.0)

        return {
            "stop": tenacity.stop_after_attempt(self.max_attempts - done),
            "wait": wait,
            "retry": tenacity.retry_if_exception(lambda e: isinstance(e, TransportError) and e.retryable),
            "before_sleep": before_sleep,
            "reraise": True,
        }

    @property
    def max_attempts(self) -> int:
        """The attempts in all (at least one)."""
        return max(1, int(self.policy.max_attempts))

    def _gave_up(self, exc: TransportError) -> None:
        # A retryable error that escapes the loop is one the attempts ran out on: say so.
        if exc.retryable and self.max_attempts > 1:
            exc.note_attempts(self.max_attempts)

    def call(self, endpoint: str, attempt: Callable[[], Any]) -> Any:
        """Call ``attempt`` until it succeeds, fails for good, or the attempts run out."""
        # The first attempt runs bare, as in acall: a harvest makes one request per file, and
        # tenacity's machinery cost more than the rest of the retry path for a request that
        # almost always succeeds at once. Its waits, log lines and count stay the same.
        try:
            return attempt()
        except TransportError as exc:
            if not self.retries(exc):
                raise
            first_failure = exc
        try:
            wait = self.policy.wait_for(first_failure, 1)
            self._log_retry(endpoint, first_failure, 1, wait)
            _sleep(wait)
            return tenacity.Retrying(sleep=lambda seconds: _sleep(seconds), **self._kwargs(endpoint, done=1))(attempt)
        except TransportError as exc:
            self._gave_up(exc)
            raise

    def _log_retry(self, endpoint: str, exc: BaseException | None, attempt: int, wait: float) -> None:
        self.log.warning(
            "%s failed (%s); retry %d of %d in %.1fs", endpoint, describe(exc), attempt, self.max_attempts - 1, wait
        )

    def retries(self, exc: TransportError) -> bool:
        """Whether a first attempt that failed with ``exc`` is tried again."""
        return exc.retryable and self.max_attempts > 1

    async def aretry(
        self, endpoint: str, first_failure: TransportError, attempt: Callable[..., Awaitable[Any]], *args: Any
    ) -> Any:
        """
        Go on after a first attempt failed with ``first_failure`` (one :meth:`retries` accepts).

        The waits, the ``retry N of M`` log lines and the count of attempts are those tenacity
        would have given had it run the first attempt too.
        """
        # The failure's traceback holds the frames it went through: it is only waited on and
        # logged here, never raised again, so it is dropped rather than kept in a cycle.
        first_failure.__traceback__ = None
        try:
            wait = self.policy.wait_for(first_failure, 1)
            self._log_retry(endpoint, first_failure, 1, wait)
            await _async_sleep(wait)
            return await tenacity.AsyncRetrying(
                sleep=lambda seconds: _async_sleep(seconds), **self._kwargs(endpoint, done=1)
            )(attempt, *args)
        except TransportError as exc:
            self._gave_up(exc)
            raise


def _sleep(seconds: float) -> None:
    """Wait between two sync attempts (tenacity's own sleep, which tests replace)."""
    tenacity.nap.sleep(seconds)


async def _async_sleep(seconds: float) -> None:
    """Wait between two async attempts without blocking the event loop."""
    await asyncio.sleep(seconds)
