"""What every polling trigger shares: the backoff between polls and the deadline."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class PollSchedule:
    """
    When to poll next: start at ``interval``, grow by ``factor`` after each unchanged poll, up to
    ``max_interval``; back to ``interval`` when the remote state changes (things are moving).

    Long HPC runs thus cost few requests, and a run's end is seen within ``max_interval``.

    :param interval: seconds before the first repeat poll.
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

    def next_wait(self, changed: bool) -> float:
        """Return the seconds to sleep before the next poll, never past the deadline."""
        self._current = self.interval if changed else min(self._current * self.factor, self.max_interval)
        wait = self._current
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
