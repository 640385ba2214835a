"""
The Muse emulator: every ``/api/`` endpoint of the reference pages, and the SLURM-like jobs behind them.

What the pages leave open is decided here, and said in ``docs/emulator.md``:

- errors always have the documented shape ``{"error", "more", "type"}``; a missing, expired or
  invalid ``jwt`` answers 401, a token below the ``user`` level 403, an unknown software name,
  run key or download key 404, any other bad request 400;
- asking a result before ``cr`` is ``OK`` answers that error shape with status **200**: the docs
  give no status, so a client must read the body's shape, and this proves it does;
- a job walks PENDING (``pending_seconds`` scaled by ``time_scale``, longer while
  ``muse_max_running`` jobs already run) → RUNNING (its command really runs) → COMPLETED (exit
  status 0), FAILED (any other), TIMEOUT (past the ``--time`` of ``sbatch_list``, SLURM formats,
  so ``time=2`` is two minutes and ``0`` no limit; real seconds, not scaled by ``time_scale``) or
  CANCELLED (``POST /_emulator/muse/cancel/{key}``: the real API has no cancel endpoint);
- while the server stops, every command is killed and new runs are refused with 503.

On disk, under ``data_dir / "muse"``::

    bin/                     the ``python`` shim runs see first on their PATH
    jobs/{key}/run/          a cluster run's folder: its working folder, uploads, __WS__std*.txt
    jobs/{key}/run.zip       its ``run.zip`` result, made once when first asked
    local/{id}/run/          an off-cluster run's folder (``POST software/run/{name}/``)
    downloads/{key}/         results kept for ``GET download/?key=``
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import time
import uuid
import zipfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

import jwt
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from airflow_provider_hpc.emulator.config import Counters, EmulatorConfig
from airflow_provider_hpc.emulator.software import (
    IMAGE_ENV,
    Software,
    SoftwareCatalogue,
    container_command,
    write_python_shim,
)

log = logging.getLogger(__name__)

STDOUT_NAME = "__WS__stdout.txt"
STDERR_NAME = "__WS__stderr.txt"
STDIN_NAME = "stdin.txt"
RETURNED_TYPES = ("stdout", "stdout.txt", "run.zip")
LEVELS = {"visitor": 1, "user": 2, "superuser": 3, "admin": 4}
JWT_ALGORITHM = "HS256"
# Job numbers as in the reference examples (``114-ws-sw_example``, job id 2459394).
FIRST_RUN_NUMBER = 114
FIRST_JOB_ID = 2459394
NODE_NAME = "muse-emu-001"
# How long SLURM lets a job end after SIGTERM before it sends SIGKILL (scaled down from KillWait).
KILL_GRACE_SECONDS = 0.5
MAX_FORM_FILES = 1000
MAX_FORM_FIELDS = 1000
COPY_CHUNK = 1024 * 1024
_DOWNLOAD_KEY = re.compile(r"^\d{8}_\d{6}_[0-9a-f-]{36}$")
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


async def muse_error_response(request: Request, exc: Exception) -> Response:
    """Turn a :class:`MuseError` into its JSON answer (registered as the app's exception handler)."""
    assert isinstance(exc, MuseError)
    return JSONResponse(exc.body(), status_code=exc.status)


def _bad_request(error: str, *more: str) -> MuseError:
    return MuseError(400, error, "ValidationError", list(more))


# --------------------------------------------------------------------------------------- tokens


class TokenService:
    """
    Issues and checks the HS256 JWTs of ``jwt/obtain/``; the signing secret lives as long as the server.

    ``exp`` is a float (allowed by RFC 7519) checked here to the sub-second, so tests can use
    lifetimes below one second; PyJWT would round it down to whole seconds.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._secret = secrets.token_bytes(32)

    def obtain(self, username: str, password: str) -> str:
        """Return a token for these credentials, or raise a 401 :class:`MuseError`."""
        user = self._config.muse_users.get(username)
        if user is None or not hmac.compare_digest(user.password.encode(), password.encode()):
            raise MuseError(
                401,
                "Unable to log in with provided credentials.",
                "AuthenticationFailed",
                ["Check the username and password of your Muse web service account."],
            )
        now = time.time()
        claims = {"username": username, "level": user.level, "iat": now, "exp": now + self._config.token_lifetime}
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM)

    def decode(self, token: str) -> dict[str, Any]:
        """Return the claims of a valid token, or raise a 401 :class:`MuseError` saying what is wrong."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                options={"verify_exp": False, "verify_iat": False, "require": ["exp", "username", "level"]},
            )
        except jwt.PyJWTError as exc:
            raise MuseError(
                401,
                f"Invalid token: the jwt value is not a valid JSON Web Token ({exc}).",
                "AuthenticationFailed",
                ["Get a token by POST jwt/obtain/ with username and password."],
            ) from None
        if float(claims["exp"]) <= time.time():
            raise MuseError(
                401,
                "Token has expired: the jwt value is no longer valid.",
                "AuthenticationFailed",
                ["Get a new token by POST jwt/obtain/ with username and password."],
            )
        return claims

    def require(self, token: Any, level: str = "user") -> dict[str, Any]:
        """Return the claims of ``token`` if it allows ``level``, or raise 401 (no/bad token) or 403."""
        if not isinstance(token, str) or not token.strip():
            raise MuseError(
                401,
                "Authentication credentials were not provided: the jwt parameter (token) is required.",
                "NotAuthenticated",
                ["Get a token by POST jwt/obtain/ with username and password, then send it as the jwt parameter."],
            )
        claims = self.decode(token.strip())
        if LEVELS.get(str(claims["level"]), 0) < LEVELS[level]:
            raise MuseError(
                403,
                f"You do not have permission to perform this action: the token's level "
                f"{claims['level']!r} is below {level!r}.",
                "PermissionDenied",
                [f"Running a software needs an account of level {level} or higher."],
            )
        return claims


# ----------------------------------------------------------------------------------- parameters


@dataclass
class RequestBody:
    """The parameters of a POST, whatever its encoding, and its uploaded ``file`` parts."""

    params: dict[str, list[Any]]
    uploads: list[UploadFile]

    def one(self, name: str, default: Any = None) -> Any:
        """Return the last value given for ``name`` (as Django's ``QueryDict.get`` does), or ``default``."""
        values = self.params.get(name)
        return values[-1] if values else default

    def text(self, name: str, default: str = "") -> str:
        """Return a text parameter; numbers are accepted and written as text."""
        value = self.one(name, None)
        if value is None:
            return default
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _bad_request(f"The {name} parameter must be a text, not {type(value).__name__}.")

    def text_list(self, name: str) -> list[str] | None:
        """Return a list parameter: a JSON list, as a string or as JSON, or one or more texts."""
        values = self.params.get(name)
        if not values:
            return None
        if len(values) > 1:
            return [self._list_item(name, value) for value in values]
        value = values[0]
        if isinstance(value, str):
            stripped = value.strip()
            if not stripped:
                return []
            if not stripped.startswith("["):
                return [stripped]
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise _bad_request(f"The {name} parameter is not a valid JSON list: {exc}.") from None
        if not isinstance(value, list):
            raise _bad_request(f"The {name} parameter must be a list of texts, e.g. '[\"a.txt\", \"b.txt\"]'.")
        return [self._list_item(name, item) for item in value]

    @staticmethod
    def _list_item(name: str, item: Any) -> str:
        if isinstance(item, str):
            return item
        raise _bad_request(f"The {name} parameter must be a list of texts, not holding {item!r}.")


async def read_body(request: Request) -> tuple[RequestBody, Any]:
    """
    Read a POST's parameters from its JSON, form-urlencoded or multipart body.

    Returns the body and the form to close once the uploads are saved (``None`` without one).
    Query-string parameters are not read: the service takes its parameters from the body.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params: dict[str, list[Any]] = defaultdict(list)
    uploads: list[UploadFile] = []
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == "file":
                    uploads.append(value)
                else:
                    # A parameter sent as a file part (some clients do): its content is the value.
                    params[name].append((await value.read()).decode("utf-8", errors="replace"))
            else:
                params[name].append(value)
        return RequestBody(params, uploads), form
    raw = await request.body()
    if not raw.strip():
        return RequestBody(params, uploads), None
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MuseError(400, f"JSON parse error: {exc}.", "ParseError") from None
        if not isinstance(data, dict):
            raise MuseError(400, "JSON parse error: the body must be a JSON object.", "ParseError")
        for name, value in data.items():
            params[name].append(value)
        return RequestBody(params, uploads), None
    raise MuseError(
        400,
        f"Unsupported media type {content_type or '(none)'!r} in request.",
        "UnsupportedMediaType",
        ["Send application/json, application/x-www-form-urlencoded or multipart/form-data."],
    )


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
            raise _bad_request(
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
    raise _bad_request(f"Unavailable todownload value {value!r}.", "Available values: 'yes', 'no'.")


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
    return _bad_request(
        f"sbatch: error: Invalid --time specification {text!r}.",
        "Use minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S, e.g. --time=00:10:00.",
    )


def safe_filename(filename: str | None) -> str:
    """Return an uploaded file's base name, or raise when it has none worth the name."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    if not name or name in (".", ".."):
        raise _bad_request(f"Uploaded file part without a usable file name ({filename!r}).")
    return name


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


class MuseEngine:
    """
    The state behind the Muse endpoints: the catalogue, tokens, jobs and downloads.

    Jobs are asyncio tasks of the server's event loop; their commands are asyncio subprocesses,
    each in its own session so a kill reaches its children too. The lock guards the tables, which
    the admin side may read from another thread.

    :param config: the emulator's settings.
    :param counters: where submissions and job ends are counted.
    """

    def __init__(self, config: EmulatorConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self.catalogue = SoftwareCatalogue(config.software_dirs)
        self.tokens = TokenService(config)
        self.root = Path(config.data_dir) / "muse"
        for sub in ("jobs", "local", "downloads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._bin_dir = write_python_shim(self.root / "bin")
        self._lock = threading.Lock()
        self._jobs: dict[str, MuseJob] = {}
        self._downloads: dict[str, Path] = {}
        self._result_locks: dict[str, asyncio.Lock] = {}
        self._local_processes: dict[int, asyncio.subprocess.Process] = {}
        self._random = random.Random(config.seed)
        self._next_run_number = FIRST_RUN_NUMBER
        self._next_job_id = FIRST_JOB_ID
        self._slots: asyncio.Semaphore | None = None
        # Set once the server is stopping: no command starts after that.
        self._closed = False

    # ----- lookups

    def software(self, name: str) -> Software:
        """Return the software called ``name``, or raise a 404 :class:`MuseError`."""
        software = self.catalogue.get(name)
        if software is None:
            raise MuseError(
                404,
                f"Unknown software name {name!r}.",
                "NotFound",
                [f"Available softwares: {self.catalogue.names()}."],
            )
        return software

    def job(self, name: str, key: str) -> MuseJob:
        """Return the job of software ``name`` with ``key``, or raise a 404 :class:`MuseError`."""
        self.software(name)
        with self._lock:
            job = self._jobs.get(key)
        if job is None or job.name != name:
            raise MuseError(
                404,
                f"Unknown key value {key!r} for software {name!r}.",
                "NotFound",
                ["The key comes from the answer of the POST software/muse/run/{name}/ request."],
            )
        return job

    def jobs(self) -> list[MuseJob]:
        """Return every cluster job, oldest first."""
        with self._lock:
            return list(self._jobs.values())

    def download(self, key: str) -> Path:
        """Return the file kept under download ``key``, or raise a 404 :class:`MuseError`."""
        with self._lock:
            path = self._downloads.get(key)
        if path is None or not path.is_file():
            raise MuseError(
                404,
                f"Unknown download key value {key!r}.",
                "NotFound",
                ["The key comes from the url of a result asked with todownload=yes."],
            )
        return path

    # ----- submitting and running

    async def submit(self, software: Software, request: RunRequest, uploads: list[UploadFile]) -> MuseJob:
        """Stage the uploads into a new run folder, register the job and start its life."""
        self._refuse_when_closed()
        walltime = parse_walltime(request.sbatch_list)
        key = str(uuid.uuid4())
        folder = self.root / "jobs" / key
        ordered = await self._prepare_folder(folder, request, uploads)
        with self._lock:
            run_number, job_id = self._next_numbers()
            job = MuseJob(
                key=key,
                software=software,
                request=request,
                ordered_filenames=ordered,
                folder=folder,
                job_id=job_id,
                jobname=f"{run_number}-ws-{software.name}",
                walltime=walltime,
            )
            self._jobs[key] = job
        self.counters.incr("muse_submissions", request.cmd)
        self.counters.incr("muse_submissions", "")
        job.task = asyncio.get_running_loop().create_task(self._drive(job), name=f"muse-job-{key}")
        return job

    async def run_now(self, software: Software, request: RunRequest, uploads: list[UploadFile]) -> LocalRun:
        """Run off-cluster: stage the uploads, run the command at once and wait for its end."""
        self._refuse_when_closed()
        folder = self.root / "local" / uuid.uuid4().hex
        ordered = await self._prepare_folder(folder, request, uploads)
        self.counters.incr("muse_offcluster_runs", request.cmd)
        process = await self._spawn(folder / "run", software, request.cmd, {})
        self._local_processes[process.pid] = process
        try:
            if self._closed:
                # The server began stopping while the command was being started.
                await self._kill(process, grace=0)
            exit_code = await process.wait()
        finally:
            # A client gone or the server stopping cancels the wait: the command must not outlive it.
            if process.returncode is None:
                _signal_group(process.pid, signal.SIGKILL)
            self._local_processes.pop(process.pid, None)
        return LocalRun(software, request, ordered, folder, exit_code)

    def _refuse_when_closed(self) -> None:
        if self._closed:
            raise MuseError(
                503,
                "The service is stopping: no new run is accepted.",
                "ServiceUnavailable",
                ["Try again once the service is back."],
            )

    def _next_numbers(self) -> tuple[int, int]:
        run_number, job_id = self._next_run_number, self._next_job_id
        self._next_run_number += 1
        # Other users' jobs share the cluster: job ids jump, as in the reference examples.
        self._next_job_id += self._random.randint(1, 1500)
        return run_number, job_id

    async def _prepare_folder(self, folder: Path, request: RunRequest, uploads: list[UploadFile]) -> list[str]:
        """Create ``folder/run`` holding the uploads, treated in order; return that order."""
        run_dir = folder / "run"
        run_dir.mkdir(parents=True)
        try:
            return await self._stage_uploads(folder / "uploads", run_dir, request.files_order, uploads)
        except BaseException:
            await run_in_threadpool(shutil.rmtree, folder, True)
            raise

    async def _stage_uploads(
        self, staging: Path, run_dir: Path, files_order: list[str] | None, uploads: list[UploadFile]
    ) -> list[str]:
        """
        Save the uploads, then treat them as the service does: for each name in order, copy it
        into the run folder (overwriting) and unzip it if it is a zip. Names that ``files_order``
        leaves out follow in upload order.
        """
        staging.mkdir()
        saved: dict[str, Path] = {}
        for upload in uploads:
            name = safe_filename(upload.filename)
            saved[name] = staging / name
            await run_in_threadpool(_save_upload, upload.file, saved[name])
        order = list(files_order or [])
        missing = [name for name in order if name not in saved]
        if missing:
            raise _bad_request(
                f"files_order names files that were not sent: {missing}.", f"Files sent: {list(saved)}."
            )
        order += [name for name in saved if name not in order]
        for name in order:
            await run_in_threadpool(_place_file, saved[name], run_dir / name)
        await run_in_threadpool(shutil.rmtree, staging, True)
        return order

    async def _drive(self, job: MuseJob) -> None:
        """Walk the job through PENDING, RUNNING and its end state."""
        try:
            await asyncio.sleep(self.config.delay(self.config.pending_seconds))
            async with self._running_slots():
                if not job.state.is_final:
                    await self._run_job(job)
        except asyncio.CancelledError:
            # A cancelled pending job, or the server shutting down: leave no process behind.
            await self._kill(job.process, grace=0)
            raise
        except Exception as exc:
            log.exception("Muse job %s could not run", job.key)
            _append_text(job.run_dir / STDERR_NAME, f"emulator: the job could not run: {exc}\n")
            self._finish(job, JobState.FAILED)

    def _running_slots(self) -> asyncio.Semaphore:
        # Made on first use so it belongs to the server's event loop.
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, self.config.muse_max_running))
        return self._slots

    async def _run_job(self, job: MuseJob) -> None:
        env = {
            "SLURM_JOB_ID": str(job.job_id),
            "SLURM_JOB_NAME": job.jobname,
            "SLURM_SUBMIT_DIR": str(job.run_dir),
            "SLURMD_NODENAME": NODE_NAME,
        }
        if self._closed:
            return
        process = await self._spawn(job.run_dir, job.software, job.request.cmd, env)
        job.process, job.pid = process, process.pid
        if job.state.is_final or self._closed:
            # Cancelled, or the server began stopping, while the process was being started.
            await self._kill(process, grace=0)
            return
        job.state, job.started_at = JobState.RUNNING, time.time()
        try:
            exit_code = await asyncio.wait_for(process.wait(), timeout=job.walltime)
        except asyncio.TimeoutError:
            if self._finish(job, JobState.TIMEOUT):
                _append_text(job.run_dir / STDERR_NAME, _slurm_cancel_line(job, "DUE TO TIME LIMIT "))
            await self._kill(process, grace=KILL_GRACE_SECONDS)
            return
        job.exit_code = exit_code
        self._finish(job, JobState.COMPLETED if exit_code == 0 else JobState.FAILED)

    def _finish(self, job: MuseJob, state: JobState) -> bool:
        """Put the job in end state ``state`` unless it already ended; return whether it changed."""
        with self._lock:
            if job.state.is_final:
                return False
            job.state, job.ended_at = state, time.time()
        self.counters.incr("muse_jobs", state.value)
        return True

    async def cancel(self, key: str) -> MuseJob:
        """Cancel a job as ``scancel`` would; an ended job stays as it is."""
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            raise MuseError(404, f"Unknown key value {key!r}.", "NotFound")
        if self._finish(job, JobState.CANCELLED):
            _append_text(job.run_dir / STDERR_NAME, _slurm_cancel_line(job, ""))
            self.counters.incr("muse_cancels", key)
            if job.process is not None:
                await self._kill(job.process, grace=KILL_GRACE_SECONDS)
            elif job.task is not None:
                job.task.cancel()
        return job

    async def _spawn(self, run_dir: Path, software: Software, cmd: str, env: Mapping[str, str]) -> asyncio.subprocess.Process:
        """Start ``cmd`` in ``run_dir`` as the container would run it, stdout/stderr to ``__WS__*.txt``."""
        command = container_command(software, cmd, run_dir)
        environment = {
            **os.environ,
            **env,
            "PATH": f"{self._bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
            IMAGE_ENV: str(software.image_dir),
        }
        stdin_path = run_dir / STDIN_NAME
        with contextlib.ExitStack() as files:
            stdout = files.enter_context(open(run_dir / STDOUT_NAME, "wb"))
            stderr = files.enter_context(open(run_dir / STDERR_NAME, "wb"))
            # The service feeds an uploaded stdin.txt to the software (example E relies on it).
            stdin: IO[bytes] | int = (
                files.enter_context(open(stdin_path, "rb")) if stdin_path.is_file() else asyncio.subprocess.DEVNULL
            )
            return await asyncio.create_subprocess_shell(
                command,
                cwd=run_dir,
                env=environment,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )

    async def _kill(self, process: asyncio.subprocess.Process | None, grace: float) -> None:
        """End a process and its children: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if process is None or process.returncode is not None:
            return
        if grace > 0:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=grace)
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGKILL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=5)

    async def shutdown(self) -> None:
        """Kill every running command and stop every job task (the server is stopping)."""
        processes = [job.process for job in self.jobs() if job.process is not None]
        processes += list(self._local_processes.values())
        await asyncio.gather(*(self._kill(process, grace=0) for process in processes))
        for job in self.jobs():
            if job.task is not None and not job.task.done():
                job.task.cancel()

    def close(self) -> None:
        """
        Refuse new runs and kill every command still running; safe from any thread.

        The server calls it before it stops serving (so a request waiting on a command ends at
        once) and again once its event loop is gone, as a safety net.
        """
        self._closed = True
        self.kill_all()

    def kill_all(self) -> None:
        """Kill every command still running, from any thread."""
        processes = [job.process for job in self.jobs() if job.process is not None]
        processes += list(self._local_processes.values())
        for process in processes:
            # ``returncode`` is set once the process is reaped: until then its pid cannot be reused.
            if process.returncode is None:
                _signal_group(process.pid, signal.SIGKILL)

    # ----- results

    async def run_zip(self, run_dir: Path, target: Path) -> Path:
        """Return ``target``, a zip of ``run_dir`` made once (results do not change after the end)."""
        if not target.is_file():
            await run_in_threadpool(zip_folder, run_dir, target)
        return target

    def result_lock(self, key: str) -> asyncio.Lock:
        """
        Return the lock under which a job's result is made, so that requests arriving together
        make one ``run.zip`` and one download key, not one each. Used on the server's loop only.
        """
        return self._result_locks.setdefault(key, asyncio.Lock())

    async def content_zip(self, run_dir: Path) -> Path:
        """Return a new temporary zip of ``run_dir`` as it is now; the caller deletes it."""
        handle, name = tempfile.mkstemp(suffix=".zip", dir=self.root)
        os.close(handle)
        target = Path(name)
        await run_in_threadpool(zip_folder, run_dir, target)
        return target

    async def keep_for_download(self, source: Path, filename: str) -> str:
        """Copy a result to the downloads and return its key ``YYYYMMDD_HHMMSS_UUID``."""
        key = f"{datetime.now():%Y%m%d_%H%M%S}_{uuid.uuid4()}"
        target = self.root / "downloads" / key / filename
        target.parent.mkdir(parents=True)
        await run_in_threadpool(shutil.copyfile, source, target)
        with self._lock:
            self._downloads[key] = target
        return key


def _save_upload(source: IO[bytes], target: Path) -> None:
    source.seek(0)
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out, COPY_CHUNK)


def _place_file(source: Path, target: Path) -> None:
    """Copy an upload into the run folder (overwriting), and unzip it there if it is a zip."""
    shutil.copyfile(source, target)
    if target.suffix.lower() == ".zip":
        extract_zip(target, target.parent)


def extract_zip(archive: Path, destination: Path) -> None:
    """Unzip ``archive`` into ``destination``, refusing any member that would land outside it."""
    root = destination.resolve()
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                target = (root / member.filename).resolve()
                if target != root and root not in target.parents:
                    raise _bad_request(f"Unsafe member {member.filename!r} in {archive.name}: it leaves the run folder.")
            bundle.extractall(root)
    except zipfile.BadZipFile:
        raise _bad_request(f"Uploaded file {archive.name} is not a valid zip file.") from None


def zip_folder(folder: Path, target: Path) -> None:
    """
    Write a zip of everything under ``folder`` (names relative to it) to ``target``, atomically.

    The folder is zipped as it is: a symbolic link is stored as a link (its target's path, not
    the file it points at, which may be anywhere on the host or nowhere), and a file the running
    command removes meanwhile is left out.
    """
    # A name of its own: two requests may zip the same folder at once.
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    partial = Path(name)
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as bundle:
            for path in _walk_entries(folder):
                _add_entry(bundle, path, path.relative_to(folder).as_posix())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _add_entry(bundle: zipfile.ZipFile, path: Path, name: str) -> None:
    try:
        if path.is_symlink():
            info = zipfile.ZipInfo(name, date_time=time.localtime(path.lstat().st_mtime)[:6])
            info.create_system = 3  # Unix, so the mode bits below are read as such
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, os.readlink(path))
        else:
            bundle.write(path, name)
    except FileNotFoundError:
        pass


def _walk_entries(folder: Path) -> Iterator[Path]:
    """Yield every file and symbolic link under ``folder``, sorted; links to folders are not followed."""
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        links = [name for name in subdirs if os.path.islink(os.path.join(directory, name))]
        for name in sorted(files + links):
            yield Path(directory) / name


def _append_text(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(text)


def _slurm_cancel_line(job: MuseJob, reason: str) -> str:
    moment = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    return f"slurmstepd: error: *** JOB {job.job_id} ON {NODE_NAME} CANCELLED AT {moment} {reason}***\n"


def _signal_group(pid: int, sig: int) -> None:
    # Each command leads its own session (pgid == pid): signal the whole group, children included.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def read_stdout(run_dir: Path) -> str:
    """Return the run's stdout as the ``stdout`` result gives it: the text without its final newline."""
    path = run_dir / STDOUT_NAME
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return text.rstrip("\r\n")


# ------------------------------------------------------------------------------------- answers


def muse_base_url(request: Request) -> str:
    """Return the service's base URL as the client reached it, ending with ``/api/``."""
    return f"{request.base_url}api/"


def _urls(base: str, name: str, key: str) -> dict[str, str]:
    return {
        "state": f"{base}software/muse/state/{name}/{key}/",
        "run": f"{base}software/muse/run/{name}/{key}/",
        "content": f"{base}software/muse/content/{name}/{key}/",
    }


def submit_answer(base: str, job: MuseJob) -> dict[str, Any]:
    """Return the answer of ``POST software/muse/run/{name}/``, worded as in the reference."""
    urls = _urls(base, job.name, job.key)
    msg = (
        f"GET {urls['state']} request to get cluster job state, while waiting for results "
        f"(the GET {urls['run']} request to get results will be possible once job finished). "
        f"Keep the software name value={job.name} and the key value={job.key} in order to be able to "
        "follow your POST request. Notifications will be sent during process running if mail-user "
        "given into sbatch_list option. (__todo__: add information about temps imparti...)"
    )
    return {"msg": msg, "url": urls["state"], "urls": urls}


def state_answer(base: str, job: MuseJob) -> dict[str, Any]:
    """Return the answer of ``GET software/muse/state/{name}/{key}/``; ``url`` is the next request."""
    urls = _urls(base, job.name, job.key)
    cr = job.state.cr
    if cr == "OK":
        msg = (
            f"End of job. You can now get results by GET {urls['run']} request or ask for content "
            f"(to investigate) by GET {urls['content']} request."
        )
        url = urls["run"]
    elif cr == "NOK":
        msg = (
            f"End of job, with failure (latest state {job.state.value}): no results to get. You can ask "
            f"for content (to investigate) by GET {urls['content']} request."
        )
        url = urls["content"]
    else:
        msg = (
            f"Job not ended (latest state {job.state.value}). Ask again by GET {urls['state']} request "
            f"until cr is 'OK', then get results by GET {urls['run']} request (content to investigate "
            f"by GET {urls['content']} request)."
        )
        url = urls["state"]
    return {"info": {"report": job.report()}, "msg": msg, "url": url}


def download_answer(base: str, key: str) -> dict[str, Any]:
    """Return the ``todownload=yes`` result, worded as in the reference."""
    url = f"{base}download/?key={key}"
    msg = (
        f"The response content can be downloaded at : {url} *** The resource to download the "
        f"response content is 'GET download' with 'key' option (key value : {key}) *** Keep this "
        f"key value in order to be able to download the response content later on : key={key}"
    )
    return {"msg": msg, "url": url}


def not_ready_error(base: str, job: MuseJob) -> MuseError:
    """Return the error a result asked before ``cr`` is ``OK`` gets, with status 200 (see module doc)."""
    urls = _urls(base, job.name, job.key)
    return MuseError(
        200,
        f"Results are not available: cr is '{job.state.cr}' (latest state {job.state.value}), "
        "results can be asked only once cr is 'OK'.",
        "NotReady" if job.state.cr == "WAIT" else "JobEndedNOK",
        [f"GET {urls['state']} to follow the job", f"GET {urls['content']} to investigate"],
    )


async def result_response(
    engine: MuseEngine,
    base: str,
    report: dict[str, Any],
    request: RunRequest,
    run_dir: Path,
    zip_target: Path,
    download_key: str | None = None,
) -> tuple[Response, str | None]:
    """
    Return the result answer per ``returned_type`` and ``todownload``, and the download key used.

    ``todownload`` applies to ``stdout.txt`` and ``run.zip`` only, as documented; a ``stdout``
    result is always the JSON answer.
    """
    if request.returned_type == "stdout":
        return JSONResponse({"info": {"stdout": read_stdout(run_dir), "report": report}}), download_key
    if request.returned_type == "stdout.txt":
        path, filename, media_type = run_dir / STDOUT_NAME, "stdout.txt", "text/plain; charset=utf-8"
    else:
        path = await engine.run_zip(run_dir, zip_target)
        filename, media_type = "run.zip", "application/zip"
    if request.todownload:
        key = download_key or await engine.keep_for_download(path, filename)
        return JSONResponse(download_answer(base, key)), key
    return FileResponse(path, media_type=media_type, filename=filename), download_key


# ---------------------------------------------------------------------------------------- routes


def create_muse_router(engine: MuseEngine) -> APIRouter:
    """Return the router serving Muse's ``/api/`` endpoints from ``engine``."""
    router = APIRouter(prefix="/api")

    @router.post("/jwt/obtain/")
    async def jwt_obtain(request: Request) -> Response:
        """Give a JWT for ``username`` and ``password``."""
        body, _ = await read_body(request)
        username, password = body.text("username"), body.text("password")
        if not username or not password:
            raise _bad_request("The username and password parameters are required.")
        return JSONResponse({"token": engine.tokens.obtain(username, password)})

    @router.post("/jwt/verify/")
    async def jwt_verify(request: Request) -> Response:
        """Say whether the ``jwt`` parameter is a token still good."""
        body, _ = await read_body(request)
        token = body.text("jwt")
        if not token:
            raise _bad_request("The jwt parameter (the token to verify) is required.")
        try:
            claims = engine.tokens.decode(token)
        except MuseError as exc:
            return JSONResponse({"valid": False, "error": exc.error})
        return JSONResponse(
            {"valid": True, "username": claims["username"], "level": claims["level"], "exp": claims["exp"]}
        )

    @router.post("/software/muse/run/{name}/")
    async def muse_run(name: str, request: Request) -> Response:
        """Submit a cluster run; answer how to follow it."""
        body, form = await read_body(request)
        try:
            engine.tokens.require(body.one("jwt"))
            software = engine.software(name)
            run_request = RunRequest.from_body(body, cluster=True)
            job = await engine.submit(software, run_request, body.uploads)
        finally:
            if form is not None:
                await form.close()
        log.info("Muse job %s (%s) submitted: %s", job.key, job.jobname, run_request.cmd)
        return JSONResponse(submit_answer(muse_base_url(request), job))

    @router.get("/software/muse/state/{name}/{key}/")
    async def muse_state(name: str, key: str, request: Request) -> Response:
        """Report where the job is."""
        return JSONResponse(state_answer(muse_base_url(request), engine.job(name, key)))

    @router.get("/software/muse/run/{name}/{key}/")
    async def muse_result(name: str, key: str, request: Request) -> Response:
        """Give the job's result, once ``cr`` is ``OK``."""
        job = engine.job(name, key)
        base = muse_base_url(request)
        if job.state is not JobState.COMPLETED:
            raise not_ready_error(base, job)
        async with engine.result_lock(job.key):
            response, job.download_key = await result_response(
                engine, base, job.report(), job.request, job.run_dir, job.folder / "run.zip", job.download_key
            )
        return response

    @router.get("/software/muse/content/{name}/{key}/")
    async def muse_content(name: str, key: str) -> Response:
        """Give the run folder zipped as it is now, to investigate."""
        job = engine.job(name, key)
        archive = await engine.content_zip(job.run_dir)
        return FileResponse(
            archive,
            media_type="application/zip",
            filename=f"{name}_{key}.zip",
            background=BackgroundTask(archive.unlink, missing_ok=True),
        )

    @router.get("/download/")
    async def download(request: Request) -> Response:
        """Give a result kept with ``todownload=yes``."""
        key = request.query_params.get("key", "")
        if not key:
            raise _bad_request("The key parameter is required.")
        if not _DOWNLOAD_KEY.match(key):
            raise MuseError(404, f"Unknown download key value {key!r}.", "NotFound")
        path = engine.download(key)
        media_type = "application/zip" if path.suffix == ".zip" else "text/plain; charset=utf-8"
        return FileResponse(path, media_type=media_type, filename=path.name)

    @router.post("/software/run/{name}/")
    async def local_run(name: str, request: Request) -> Response:
        """Run off-cluster and answer the result directly."""
        body, form = await read_body(request)
        try:
            engine.tokens.require(body.one("jwt"))
            software = engine.software(name)
            run_request = RunRequest.from_body(body, cluster=False)
            run = await engine.run_now(software, run_request, body.uploads)
        finally:
            if form is not None:
                await form.close()
        if run.exit_code != 0:
            stderr = (run.run_dir / STDERR_NAME).read_text(encoding="utf-8", errors="replace")
            raise MuseError(
                200,
                f"The run ended with exit status {run.exit_code}.",
                "RunFailed",
                stderr.splitlines()[-20:],
            )
        response, _ = await result_response(
            engine, muse_base_url(request), run.report(), run_request, run.run_dir, run.folder / "run.zip"
        )
        return response

    return router
