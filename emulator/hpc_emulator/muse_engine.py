"""
The Muse emulator's engine: the catalogue, tokens, jobs and downloads, and the commands really run.

Everything HTTP lives in ``muse.py``, the records in ``muse_models.py``, the run folders' files
(uploads placed, zips made) in ``muse_files.py``.

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
import logging
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import IO

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from hpc_emulator.config import Counters, EmulatorConfig
from hpc_emulator.muse_auth import TokenService
from hpc_emulator.muse_files import place_file, save_upload, zip_folder
from hpc_emulator.muse_forms import safe_filename
from hpc_emulator.muse_models import (
    STDERR_NAME,
    STDIN_NAME,
    STDOUT_NAME,
    JobState,
    LocalRun,
    MuseError,
    MuseJob,
    RunRequest,
    bad_request,
    parse_walltime,
)
from hpc_emulator.software import (
    IMAGE_ENV,
    Software,
    SoftwareCatalogue,
    container_command,
    write_python_shim,
)

log = logging.getLogger(__name__)

# Job numbers as in the reference examples (``114-ws-sw_example``, job id 2459394).
FIRST_RUN_NUMBER = 114
FIRST_JOB_ID = 2459394
NODE_NAME = "muse-emu-001"
# How long SLURM lets a job end after SIGTERM before it sends SIGKILL (scaled down from KillWait).
KILL_GRACE_SECONDS = 0.5


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
            await run_in_threadpool(save_upload, upload.file, saved[name])
        order = list(files_order or [])
        missing = [name for name in order if name not in saved]
        if missing:
            raise bad_request(
                f"files_order names files that were not sent: {missing}.", f"Files sent: {list(saved)}."
            )
        order += [name for name in saved if name not in order]
        for name in order:
            await run_in_threadpool(place_file, saved[name], run_dir / name)
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
