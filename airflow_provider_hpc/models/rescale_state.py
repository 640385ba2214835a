"""
Deciding a Rescale run's outcome, and what its wait hands on: the verdict, the XCom value, the new
snapshot (followed files: ``rescale_tail.py``).

Rescale keeps statuses per job, not per run, and ``Completed`` is not always a success: the
verdict reads the job's status history sorted by date (:meth:`JobOutcome.from_statuses`). The
trigger, the sensor's poke and the operators all decide and build their values here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

from airflow_provider_hpc.exceptions import RescaleApiError
from airflow_provider_hpc.models.rescale import (
    FAILURE_STATUSES,
    MAX_TAIL_LINES,
    JobOutcome,
    JobStatus,
    OutputFile,
    RescaleRun,
)
# Following a file has its own module; its names stay importable from here, where they were.

#: The most file ids a snapshot wait keeps (see :class:`KnownFiles`).
MAX_KNOWN_IDS = 200
#: The keys of a finished run wait's XCom value (the trigger's event holds them too).
RUN_RESULT_KEYS = ("job_id", "run_id", "status", "run", "outcome", "reason", "message")


@dataclass(frozen=True)
class RunVerdict:
    """
    What a completed run's job statuses say: ``success`` or ``failed``, why, and the outcome seen.

    :param status: ``success`` or ``failed``.
    :param reason: the status reason that decided it (or a note when the job is still going).
    :param outcome: the job outcome read from the date-sorted statuses.
    """

    status: str
    reason: str | None
    outcome: JobOutcome

    @property
    def is_successful(self) -> bool:
        """Whether the run completed successfully."""
        return self.status == "success"


@dataclass(frozen=True)
class RescaleRunState:
    """
    Where a run stands, like Databricks' ``RunState``: its life cycle, and its verdict once decided.

    :param life_cycle: ``waiting to start``, ``running`` or ``completed`` (read from the run's dates).
    :param verdict: the decision read from the job's statuses; ``None`` until the run completed
        and its job said how.
    """

    life_cycle: str
    verdict: RunVerdict | None = None

    @classmethod
    def of(cls, run: RescaleRun, verdict: RunVerdict | None = None) -> RescaleRunState:
        """Return the state of a run just read, with the verdict decided for it (if any)."""
        life_cycle = "completed" if run.is_completed else "running" if run.date_started else "waiting to start"
        return cls(life_cycle, verdict)

    @property
    def is_terminal(self) -> bool:
        """Whether the run completed and its outcome is decided."""
        return self.verdict is not None

    @property
    def is_successful(self) -> bool:
        """Whether the run completed successfully."""
        return self.verdict is not None and self.verdict.is_successful


def judge_completed_run(
    statuses: Sequence[JobStatus],
    *,
    accept_any_completion: bool,
    waited_for_job: float,
    outcome_wait: float,
) -> RunVerdict | None:
    """
    Decide whether a completed run succeeded from its job's status history, or ``None`` to ask again.

    A ``Completed`` job decides through :meth:`JobOutcome.from_statuses` (a ``Stopping``/``Stopped``
    on the way or a failure ``statusReason`` is a failure). A job that has not completed yet (its
    ``Completed`` status may lag the run's ``dateCompleted`` by a moment, or other runs of the job
    are still going) is waited for up to ``outcome_wait`` seconds; past that, the run counts as a success unless a stop or failure status is already
    in the history.

    :param statuses: the job's statuses, sorted by date.
    :param accept_any_completion: count any completion as a success (a stopped run included).
    :param waited_for_job: seconds since the run was first seen completed.
    :param outcome_wait: the longest wait for the job's ``Completed`` status.
    """
    outcome = JobOutcome.from_statuses(list(statuses))
    troubled = [s for s in statuses if s.status.lower() in FAILURE_STATUSES]
    if accept_any_completion:
        return RunVerdict("success", outcome.reason, outcome)
    if outcome.completed:
        return RunVerdict("success" if outcome.succeeded else "failed", outcome.reason, outcome)
    if troubled:
        return RunVerdict("failed", troubled[0].status_reason or troubled[0].status, outcome)
    if waited_for_job < outcome_wait:
        return None
    note = "the run completed; its job has not completed yet (other runs still going?), no failure status so far"
    return RunVerdict("success", note, outcome)


def run_message(job_id: str, run_id: str, verdict: RunVerdict) -> str:
    """
    Return the one-line summary of a completed run for logs, events and errors.

    :param job_id: the job id.
    :param run_id: the run id.
    :param verdict: the decision read from the job's statuses.
    """
    history = " -> ".join(verdict.outcome.history) or "no statuses"
    word = "completed successfully" if verdict.is_successful else "did not succeed"
    return f"Rescale run {run_id} of job {job_id} {word}: {verdict.reason or 'no reason given'} (job statuses: {history})"


def run_result(
    job_id: str,
    run_id: str,
    status: str,
    message: str,
    *,
    run: dict[str, Any] | None = None,
    verdict: RunVerdict | None = None,
) -> dict[str, Any]:
    """
    Return the value of a finished run wait: ``{"job_id", "run_id", "status", "run", "outcome", "reason", "message"}``.

    It is the sensor's XCom value, and the trigger's event payload is built from it.

    :param job_id: the job id.
    :param run_id: the run id.
    :param status: ``success`` or ``failed``; ``timeout`` or ``error`` in an event.
    :param message: the one-line summary.
    :param run: :meth:`RescaleRun.to_dict` of the run last read.
    :param verdict: the decision (gives ``outcome`` and ``reason``).
    """
    return {
        "job_id": job_id,
        "run_id": run_id,
        "status": status,
        "run": run,
        "outcome": verdict.outcome.to_dict() if verdict else None,
        "reason": verdict.reason if verdict else None,
        "message": message,
    }


def job_message(job_id: str, runs: int, verdict: RunVerdict) -> str:
    """
    Return the one-line summary of a job whose runs all completed.

    :param job_id: the job id.
    :param runs: how many runs it had.
    :param verdict: the decision read from the job's statuses.
    """
    history = " -> ".join(verdict.outcome.history) or "no statuses"
    word = "completed successfully" if verdict.is_successful else "did not succeed"
    return f"Rescale job {job_id} ({runs} runs) {word}: {verdict.reason or 'no reason given'} (job statuses: {history})"


def job_result(
    job_id: str, run_ids: Sequence[str], status: str, message: str, *, verdict: RunVerdict | None = None
) -> dict[str, Any]:
    """
    Return the value of a finished job wait: ``{"job_id", "run_ids", "status", "outcome", "reason", "message"}``.

    It is the job trigger's event payload and :class:`RescaleSubmitJobOperator`'s XCom value.

    :param job_id: the job id.
    :param run_ids: the ids of its runs.
    :param status: ``success`` or ``failed``; ``timeout`` or ``error`` in an event.
    :param message: the one-line summary.
    :param verdict: the decision (gives ``outcome`` and ``reason``).
    """
    return {
        "job_id": job_id,
        "run_ids": list(run_ids),
        "status": status,
        "outcome": verdict.outcome.to_dict() if verdict else None,
        "reason": verdict.reason if verdict else None,
        "message": message,
    }


def run_result_of(event: dict[str, Any]) -> dict[str, Any]:
    """Return the XCom value held in a run trigger's event (the event without what only the task needs)."""
    return {key: event.get(key) for key in RUN_RESULT_KEYS}


# ----- snapshots ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownFiles:
    """
    What a run's output files were before a snapshot was asked for, in a bounded form.

    Trigger kwargs live in the metadata database, so the ids of every output file cannot travel
    there: a file is known when it was uploaded no later than the newest file listed then
    (strictly before ``uploaded_until``, by the service's own clock), or when it is one of the few ids kept
    (``ids``: the files of that last moment, and the previous snapshot, which may still be uploading).

    :param uploaded_until: the newest ``dateUploaded`` listed before the request (``None``: no file).
    :param ids: the ids known besides, at most :data:`MAX_KNOWN_IDS`.
    """

    uploaded_until: str | None = None
    ids: tuple[str, ...] = ()

    @classmethod
    def of(cls, files: Sequence[OutputFile], *extra_ids: str | None) -> KnownFiles:
        """
        Return what ``files`` (listed before the request) and ``extra_ids`` make known.

        More files of the newest moment (or of no stated date) than :data:`MAX_KNOWN_IDS` could not
        be told from a new snapshot: that is an error, not a guess.
        """
        dates = [f.date_uploaded for f in files if f.date_uploaded]
        newest = max(dates, key=_instant) if dates else None
        last_moment = [f.id for f in files if f.date_uploaded is None or f.date_uploaded == newest]
        ids = tuple(dict.fromkeys(i for i in (*extra_ids, *last_moment) if i))
        if len(ids) > MAX_KNOWN_IDS:
            raise RescaleApiError(
                f"{len(ids)} output files share the newest upload date (or have none): more than the "
                f"{MAX_KNOWN_IDS} a snapshot wait can keep to tell the new snapshot from them"
            )
        return cls(newest, ids)

    @cached_property
    def _until(self) -> datetime | None:
        return None if self.uploaded_until is None else _instant(self.uploaded_until)

    def knows(self, file: OutputFile) -> bool:
        """Whether ``file`` was there before the request."""
        if file.id in self.ids:
            return True
        if self._until is None or not file.date_uploaded:
            return False
        # Strictly before: a file of that same moment is known only by its id (one may be new).
        return _instant(file.date_uploaded) < self._until

    def to_dict(self) -> dict[str, Any]:
        """Return the plain form trigger kwargs carry."""
        return {"uploaded_until": self.uploaded_until, "ids": list(self.ids)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> KnownFiles:
        """Rebuild from :meth:`to_dict` output."""
        data = data or {}
        return cls(data.get("uploaded_until"), tuple(str(i) for i in (data.get("ids") or ())[:MAX_KNOWN_IDS]))


def _instant(text: str) -> datetime:
    """Read an ISO 8601 upload date; an unreadable one sorts first (it never makes a file new)."""
    try:
        parsed = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def pick_new_snapshot(files: Sequence[OutputFile], known: Sequence[str] | KnownFiles) -> OutputFile | None:
    """
    Return the output file that is the new snapshot, or ``None`` while it has not appeared.

    A snapshot appears as a run output file under an id nobody knows in advance: it is the file
    not there before the request; when several new files appear (the run completed meanwhile and
    uploaded all its outputs), the one whose name says ``snapshot`` and was uploaded last.

    :param files: the run's output files now.
    :param known: what was there before the request (:class:`KnownFiles`, or a list of ids).
    """
    known = known if isinstance(known, KnownFiles) else KnownFiles(None, tuple(known))
    new = [f for f in files if not known.knows(f) and f.is_uploaded]
    if len(new) <= 1:
        return new[0] if new else None
    named = [f for f in new if "snapshot" in f.relative_path.lower()] or new
    return max(named, key=lambda f: f.date_uploaded or "")
