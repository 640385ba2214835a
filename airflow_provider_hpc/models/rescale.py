"""
Rescale's answers as values: runs and their variables, output files, job statuses and outcomes.

Every ``from_api``/``*_from_answer`` reads an untrusted answer and raises
:class:`~airflow_provider_hpc.exceptions.RescaleApiError` for one that does not have the documented shape.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow_provider_hpc.exceptions import RescaleApiError
from airflow_provider_hpc.models.values import SHORT_TEXT, bounded, capped, optional_int, optional_text

# Statuses on the way to Completed that mean the job did not succeed, whatever the final reason says.
FAILURE_STATUSES = frozenset({"stopping", "stopped", "failed", "terminated", "terminating"})
#: Bounds on what is kept of echoed fields: run variables, reasons, paths, the status history shown.
MAX_RUN_VARIABLES = 200
REASON_CHARS = 500
PATH_CHARS = 4096
MAX_HISTORY = 20
MAX_ANALYSES = 20
#: The most lines one tail request asks for and keeps (the API reads them from the end of the file).
MAX_TAIL_LINES = 1000
TAIL_LINE_CHARS = 1000
#: The largest followed file read whole from a completed run's outputs, to show the lines its tail missed.
MAX_FOLLOWED_FILE_BYTES = MAX_TAIL_LINES * TAIL_LINE_CHARS
MAX_INPUT_FILES = 1000
_SUCCESS_WORD = re.compile(r"\bsuccess", re.IGNORECASE)
_NEGATED_SUCCESS = re.compile(r"\b(?:not|no|never)\s+(?:\w+\s+)?success", re.IGNORECASE)


@dataclass(frozen=True)
class RunVariable:
    """A run's variable: ``name``, numeric ``value`` and ``displayValue``."""

    name: str
    value: Any
    display_value: str | None = None
    is_relative: bool = False


@dataclass(frozen=True)
class RescaleRun:
    """
    One run of a Rescale job.

    :param id: the run id within the job.
    :param date_started: ISO 8601 start, ``None`` until started.
    :param date_completed: ISO 8601 end, ``None`` until the run completed.
    :param type: 1 optimization, 2 iteration, 3 case.
    """

    id: str
    date_started: str | None = None
    date_completed: str | None = None
    display_order: int | None = None
    is_optimal: bool = False
    output_file_count: int | None = None
    output_file_size: int | None = None
    parent: str | None = None
    type: int | None = None
    variables: tuple[RunVariable, ...] = ()

    @property
    def is_completed(self) -> bool:
        """Whether the run has completed (its output files can be listed)."""
        return bool(self.date_completed)

    @property
    def variables_dict(self) -> dict[str, Any]:
        """The variables as ``{name: value}``."""
        return {v.name: v.value for v in self.variables}

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (XCom, trigger events)."""
        data = asdict(self)
        data["variables"] = self.variables_dict
        return data

    @classmethod
    def from_api(cls, data: Any) -> RescaleRun:
        """Parse a run object of the API; a malformed one is a :class:`RescaleApiError`."""
        if not isinstance(data, dict) or data.get("id") in (None, ""):
            raise RescaleApiError("A run object has no id", excerpt=str(data)[:300])
        listed = data.get("variables")
        variables = tuple(
            RunVariable(
                name=optional_text(v.get("name")) or "",
                value=bounded(v.get("value"), text_limit=SHORT_TEXT, items=0),
                display_value=optional_text(v.get("displayValue")),
                is_relative=bool(v.get("isRelative")),
            )
            for v in (listed if isinstance(listed, list) else [])[:MAX_RUN_VARIABLES]
            if isinstance(v, dict) and v.get("name") is not None
        )
        return cls(
            id=optional_text(data["id"]) or "",
            date_started=optional_text(data.get("dateStarted")),
            date_completed=optional_text(data.get("dateCompleted")),
            display_order=optional_int(data.get("displayOrder")),
            is_optimal=bool(data.get("isOptimal")),
            output_file_count=optional_int(data.get("outputFileCount")),
            output_file_size=optional_int(data.get("outputFileSize")),
            parent=optional_text(data.get("parent")),
            type=optional_int(data.get("type")),
            variables=variables,
        )


@dataclass(frozen=True)
class OutputFile:
    """
    One output file of a run, as listed by ``GET .../runs/{run_id}/files/``.

    :param relative_path: the path under the run's folder (untrusted: join it with ``safe_join``).
    :param decrypted_size: the size in bytes.
    :param md5: the hex md5 of the bytes.
    """

    id: str
    name: str
    relative_path: str
    decrypted_size: int | None = None
    md5: str | None = None
    path: str | None = None
    date_uploaded: str | None = None
    is_uploaded: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_api(cls, data: Any) -> OutputFile:
        """Parse a file object of the API."""
        if not isinstance(data, dict) or not data.get("id"):
            raise RescaleApiError("An output file object has no id", excerpt=str(data)[:300])
        name = data.get("name") if isinstance(data.get("name"), str) else ""
        relative = data.get("relativePath") if isinstance(data.get("relativePath"), str) else ""
        if len(relative) > PATH_CHARS or len(name) > PATH_CHARS:
            raise RescaleApiError(f"An output file's relativePath or name is longer than {PATH_CHARS} characters")
        if not (relative or name):
            raise RescaleApiError("An output file object has neither relativePath nor name", excerpt=str(data)[:300])
        return cls(
            id=optional_text(data["id"]) or "",
            name=name,
            relative_path=relative or name,
            decrypted_size=optional_int(data.get("decryptedSize")),
            md5=data.get("md5") if isinstance(data.get("md5"), str) else None,
            path=optional_text(data.get("path"), PATH_CHARS),
            date_uploaded=optional_text(data.get("dateUploaded")),
            is_uploaded=bool(data.get("isUploaded", True)),
        )


@dataclass(frozen=True)
class JobStatus:
    """One entry of a job's status history."""

    status: str
    status_date: datetime
    status_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {"status": self.status, "statusDate": self.status_date.isoformat(), "statusReason": self.status_reason}


@dataclass(frozen=True)
class JobOutcome:
    """
    Whether a job's history says it succeeded, read from its statuses sorted by date.

    :param completed: a ``Completed`` status is present.
    :param succeeded: completed, with no stop or failure on the way and no failure reason.
    :param reason: why it did not succeed (or the success reason).
    """

    completed: bool
    succeeded: bool
    reason: str | None = None
    history: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Return the outcome as JSON-able values (trigger events, XCom)."""
        return {"completed": self.completed, "succeeded": self.succeeded, "reason": self.reason, "history": list(self.history)}

    @classmethod
    def from_statuses(cls, statuses: list[JobStatus]) -> JobOutcome:
        """Decide from a date-sorted status history."""
        history = tuple(s.status for s in statuses[-MAX_HISTORY:])
        completed = [s for s in statuses if s.status.lower() == "completed"]
        if not completed:
            return cls(completed=False, succeeded=False, reason=None, history=history)
        final = completed[-1]
        troubled = [s for s in statuses if s.status.lower() in FAILURE_STATUSES]
        if troubled:
            return cls(True, False, troubled[0].status_reason or troubled[0].status, history)
        reason = (final.status_reason or "").strip()
        # "Completed successfully" is the good reason; "unsuccessfully" / "not successful" are not.
        succeeded = not reason or (bool(_SUCCESS_WORD.search(reason)) and not _NEGATED_SUCCESS.search(reason))
        return cls(True, succeeded, reason or None, history)


@dataclass(frozen=True)
class SnapshotResult:
    """What a snapshot request answered: ``lastSnapshotID`` is the file id of the previous snapshot."""

    exitcode: int | None
    last_snapshot_id: str | None
    reason: str | None = None
    data: str | None = None

    @classmethod
    def from_api(cls, answer: Any) -> SnapshotResult:
        """Parse a snapshot answer (``{"data", "exitcode", "lastSnapshotID", "reason"}``)."""
        if not isinstance(answer, dict):
            raise RescaleApiError("The snapshot answer is not a JSON object", excerpt=str(answer)[:300])
        last = answer.get("lastSnapshotID")
        return cls(
            exitcode=optional_int(answer.get("exitcode")),
            last_snapshot_id=str(last) if last not in (None, "") else None,
            reason=optional_text(answer.get("reason"), REASON_CHARS),
            data=optional_text(answer.get("data"), REASON_CHARS),
        )


@dataclass(frozen=True)
class RescaleJob:
    """
    A Rescale job as created or read (``POST /api/v2/jobs/``, ``GET /api/v2/jobs/{job_id}/``).

    :param id: the job id (five letters or so, e.g. ``QTVia``).
    :param name: the job's name.
    :param input_file_ids: the ids of the input files its analyses refer to.
    :param date_inserted: when it was created, as the service says (ISO 8601), if it says.
    """

    id: str
    name: str = ""
    input_file_ids: tuple[str, ...] = ()
    date_inserted: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (XCom)."""
        return {**asdict(self), "input_file_ids": list(self.input_file_ids)}

    @classmethod
    def from_api(cls, data: Any) -> RescaleJob:
        """Parse a job object of the API; one without an id is a :class:`RescaleApiError`."""
        if not isinstance(data, dict) or data.get("id") in (None, ""):
            raise RescaleApiError("A job object has no id", excerpt=str(data)[:300])
        analyses = data.get("jobanalyses") if isinstance(data.get("jobanalyses"), list) else []
        inputs = [
            optional_text(item.get("id")) or ""
            for analysis in analyses[:MAX_ANALYSES] if isinstance(analysis, dict)
            for item in (analysis.get("inputFiles") or [])[:MAX_INPUT_FILES] if isinstance(item, dict)
        ]
        return cls(
            id=optional_text(data["id"]) or "",
            name=optional_text(data.get("name"), REASON_CHARS) or "",
            input_file_ids=tuple(i for i in inputs if i),
            date_inserted=optional_text(data.get("dateInserted")),
        )


@dataclass(frozen=True)
class DirectoryEntry:
    """A file of an in-progress run's working folder."""

    path: str
    resource: str | None = None


def directory_from_answer(answer: Any) -> list[DirectoryEntry]:
    """Parse a ``directory-contents`` answer (a plain list of ``{path, resource}``)."""
    if not isinstance(answer, list):
        raise RescaleApiError("directory-contents did not answer a list", excerpt=str(answer)[:300])
    return [DirectoryEntry(path=str(e["path"]), resource=e.get("resource")) for e in answer if isinstance(e, dict) and e.get("path")]


def tail_lines_from_answer(answer: Any) -> list[str]:
    """Parse a ``tail`` answer (``{"fileType", "lines"}``) into its lines."""
    lines = answer.get("lines") if isinstance(answer, dict) else None
    if not isinstance(lines, list):
        raise RescaleApiError("tail did not answer a lines list", excerpt=str(answer)[:300])
    # Each line lands in a log line: the last MAX_TAIL_LINES, each cut to TAIL_LINE_CHARS.
    return [capped(str(line), TAIL_LINE_CHARS) for line in lines[-MAX_TAIL_LINES:]]


def text_lines_from_bytes(body: bytes) -> tuple[list[str], int]:
    """
    Split a text file's bytes into lines as ``tail`` answers them; return the last ones and how many came before.

    Lines end at ``\n`` (a ``\r`` before it is dropped), undecodable bytes are replaced, and, as
    for a tail, only the last :data:`MAX_TAIL_LINES` are kept, each cut to :data:`TAIL_LINE_CHARS`.

    :param body: the file's bytes (bounded by the caller).
    """
    text = body.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    lines = text.split("\n") if text else []
    kept = lines[-MAX_TAIL_LINES:]
    return [capped(line.rstrip("\r"), TAIL_LINE_CHARS) for line in kept], len(lines) - len(kept)


def statuses_from_answer(answer: Any) -> list[JobStatus]:
    """Parse a job's statuses answer, sorted by ``statusDate`` (the API's order is not reliable)."""
    items = answer.get("results") if isinstance(answer, dict) else answer
    if not isinstance(items, list):
        raise RescaleApiError("statuses did not answer a results list", excerpt=str(answer)[:300])
    statuses = []
    for item in items:
        if not isinstance(item, dict) or not item.get("status"):
            continue
        reason = item.get("statusReason")
        if reason is not None and not isinstance(reason, str):
            reason = json.dumps(reason, default=str)  # read as text rather than refused: it is only shown
        statuses.append(
            JobStatus(optional_text(item["status"]) or "", _status_date(item.get("statusDate")), optional_text(reason, REASON_CHARS))
        )
    return sorted(statuses, key=lambda s: s.status_date)


def _status_date(value: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise RescaleApiError(f"Unreadable statusDate {str(value)[:50]!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
