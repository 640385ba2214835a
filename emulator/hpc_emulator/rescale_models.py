"""
The records of the Rescale emulator: jobs, runs, input and output files, status entries.

They render themselves as the API shows them (``to_json``); ``rescale_runs.py`` changes them under
its lock, and ``rescale.py`` serves them. The job bodies and their validation are in
``rescale_spec.py``.
"""

from __future__ import annotations

import base64
import enum
import itertools
import random
import secrets
import string
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpc_emulator.rescale_spec import JobSpec

ID_ALPHABET = string.ascii_letters + string.digits
OWNER = "demouser@rescale.com"
USER_FOLDER = "user_emUla"
# File types of Rescale's file records.
INPUT_FILE_TYPE = 1
OUTPUT_FILE_TYPE = 5


class EngineError(Exception):
    """A request the engine refuses; ``str(exc)`` is the ``detail`` sent back with ``status_code``."""

    status_code = 400


class NotInProgressError(EngineError):
    """The operation applies only to a run that is in progress."""


class InvalidPathError(EngineError):
    """A path points outside the run's working folder, or is not a path at all."""


class MissingFileError(EngineError):
    """No such file in the run's working folder."""

    status_code = 404


class ServiceStoppingError(EngineError):
    """The server is stopping and starts nothing new."""

    status_code = 503


class RunState(enum.Enum):
    """Where a run is in its life: not started, its process running, outputs uploading, done."""

    PENDING = "pending"
    RUNNING = "running"
    FINISHING = "finishing"
    COMPLETED = "completed"


@dataclass(frozen=True)
class StatusEntry:
    """One entry of a job's status history."""

    status: str
    date: datetime
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        """Return the entry as the statuses endpoint shows it."""
        return {"status": self.status, "statusDate": iso(self.date), "statusReason": self.reason}


def new_file_fields(disk_path: Path, size: int, md5: str) -> dict[str, Any]:
    """Return the fields every new file record starts with: its bytes' place, size, md5, date, key."""
    return {
        "disk_path": disk_path,
        "size": size,
        "md5": md5,
        "date_uploaded": utc_now(),
        "encryption_key": base64.b64encode(secrets.token_bytes(32)).decode(),
    }


def file_json(
    item: InputFile | OutputFile, type_id: int, path: str, view_in_browser: bool
) -> dict[str, Any]:
    """Return a file record as Rescale's file endpoints show it, whatever its type."""
    return {
        "typeId": type_id,
        "name": item.relative_path.rsplit("/", 1)[-1],
        "dateUploaded": iso(item.date_uploaded),
        "relativePath": item.relative_path,
        "encodedEncryptionKey": item.encryption_key,
        "sharedWith": [],
        "decryptedSize": item.size,
        "owner": OWNER,
        "path": path,
        "isUploaded": True,
        "viewInBrowser": view_in_browser,
        "id": item.id,
        "md5": item.md5,
    }


@dataclass(frozen=True)
class OutputFile:
    """An uploaded run output file; ``disk_path`` is where its bytes are."""

    id: str
    job_id: str
    run_id: str
    relative_path: str
    disk_path: Path
    size: int
    md5: str
    date_uploaded: datetime
    encryption_key: str

    def to_json(self) -> dict[str, Any]:
        """Return the file as the output-files endpoint shows it."""
        path = f"user/{USER_FOLDER}/output/job_{self.job_id}/run{self.run_id}/{self.relative_path}"
        return file_json(self, OUTPUT_FILE_TYPE, path, view_in_browser=True)


@dataclass(frozen=True)
class InputFile:
    """
    A file uploaded with ``POST files/contents/``, for jobs to name in their ``inputFiles``.

    ``storage_name`` is its name in the user's storage folder: the real service inserts a UUID
    into the name (``airfoil2d-06feda72-….zip``), so two uploads of one name never collide.
    """

    id: str
    name: str
    disk_path: Path
    size: int
    md5: str
    date_uploaded: datetime
    encryption_key: str
    storage_name: str

    @property
    def relative_path(self) -> str:
        """Return the file's path relative to a run's working folder: its name."""
        return self.name

    def to_json(self) -> dict[str, Any]:
        """Return the file as the upload answer and a job's ``inputFiles`` show it."""
        return file_json(self, INPUT_FILE_TYPE, f"user/{USER_FOLDER}/{self.storage_name}", view_in_browser=False)


@dataclass(eq=False)
class Run:
    """One run of a job, its process and its output files."""

    job_id: str
    id: str
    display_order: int
    spec: RunSpec
    folder: Path
    state: RunState = RunState.PENDING
    date_started: datetime | None = None
    date_completed: datetime | None = None
    exit_code: int | None = None
    stopped: bool = False
    process: subprocess.Popen[bytes] | None = None
    # Replaced, never mutated in place, so a reader holding the old list sees a consistent one.
    files: tuple[OutputFile, ...] = ()
    snapshot_ids: list[str] = field(default_factory=list)
    snapshot_threads: list[threading.Thread] = field(default_factory=list)

    @property
    def work_dir(self) -> Path:
        """Return the run's working folder."""
        return self.folder / "work"

    @property
    def snapshot_dir(self) -> Path:
        """Return where the run's snapshot archives are written."""
        return self.folder / "snapshots"

    @property
    def in_progress(self) -> bool:
        """Tell whether the run's node is up: started and its outputs not yet uploaded."""
        return self.state in (RunState.RUNNING, RunState.FINISHING)

    @property
    def active(self) -> bool:
        """Tell whether the run still has work to do (not started, or its process running)."""
        return not self.stopped and self.state in (RunState.PENDING, RunState.RUNNING)

    def to_json(self) -> dict[str, Any]:
        """Return the run as the runs endpoints show it."""
        return {
            "dateCompleted": iso(self.date_completed),
            "dateStarted": iso(self.date_started),
            "displayOrder": self.display_order,
            "id": self.id,
            "isOptimal": self.spec.is_optimal,
            "outputFileCount": len(self.files),
            "outputFileSize": sum(f.size for f in self.files),
            "parent": None,
            "type": self.spec.run_type,
            "variables": [
                {"displayValue": display_value(value), "isRelative": False, "name": name, "value": value}
                for name, value in self.spec.variables
            ],
        }


@dataclass(eq=False)
class Job:
    """One job: its spec, its runs and its status history."""

    id: str
    spec: JobSpec
    date_inserted: datetime
    runs: list[Run] = field(default_factory=list)
    statuses: list[StatusEntry] = field(default_factory=list)
    submitted: bool = False
    finished: bool = False
    stop_requested: bool = False
    # Set on stop so every emulated wait of the job ends at once.
    wake: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        """Return the job as the jobs endpoints show it: the body as stored, defaults filled in."""
        return {
            "id": self.id,
            "name": self.spec.name,
            "owner": OWNER,
            "dateInserted": iso(self.date_inserted),
            "jobanalyses": [analysis.to_json() for analysis in self.spec.analyses],
            **self.spec.job_fields(),
        }

    def summary_json(self) -> dict[str, Any]:
        """Return the job as the job list shows it (Rescale's short form)."""
        names = list(dict.fromkeys(analysis.display_name for analysis in self.spec.analyses))
        storage = sum(item.size for item in self.spec.input_files)
        storage += sum(item.size for run in self.runs for item in run.files)
        return {
            "analysisNames": names,
            "clusterStatusDisplay": _status_display(self._cluster_status()),
            "dateInserted": iso(self.date_inserted),
            "id": self.id,
            "isVisible": True,
            "jobStatus": _status_display(self.statuses[-1].status if self.statuses else ""),
            "name": self.spec.name,
            "owner": OWNER,
            "sharedWith": [],
            "storage": storage,
        }

    def _cluster_status(self) -> str:
        if self.finished:
            return "Stopped"
        return "Running" if self.submitted else ""


def _status_display(content: str) -> dict[str, Any]:
    return {"content": content, "labelClass": "", "useLabel": False}


def iso(moment: datetime | None) -> str | None:
    """Format a UTC datetime as Rescale does (``2015-02-18T03:09:14.667000Z``); None stays None."""
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def display_value(value: float) -> str:
    """Format a variable value as the template would receive it: ``20`` for 20.0, ``3.5``."""
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def utc_now() -> datetime:
    """Return the current UTC time."""
    return datetime.now(timezone.utc)


def random_id(length: int) -> str:
    """Return a random id of letters and digits, like Rescale's ``QTVia``."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(length))


def unsorted_statuses(job_id: str, statuses: Sequence[StatusEntry]) -> list[StatusEntry]:
    """
    Return the statuses in a stable order that is neither oldest-first nor newest-first.

    The real endpoint's order is unreliable; a client must sort by ``statusDate`` itself, and a
    client that does not is caught at once instead of by luck.
    """
    ordered = list(statuses)
    if len(ordered) < 3:
        return ordered[::-1]
    for attempt in itertools.count():
        shuffled = list(ordered)
        random.Random(f"{job_id}/{len(ordered)}/{attempt}").shuffle(shuffled)
        if shuffled != ordered and shuffled != ordered[::-1]:
            return shuffled
    raise AssertionError("unreachable")  # pragma: no cover
