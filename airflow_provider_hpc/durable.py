"""
What a task keeps across its tries in Airflow's ``task_state_store``, so that a retry never starts a
second remote job: the submitted key or id, a fingerprint of what was submitted, and whether the
result was collected.

Two rules shape it:

- a write that fails (the API server answering 500, say) is tried again a few times; if it still
  fails, the task says so with the key in its log and goes on: failing the task then would make
  its retry submit a second job;
- an entry belongs to one "try cycle" of a task instance: its retries share it, while a clear of
  the task instance starts a new cycle (Airflow raises ``max_tries`` when it clears), so a cleared
  task runs anew instead of handing back an old result.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Writes of one entry tried in all before the task goes on without it.
WRITE_ATTEMPTS = 3
#: Seconds before the second write; doubled for each next one.
WRITE_BACKOFF = 1.0


def fingerprint(**fields: Any) -> str:
    """Return a short digest of what a task submits: a retry whose inputs changed submits anew."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TaskState:
    """
    One entry of a task instance's ``task_state_store``, read and written with care.

    :param context: the running task's context (``task_state_store`` may be missing: then nothing
        is kept, and the task says once that a retry cannot re-attach).
    :param key: the entry's key in the store.
    :param log: the task's logger.
    :param durable: ``False`` keeps nothing (the task's ``durable=False``, as in the official providers).
    """

    def __init__(self, context: Context, key: str, log: Any, *, durable: bool = True) -> None:
        self.store = context.get("task_state_store") if durable else None
        self.key = key
        self.log = log
        ti = context.get("ti")
        max_tries = getattr(ti, "max_tries", None)
        self.cycle = max_tries if isinstance(max_tries, int) and not isinstance(max_tries, bool) else None

    @property
    def available(self) -> bool:
        """Whether the deployment gives the task a state store."""
        return self.store is not None

    def get(self) -> dict[str, Any] | None:
        """Return the stored entry, or ``None`` when there is none (or no store)."""
        if self.store is None:
            return None
        value = self.store.get(self.key)
        return value if isinstance(value, dict) else None

    def set(self, value: dict[str, Any], *, what: str) -> bool:
        """
        Store ``value`` (stamped with this try cycle), trying again on failure; return whether it landed.

        :param value: the entry, JSON values only.
        :param what: what the entry names, for the log line if it cannot be kept (``Muse run x/KEY``).
        """
        if self.store is None:
            return False
        entry = {**value, "cycle": self.cycle}
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                self.store.set(self.key, entry)
                return True
            except Exception as exc:  # any failure of the store: the remote job exists whatever happens
                if attempt == WRITE_ATTEMPTS:
                    self.log.error(
                        "Could not keep %s in task_state_store after %d attempts (%s: %s); going on with it, but a "
                        "retry of this task will not know it",
                        what, attempt, type(exc).__name__, str(exc)[:200],
                    )
                    return False
                time.sleep(WRITE_BACKOFF * 2 ** (attempt - 1))
        return False

    def delete(self) -> None:
        """Forget the entry (a request that surely did nothing); a failure to do so is only logged."""
        if self.store is None:
            return
        try:
            self.store.delete(self.key)
        except Exception as exc:  # the entry then says "asked, answer unknown": the safe side
            self.log.warning("Could not remove %s from task_state_store (%s: %s)", self.key, type(exc).__name__, str(exc)[:200])

    def same_cycle(self, entry: dict[str, Any]) -> bool:
        """
        Tell whether ``entry`` was written in this try cycle (a retry), not before a clear.

        Unknown on either side (an entry of an earlier version, a runtime without ``max_tries``)
        counts as another cycle: running anew is the safe side only for a collected result.
        """
        return self.cycle is not None and entry.get("cycle") == self.cycle
