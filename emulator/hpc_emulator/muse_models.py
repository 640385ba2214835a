"""
The records of the Muse emulator: its error shape, the run parameters, SLURM wall times, jobs.

They render themselves as the reference pages show them (``body``, ``echo``, ``report``);
``muse_engine.py`` changes them, and ``muse.py`` serves them.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_emulator.software import Software

if TYPE_CHECKING:
    from hpc_emulator.muse_forms import RequestBody

STDOUT_NAME = "__WS__stdout.txt"
STDERR_NAME = "__WS__stderr.txt"
STDIN_NAME = "stdin.txt"
RETURNED_TYPES = ("stdout", "stdout.txt", "run.zip")
_TIME_OPTION = re.compile(r"^(?:--time|-t|time)(?:=|\s+)(.+)$")


# --------------------------------------------------------------------------------------- errors


class MuseError(Exception):
    """
    An answer in Muse's documented error shape: ``{"error": text, "more": [...], "type": type}``.

    :param status: the HTTP status to answer with.
    :param error: the error text.
    :param error_type: the error type.
    :param more: details, a list of texts.
    """

    def __init__(self, status: int, error: str, error_type: str, more: list[Any] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.error_type = error_type
        self.more = more or []

    def body(self) -> dict[str, Any]:
        """Return the documented error shape."""
        return {"error": self.error, "more": self.more, "type": self.error_type}



def bad_request(error: str, *more: str) -> MuseError:
    """Return the 400 answer (``ValidationError``) of a missing or invalid parameter."""
    return MuseError(400, error, "ValidationError", list(more))



# ----------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class RunRequest:
    """The run parameters, checked, as the report echoes them."""

    cmd: str
    cmd_option: str
    returned_type: str
    todownload: bool
    files_order: list[str] | None
    sbatch_list: list[str]
    module_list: list[str]

    @classmethod
    def from_body(cls, body: RequestBody, cluster: bool) -> RunRequest:
        """Check and return the run parameters of a POST, or raise a 400 :class:`MuseError`."""
        returned_type = body.text("returned_type", "stdout").strip() or "stdout"
        if returned_type not in RETURNED_TYPES:
            raise bad_request(
                f"Unavailable returned_type value {returned_type!r}.", f"Available values: {list(RETURNED_TYPES)}."
            )
        return cls(
            cmd=body.text("cmd", ""),
            cmd_option=body.text("cmd_option", ""),
            returned_type=returned_type,
            todownload=_parse_todownload(body.one("todownload", "no")),
            files_order=body.text_list("files_order"),
            sbatch_list=(body.text_list("sbatch_list") or []) if cluster else [],
            module_list=(body.text_list("module_list") or []) if cluster else [],
        )

    def echo(self, ordered_filenames: list[str], cluster: bool) -> dict[str, Any]:
        """Return the ``report.request`` echo of the reference examples."""
        echoed: dict[str, Any] = {
            "cmd": self.cmd,
            "cmd_option": self.cmd_option,
            "ordered_filename_list": ordered_filenames,
            "returned_type": self.returned_type,
            "todownload": self.todownload,
        }
        if cluster:
            echoed["sbatch_list"] = self.sbatch_list
            echoed["module_list"] = self.module_list
        return echoed


def _parse_todownload(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "1"):
        return True
    if text in ("no", "false", "0", ""):
        return False
    raise bad_request(f"Unavailable todownload value {value!r}.", "Available values: 'yes', 'no'.")


def parse_walltime(sbatch_list: list[str]) -> float | None:
    """
    Return the wall time in seconds that ``sbatch_list`` asks for (``--time``, ``-t``, ``time=``), or ``None``.

    Values follow SLURM: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``; a bare number is
    minutes; ``UNLIMITED``/``INFINITE`` mean none.
    """
    walltime: float | None = None
    items = [item.strip() for item in sbatch_list]
    for index, item in enumerate(items):
        match = _TIME_OPTION.match(item)
        if match:
            walltime = slurm_duration(match.group(1).strip())
        elif item in ("--time", "-t") and index + 1 < len(items):
            walltime = slurm_duration(items[index + 1])
    return walltime


def slurm_duration(text: str) -> float | None:
    """Return a SLURM time specification in seconds (``None`` for unlimited or 0), or raise a 400 error."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days = 0
    rest = text
    if "-" in text:
        day_text, rest = text.split("-", 1)
        days = _duration_number(day_text, text)
    parts = [_duration_number(part, text) for part in rest.split(":")] if rest else []
    if days:
        # D-H, D-H:M, D-H:M:S
        if not 1 <= len(parts) <= 3:
            raise _invalid_time(text)
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        raise _invalid_time(text)
    total = float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    # As sbatch says: "A time limit of zero requests that no time limit be imposed."
    return total or None


def _duration_number(part: str, text: str) -> int:
    if not part.isdigit():
        raise _invalid_time(text)
    return int(part)


def _invalid_time(text: str) -> MuseError:
    return bad_request(
        f"sbatch: error: Invalid --time specification {text!r}.",
        "Use minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S, e.g. --time=00:10:00.",
    )


# ------------------------------------------------------------------------------------------ jobs


class JobState(str, enum.Enum):
    """A SLURM job state, and what the Muse report makes of it."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"

    @property
    def is_final(self) -> bool:
        """Return whether the job has ended."""
        return self not in (JobState.PENDING, JobState.RUNNING)

    @property
    def cr(self) -> str:
        """Return the report's ``cr``: ``WAIT`` while in progress, ``OK`` if completed, else ``NOK``."""
        if not self.is_final:
            return "WAIT"
        return "OK" if self is JobState.COMPLETED else "NOK"

    @property
    def latest_cr(self) -> str:
        """Return the report's ``process.latest_cr``."""
        return {"WAIT": "IN_PROGRESS", "OK": "ENDED_OK", "NOK": "ENDED_NOK"}[self.cr]


@dataclass(eq=False)
class MuseJob:
    """One cluster run: its request, its folder, and where it is in its life."""

    key: str
    software: Software
    request: RunRequest
    ordered_filenames: list[str]
    folder: Path
    job_id: int
    jobname: str
    walltime: float | None
    state: JobState = JobState.PENDING
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    pid: int | None = None
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    download_key: str | None = None

    @property
    def name(self) -> str:
        """Return the software name."""
        return self.software.name

    @property
    def run_dir(self) -> Path:
        """Return the run folder: the command's working folder."""
        return self.folder / "run"

    def report(self) -> dict[str, Any]:
        """Return ``info.report`` as in the reference examples."""
        return {
            "request": self.request.echo(self.ordered_filenames, cluster=True),
            "rsrc": {"identity": "muse"},
            "process": {
                "jobname": self.jobname,
                "job_id": self.job_id,
                "latest_cr": self.state.latest_cr,
                "latest_state": self.state.value,
            },
            "name": self.name,
            "cr": self.state.cr,
        }

    def describe(self) -> dict[str, Any]:
        """Return the job's emulator-side facts, for ``GET /_emulator/muse/jobs``."""
        return {
            "key": self.key,
            "name": self.name,
            "job_id": self.job_id,
            "jobname": self.jobname,
            "state": self.state.value,
            "cmd": self.request.cmd,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "walltime": self.walltime,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "run_dir": str(self.run_dir),
        }


@dataclass(frozen=True)
class LocalRun:
    """An off-cluster run that has ended: its folder, request and exit status."""

    software: Software
    request: RunRequest
    ordered_filenames: list[str]
    folder: Path
    exit_code: int

    @property
    def run_dir(self) -> Path:
        """Return the run folder."""
        return self.folder / "run"

    def report(self) -> dict[str, Any]:
        """Return ``info.report`` as in the off-cluster examples (no ``rsrc`` nor ``process``)."""
        return {
            "name": self.software.name,
            "request": self.request.echo(self.ordered_filenames, cluster=False),
            "cr": "OK" if self.exit_code == 0 else "NOK",
        }
