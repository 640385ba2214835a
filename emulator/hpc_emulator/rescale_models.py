"""
The records of the Rescale emulator: job bodies and their validation, jobs, runs, output files.

They render themselves as the API shows them (``to_json``); ``rescale_runs.py`` changes them under
its lock, and ``rescale.py`` serves them.
"""

from __future__ import annotations

import enum
import itertools
import math
import random
import re
import secrets
import string
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ID_ALPHABET = string.ascii_letters + string.digits
OWNER = "demouser@rescale.com"
USER_FOLDER = "user_emUla"
RUN_TYPES = frozenset({1, 2, 3})
MAX_RUNS = 10_000
MAX_CONCURRENT_RUNS = 64
DEFAULT_CONCURRENT_RUNS = 8
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class EngineError(Exception):
    """A request the engine refuses; ``str(exc)`` is the ``detail`` sent back with ``status_code``."""

    status_code = 400


class JobSpecError(EngineError):
    """The job body cannot be accepted."""


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
class RunSpec:
    """One run as the job body asks for it: its variables (name, value), ``isOptimal``, ``type``."""

    variables: tuple[tuple[str, float], ...] = ()
    is_optimal: bool = False
    run_type: int = 3


@dataclass(frozen=True)
class JobSpec:
    """A validated job body (see :func:`parse_job_spec` for the accepted shape)."""

    name: str
    commands: tuple[str, ...]
    runs: tuple[RunSpec, ...]
    completed_reason: str | None = None
    max_concurrent_runs: int = DEFAULT_CONCURRENT_RUNS


@dataclass(frozen=True)
class StatusEntry:
    """One entry of a job's status history."""

    status: str
    date: datetime
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        """Return the entry as the statuses endpoint shows it."""
        return {"status": self.status, "statusDate": iso(self.date), "statusReason": self.reason}


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
        return {
            "typeId": 5,
            "name": self.relative_path.rsplit("/", 1)[-1],
            "dateUploaded": iso(self.date_uploaded),
            "relativePath": self.relative_path,
            "encodedEncryptionKey": self.encryption_key,
            "sharedWith": [],
            "decryptedSize": self.size,
            "owner": OWNER,
            "path": f"user/{USER_FOLDER}/output/job_{self.job_id}/run{self.run_id}/{self.relative_path}",
            "isUploaded": True,
            "viewInBrowser": True,
            "id": self.id,
            "md5": self.md5,
        }


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
        """Return the job as the jobs endpoints show it."""
        return {
            "id": self.id,
            "name": self.spec.name,
            "owner": OWNER,
            "dateInserted": iso(self.date_inserted),
            "jobanalyses": [{"command": command} for command in self.spec.commands],
        }


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


def parse_job_spec(body: Any) -> JobSpec:
    """
    Validate a job-creation body and return its spec, or raise :class:`JobSpecError`.

    Accepted (unknown keys are ignored, as the real service does)::

        {"name": "sweep",
         "jobanalyses": [{"command": "echo $x > out.txt"}],
         "runs": [{"variables": {"x": 1.5}, "isOptimal": false, "type": 3}],
         "emulator": {"completedReason": "Exceeded max number of restarts", "maxConcurrentRuns": 8}}
    """
    if not isinstance(body, Mapping):
        raise JobSpecError("Expected a JSON object.")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise JobSpecError("name: this field is required and must be a non-empty string.")
    runs_body = body.get("runs")
    runs = (RunSpec(),) if runs_body is None else _parse_runs(runs_body)
    reason, concurrency = _parse_emulator_options(body.get("emulator"))
    return JobSpec(name, _parse_commands(body.get("jobanalyses")), runs, reason, concurrency)


def _parse_commands(analyses: Any) -> tuple[str, ...]:
    if not isinstance(analyses, list) or not analyses:
        raise JobSpecError("jobanalyses: a non-empty list of {\"command\": str} is required.")
    commands = []
    for index, analysis in enumerate(analyses):
        command = analysis.get("command") if isinstance(analysis, Mapping) else None
        if not isinstance(command, str) or not command.strip():
            raise JobSpecError(f"jobanalyses[{index}].command: a non-empty string is required.")
        commands.append(command)
    return tuple(commands)


def _parse_runs(runs: Any) -> tuple[RunSpec, ...]:
    if not isinstance(runs, list) or not 1 <= len(runs) <= MAX_RUNS:
        raise JobSpecError(f"runs: a list of 1 to {MAX_RUNS} run objects is expected.")
    return tuple(_parse_run(index, run) for index, run in enumerate(runs))


def _parse_run(index: int, run: Any) -> RunSpec:
    if not isinstance(run, Mapping):
        raise JobSpecError(f"runs[{index}]: expected an object.")
    variables = run.get("variables", {})
    if not isinstance(variables, Mapping):
        raise JobSpecError(f"runs[{index}].variables: expected an object of name: number.")
    parsed = tuple((name, _parse_value(index, name, value)) for name, value in variables.items())
    is_optimal = run.get("isOptimal", False)
    run_type = run.get("type", 3)
    if not isinstance(is_optimal, bool):
        raise JobSpecError(f"runs[{index}].isOptimal: expected a boolean.")
    if run_type not in RUN_TYPES or isinstance(run_type, bool):
        raise JobSpecError(f"runs[{index}].type: expected 1 (optimization), 2 (iteration) or 3 (case).")
    return RunSpec(parsed, is_optimal, run_type)


def _parse_value(index: int, name: Any, value: Any) -> float:
    # Variables become environment variables, so their names must be valid shell names.
    if not isinstance(name, str) or not _VARIABLE_NAME.match(name):
        raise JobSpecError(f"runs[{index}].variables: {name!r} is not a valid variable name.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JobSpecError(f"runs[{index}].variables.{name}: expected a finite number.")
    return float(value)


def _parse_emulator_options(options: Any) -> tuple[str | None, int]:
    if options is None:
        return None, DEFAULT_CONCURRENT_RUNS
    if not isinstance(options, Mapping):
        raise JobSpecError("emulator: expected an object.")
    reason = options.get("completedReason")
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise JobSpecError("emulator.completedReason: expected a non-empty string.")
    concurrency = options.get("maxConcurrentRuns", DEFAULT_CONCURRENT_RUNS)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise JobSpecError("emulator.maxConcurrentRuns: expected an integer.")
    if not 1 <= concurrency <= MAX_CONCURRENT_RUNS:
        raise JobSpecError(f"emulator.maxConcurrentRuns: expected 1 to {MAX_CONCURRENT_RUNS}.")
    return reason, concurrency


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
