"""
The Rescale emulator's engine: runs that really execute, output files and snapshots.

Everything HTTP lives in ``rescale.py`` and the records in ``rescale_models.py``; this module
holds the state and the threads. One re-entrant lock guards every job, run and file record; it is
never held across a blocking wait (a process wait, a hash, a zip), only across short state
changes, so request handlers never stall.

On disk, under ``data_dir / "rescale"``::

    files/{file_id}/{name}                   uploaded input files
    jobs/{job_id}/runs/{run_id}/work/        the run's working folder (its command's cwd)
    jobs/{job_id}/runs/{run_id}/snapshots/   snapshot archives, kept outside the work folder

The files on disk (hashes, tails, zips, inputs placed) are handled by ``rescale_files.py``, and
the command of a run (script, environment, process) by ``rescale_process.py``.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from hpc_emulator.config import Counters, EmulatorConfig
from hpc_emulator.rescale_files import is_unchanged_input, iter_work_files, md5_of, zip_folder
from hpc_emulator.rescale_models import (
    EngineError,
    InputFile,
    InvalidPathError,
    Job,
    MissingFileError,
    NotInProgressError,
    OutputFile,
    Run,
    RunState,
    ServiceStoppingError,
    StatusEntry,
    new_file_fields,
    random_id,
    unsorted_statuses,
    utc_now,
)
from hpc_emulator.rescale_process import kill_command, prepare_work_dir, start_command
from hpc_emulator.rescale_spec import JobSpec

log = logging.getLogger(__name__)

SUCCESS_REASON = "Completed successfully"
STOP_REASON = "User requested stop"
STOPPED_REASON = "Stopped by user"
# Emulated durations in seconds, before ``time_scale``: the gaps between job statuses, the time a
# snapshot takes to be "uploaded", the time the outputs take to be "uploaded" after a run ends.
STEP_SECONDS = 0.2
SNAPSHOT_SECONDS = 0.3
UPLOAD_SECONDS = 0.2


class RescaleEngine:
    """
    Hold every emulated job, run and output file, and execute the runs.

    :param config: the emulator settings (``data_dir``, ``time_scale``, ``pending_seconds``).
    :param counters: where submissions and stops are counted.
    """

    def __init__(self, config: EmulatorConfig, counters: Counters) -> None:
        self._config = config
        self._counters = counters
        self._root = Path(config.data_dir) / "rescale" / "jobs"
        self.uploads_dir = Path(config.data_dir) / "rescale" / "files"
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._files: dict[str, OutputFile] = {}
        self._inputs: dict[str, InputFile] = {}
        self._file_ids: set[str] = set()
        # Set once the server is stopping: no process starts after that.
        self._closed = False
        # Job life-cycle and snapshot threads, so a stopping server can wait for them.
        self._threads: list[threading.Thread] = []

    # -- reading --------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        """Return a job, or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def run(self, job_id: str, run_id: str) -> Run | None:
        """Return a run of a job, or None."""
        with self._lock:
            job = self._jobs.get(job_id)
            # Run ids are "1".."N" in display order; "01" or "١" are not ids.
            if job is None or not (run_id.isascii() and run_id.isdigit()) or str(int(run_id)) != run_id:
                return None
            index = int(run_id) - 1
            return job.runs[index] if 0 <= index < len(job.runs) else None

    def file(self, file_id: str) -> OutputFile | InputFile | None:
        """Return an output file or an uploaded input file, or None."""
        with self._lock:
            return self._files.get(file_id) or self._inputs.get(file_id)

    def input_file(self, file_id: str) -> InputFile | None:
        """Return an uploaded input file, or None."""
        with self._lock:
            return self._inputs.get(file_id)

    def add_input(self, item: InputFile) -> None:
        """Keep an uploaded input file, its id taken from :meth:`new_file_id`."""
        with self._lock:
            self._inputs[item.id] = item

    def jobs(self, search: str | None = None) -> list[Job]:
        """Return the jobs, newest first; with ``search``, those whose name holds it, in any case."""
        needle = (search or "").casefold()
        with self._lock:
            # Insertion order is creation order.
            return [job for job in reversed(self._jobs.values()) if needle in job.spec.name.casefold()]

    def read(self, reader: Callable[[], Any]) -> Any:
        """Call ``reader`` under the engine lock, so it sees one consistent state."""
        with self._lock:
            return reader()

    def job_files(self, job: Job) -> list[OutputFile]:
        """Return the uploaded output files of every run of a job."""
        with self._lock:
            return [file for run in job.runs for file in run.files]

    def statuses(self, job: Job) -> list[StatusEntry]:
        """Return a job's statuses, deliberately not in date order."""
        with self._lock:
            return unsorted_statuses(job.id, job.statuses)

    def work_files(self, run: Run) -> list[str]:
        """Return the relative paths of the files in an in-progress run's working folder."""
        self._require_in_progress(run)
        return [relative for relative, _ in iter_work_files(run.work_dir)]

    def work_file(self, run: Run, relative: str) -> Path:
        """Return the path of a file in an in-progress run's working folder, refusing escapes."""
        self._require_in_progress(run)
        relative = relative.strip("/")
        if not relative or "\x00" in relative:
            raise InvalidPathError("Invalid path.")
        root = run.work_dir.resolve()
        candidate = (root / relative).resolve()
        if not candidate.is_relative_to(root):
            raise InvalidPathError("Invalid path.")
        if not candidate.is_file():
            raise MissingFileError("Not found.")
        return candidate

    def _require_in_progress(self, run: Run) -> None:
        with self._lock:
            if not run.in_progress:
                raise NotInProgressError("This run is not in progress.")

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, spec: JobSpec) -> Job:
        """Create a job and its runs, not started, in status ``Pending``."""
        with self._lock:
            job_id = self._new_job_id()
            job = Job(job_id, spec, utc_now())
            job.runs = [
                Run(job_id, str(order), order, run_spec, self._root / job_id / "runs" / str(order))
                for order, run_spec in enumerate(spec.runs, start=1)
            ]
            self._jobs[job_id] = job
            self._add_status(job, "Pending", None)
        (self._root / job_id).mkdir(parents=True, exist_ok=True)
        return job

    def submit(self, job: Job) -> None:
        """Start a job: ``Queued`` at once, then its life cycle in a background thread."""
        with self._lock:
            if self._closed:
                raise ServiceStoppingError("The service is stopping: no job can be submitted.")
            if job.submitted:
                raise EngineError("This job has already been submitted.")
            if job.finished:
                raise EngineError("This job was stopped before it was submitted.")
            job.submitted = True
            self._add_status(job, "Queued", None)
        self._counters.incr("rescale_jobs_submitted", job.id)
        thread = threading.Thread(target=self._execute_job, args=(job,), name=f"rescale-{job.id}", daemon=True)
        with self._lock:
            self._track(thread)
        thread.start()

    def stop_job(self, job: Job) -> None:
        """Stop every run of a job: ``Stopping`` now, ``Completed`` once the runs are down."""
        self._counters.incr("rescale_job_stops", job.id)
        with self._lock:
            if job.finished or job.stop_requested:
                return
            self._begin_stopping(job)
            for run in job.runs:
                self._stop_run_locked(run)
            if not job.submitted:
                # No life-cycle thread exists to complete it.
                self._complete_job(job)

    def close(self) -> None:
        """Kill every process still running and start no other one (the server is going down)."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                job.wake.set()
                for run in job.runs:
                    kill_command(run.process)

    def wait_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every job and snapshot thread to end; return whether they did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def _track(self, thread: threading.Thread) -> None:
        # Called under the lock; a thread not started yet (no ident) is still to be waited for.
        alive = [known for known in self._threads if known.ident is None or known.is_alive()]
        self._threads = [*alive, thread]

    def _new_job_id(self) -> str:
        while True:
            job_id = random_id(5)
            if job_id not in self._jobs and not (self._root / job_id).exists():
                return job_id

    def new_file_id(self) -> str:
        """Return a file id no file of this server has had, for an output or an upload."""
        with self._lock:
            while (file_id := random_id(6)) in self._file_ids:
                continue
            self._file_ids.add(file_id)
            return file_id

    def _add_status(self, job: Job, status: str, reason: str | None) -> None:
        moment = utc_now()
        if job.statuses and moment <= job.statuses[-1].date:
            # Strictly increasing dates, so sorting by statusDate gives the true order.
            moment = job.statuses[-1].date + timedelta(microseconds=1)
        job.statuses.append(StatusEntry(status, moment, reason))

    def _begin_stopping(self, job: Job) -> None:
        job.stop_requested = True
        job.wake.set()
        self._add_status(job, "Stopping", STOP_REASON)

    def _complete_job(self, job: Job) -> None:
        for run in job.runs:
            if run.state is RunState.PENDING:
                self._finish_unstarted(run)
        self._add_status(job, "Completed", self._final_reason(job))
        job.finished = True

    def _final_reason(self, job: Job) -> str:
        if job.spec.completed_reason:
            return job.spec.completed_reason
        if job.stop_requested:
            return STOPPED_REASON
        for run in job.runs:
            if run.stopped:
                return f"Run {run.id} stopped by user"
            if run.exit_code is not None and run.exit_code < 0:
                return f"Run {run.id} was killed by signal {-run.exit_code}"
            if run.exit_code:
                return f"Run {run.id} failed with exit code {run.exit_code}"
        return SUCCESS_REASON

    def _pause(self, job: Job, seconds: float) -> None:
        job.wake.wait(self._config.delay(seconds))

    def _execute_job(self, job: Job) -> None:
        try:
            self._pause(job, self._config.pending_seconds)
            if not job.spec.completed_reason:
                self._start_and_execute(job)
        except Exception:  # a bug must not leave the job hanging forever: log it, complete the job
            log.exception("Rescale emulator: job %s failed inside the emulator", job.id)
        with self._lock:
            if not job.finished:
                self._complete_job(job)

    def _start_and_execute(self, job: Job) -> None:
        for status in ("Started", "Validated", "Executing"):
            with self._lock:
                if job.stop_requested:
                    return
                self._add_status(job, status, None)
            if status != "Executing":
                self._pause(job, STEP_SECONDS)
        pending: queue.SimpleQueue[Run] = queue.SimpleQueue()
        for run in job.runs:
            pending.put(run)
        workers = [
            threading.Thread(target=self._run_worker, args=(job, pending), daemon=True)
            for _ in range(min(job.spec.max_concurrent_runs, len(job.runs)))
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    # -- runs -----------------------------------------------------------------------------------

    def stop_run(self, run: Run) -> None:
        """Kill a run's process (its files so far become outputs); a finished run is left as is."""
        self._counters.incr("rescale_stops", f"{run.job_id}/{run.id}")
        with self._lock:
            job = self._jobs[run.job_id]
            if not self._stop_run_locked(run):
                return
            # A job with nothing left to run is being stopped as a whole.
            if job.submitted and not job.finished and not job.stop_requested:
                if not any(other.active for other in job.runs):
                    self._begin_stopping(job)

    def snapshot(self, run: Run) -> str | None:
        """
        Start archiving a running run's working folder; return the previous snapshot's file id.

        The archive becomes the output file ``snapshots/snapshot-<file id>.zip`` shortly after.
        """
        with self._lock:
            if run.state is not RunState.RUNNING:
                raise NotInProgressError("Snapshots only apply to runs that are currently in progress.")
            previous = run.snapshot_ids[-1] if run.snapshot_ids else None
            file_id = self.new_file_id()
            run.snapshot_ids.append(file_id)
            thread = threading.Thread(target=self._take_snapshot, args=(run, file_id), daemon=True)
            run.snapshot_threads.append(thread)
            self._track(thread)
            thread.start()
        return previous

    def _stop_run_locked(self, run: Run) -> bool:
        if run.state is RunState.PENDING:
            run.stopped = True
            self._finish_unstarted(run)
            return True
        if run.state is RunState.RUNNING and not run.stopped:
            run.stopped = True
            kill_command(run.process)
            return True
        return False

    def _finish_unstarted(self, run: Run) -> None:
        run.stopped = run.stopped or self._jobs[run.job_id].stop_requested
        run.state = RunState.COMPLETED
        run.date_completed = utc_now()

    def _run_worker(self, job: Job, pending: queue.SimpleQueue[Run]) -> None:
        while True:
            try:
                run = pending.get_nowait()
            except queue.Empty:
                return
            self._execute_run(job, run)

    def _execute_run(self, job: Job, run: Run) -> None:
        if not self._may_start(job, run):
            return
        # Copied without the lock, which must never wait on a large copy; the run stays PENDING,
        # so a stop meanwhile completes it unstarted and the check below sees it.
        prepared = prepare_work_dir(job, run)
        with self._lock:
            if not self._may_start(job, run):
                return
            process = self._spawn(job, run, prepared)
        exit_code = process.wait() if process is not None else 127
        with self._lock:
            run.exit_code = exit_code
            run.state = RunState.FINISHING
            snapshots = list(run.snapshot_threads)
        for thread in snapshots:
            thread.join()
        self._pause(job, UPLOAD_SECONDS)
        # The server is going down and its data folder with it: nothing to upload any more.
        outputs = [] if self._closed else self._upload_outputs(job, run)
        with self._lock:
            run.files = (*outputs, *run.files)
            self._files.update((output.id, output) for output in outputs)
            run.state = RunState.COMPLETED
            run.date_completed = utc_now()

    def _may_start(self, job: Job, run: Run) -> bool:
        with self._lock:
            if run.state is not RunState.PENDING:
                return False
            if job.stop_requested or self._closed:
                self._finish_unstarted(run)
                return False
            return True

    def _spawn(self, job: Job, run: Run, prepared: bool) -> subprocess.Popen[bytes] | None:
        run.work_dir.mkdir(parents=True, exist_ok=True)
        run.snapshot_dir.mkdir(parents=True, exist_ok=True)
        run.state = RunState.RUNNING
        run.date_started = utc_now()
        # A run whose inputs could not be placed ends at once, like a command that cannot start.
        run.process = start_command(job, run) if prepared else None
        return run.process

    def _upload_outputs(self, job: Job, run: Run) -> list[OutputFile]:
        """Return the working folder's files as outputs, leaving out the inputs left unchanged."""
        inputs = {item.name: item for item in job.spec.input_files}
        outputs = []
        for relative, path in iter_work_files(run.work_dir):
            size, md5 = path.stat().st_size, md5_of(path)
            if not is_unchanged_input(relative, size, md5, inputs):
                outputs.append(self._make_output(run, self.new_file_id(), relative, path, (size, md5)))
        return outputs

    def _make_output(
        self, run: Run, file_id: str, relative: str, path: Path, measured: tuple[int, str] | None = None
    ) -> OutputFile:
        size, md5 = measured if measured is not None else (path.stat().st_size, md5_of(path))
        fields = new_file_fields(path, size, md5)
        return OutputFile(id=file_id, job_id=run.job_id, run_id=run.id, relative_path=relative, **fields)

    def _take_snapshot(self, run: Run, file_id: str) -> None:
        job = self._jobs[run.job_id]
        self._pause(job, SNAPSHOT_SECONDS)
        if self._closed:
            return
        target = run.snapshot_dir / f"snapshot-{file_id}.zip"
        partial = target.with_name(target.name + ".part")
        try:
            zip_folder(run.work_dir, partial)
            partial.replace(target)
            output = self._make_output(run, file_id, f"snapshots/{target.name}", target)
        except OSError:
            log.exception("Rescale emulator: snapshot %s of run %s/%s failed", file_id, run.job_id, run.id)
            return
        with self._lock:
            run.files = (*run.files, output)
            self._files[file_id] = output
