"""Submitting the benchmark's jobs to the emulator, fast and outside the measured process."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import requests

from benchmarks.emulator import EmulatorProcess
from hpc_emulator import DEMO_API_KEY, DEMO_PASSWORD

MUSE_SOFTWARE = "sw_example"
SUBMIT_CONCURRENCY = 16
_KEY = re.compile(r"/([0-9a-f-]{36})/$")


@dataclass
class SubmittedJob:
    """
    One job the benchmark waits on.

    :param kind: ``muse`` or ``rescale``.
    :param ident: the Muse key, or the Rescale job id.
    :param length: seconds the job's command runs.
    :param submitted_at: epoch seconds of the submission's answer.
    """

    kind: str
    ident: str
    length: float
    submitted_at: float

    def to_dict(self) -> dict[str, Any]:
        """Return the job as JSON-able values."""
        return asdict(self)


def _ssl(emulator: EmulatorProcess) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=emulator.ca_path) if emulator.ca_path else False


def muse_token(emulator: EmulatorProcess) -> str:
    """Obtain a Muse token for the emulator's demo account."""
    response = requests.post(
        f"{emulator.muse_url}jwt/obtain/", data={"username": "demo", "password": DEMO_PASSWORD},
        verify=emulator.ca_path or True, timeout=30,
    )
    response.raise_for_status()
    return response.json()["token"]


def job_command(length: float, gate: str | None) -> str:
    """Return a job's shell command: wait for the gate to open (when given), then run ``length`` seconds."""
    wait = f"read go < {gate}; " if gate else ""
    return f"{wait}sleep {length:.3f}"


async def _submit_all(
    emulator: EmulatorProcess, muse: Sequence[float], rescale: Sequence[float], gate: str | None
) -> list[SubmittedJob]:
    token = muse_token(emulator) if muse else ""
    slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)
    context = _ssl(emulator)
    jobs: list[SubmittedJob | None] = [None] * (len(muse) + len(rescale))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=SUBMIT_CONCURRENCY)) as session:

        async def submit_muse(index: int, length: float) -> None:
            form = {"jwt": token, "cmd": job_command(length, gate), "returned_type": "stdout", "todownload": "no"}
            async with slots, session.post(f"{emulator.muse_url}software/muse/run/{MUSE_SOFTWARE}/", data=form) as response:
                answer = await response.json()
            match = _KEY.search(str(answer.get("url", "")))
            if not match:
                raise RuntimeError(f"The emulator refused a Muse submission: {answer}")
            jobs[index] = SubmittedJob("muse", match.group(1), length, time.time())

        async def submit_rescale(index: int, length: float) -> None:
            headers = {"Authorization": f"Token {DEMO_API_KEY}"}
            body = {"name": "bench", "jobanalyses": [{"command": job_command(length, gate)}]}
            async with slots:
                async with session.post(f"{emulator.base_url}/api/v2/jobs/", json=body, headers=headers) as response:
                    job_id = (await response.json())["id"]
                async with session.post(f"{emulator.base_url}/api/v2/jobs/{job_id}/submit/", headers=headers) as response:
                    response.raise_for_status()
            jobs[index] = SubmittedJob("rescale", job_id, length, time.time())

        tasks = [submit_muse(i, length) for i, length in enumerate(muse)]
        tasks += [submit_rescale(len(muse) + i, length) for i, length in enumerate(rescale)]
        await asyncio.gather(*tasks)
    return [job for job in jobs if job is not None]


def submit_jobs(
    emulator: EmulatorProcess, muse: Sequence[float] = (), rescale: Sequence[float] = (), gate: Gate | None = None
) -> list[SubmittedJob]:
    """
    Submit Muse jobs and one-run Rescale jobs that run ``sleep LENGTH``; return them in order.

    With a ``gate``, each job first waits for it to open, so every job's length counts from the
    same moment (:meth:`Gate.open`), however long the submissions took.
    """
    return asyncio.run(_submit_all(emulator, muse, rescale, str(gate.path) if gate else None))


class Gate:
    """
    A named pipe the jobs' commands block on (``read go < PATH``) until :meth:`open` is called.

    Opening the pipe for writing wakes every reader blocked on it; closing it gives them end of
    file, and they go on to their ``sleep``.

    :param path: where to make the named pipe.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened_at: float | None = None
        self._fd: int | None = None

    def open(self, readers: int) -> float:
        """Release every job waiting on the gate; return the epoch time it happened."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self.opened_at = time.time()
        # One line per reader and some spare: each ``read`` ends at a newline, however the bytes
        # interleave between readers. The pipe holds 64 KiB, so the write is whole.
        os.write(self._fd, b"go\n" * (readers + 16))
        return self.opened_at

    def close(self) -> None:
        """Close the writing end: a reader still there gets end of file and goes on."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def wait_all_running(emulator: EmulatorProcess, jobs: Sequence[SubmittedJob], timeout: float = 120.0) -> None:
    """Wait until every job's command has started (and so waits on its gate)."""
    deadline = time.monotonic() + timeout
    muse = [job.ident for job in jobs if job.kind == "muse"]
    rescale = [job.ident for job in jobs if job.kind == "rescale"]
    while time.monotonic() < deadline:
        states = emulator.muse_jobs() if muse else {}
        muse_waiting = [key for key in muse if states.get(key, {}).get("state") != "RUNNING"]
        rescale_waiting = [job_id for job_id in rescale if not rescale_run(emulator, job_id).get("dateStarted")]
        if not muse_waiting and not rescale_waiting:
            return
        rescale = rescale_waiting
        time.sleep(0.5)
    raise TimeoutError("Some jobs did not start in time")


def wait_muse_ok(emulator: EmulatorProcess, key: str, timeout: float) -> None:
    """Wait until a Muse job's ``cr`` is ``OK`` (raise if it ends otherwise or takes too long)."""
    deadline = time.monotonic() + timeout
    url = f"{emulator.muse_url}software/muse/state/{MUSE_SOFTWARE}/{key}/"
    while time.monotonic() < deadline:
        cr = requests.get(url, verify=emulator.ca_path or True, timeout=30).json()["info"]["report"]["cr"]
        if cr == "OK":
            return
        if cr == "NOK":
            raise RuntimeError(f"Muse job {key} failed on the emulator")
        time.sleep(0.25)
    raise TimeoutError(f"Muse job {key} did not end within {timeout:.0f}s")


def wait_rescale_completed(emulator: EmulatorProcess, job_id: str, timeout: float) -> None:
    """Wait until a Rescale job's statuses hold ``Completed``."""
    deadline = time.monotonic() + timeout
    url = f"{emulator.base_url}/api/v2/jobs/{job_id}/statuses/"
    while time.monotonic() < deadline:
        answer = requests.get(url, headers={"Authorization": f"Token {DEMO_API_KEY}"}, verify=emulator.ca_path or True, timeout=30).json()
        if any(entry["status"] == "Completed" for entry in answer["results"]):
            return
        time.sleep(0.25)
    raise TimeoutError(f"Rescale job {job_id} did not complete within {timeout:.0f}s")


def rescale_run(emulator: EmulatorProcess, job_id: str, run_id: str = "1") -> dict[str, Any]:
    """Return a Rescale run as the API answers it."""
    response = requests.get(
        f"{emulator.base_url}/api/jobs/{job_id}/runs/{run_id}/", headers={"Authorization": f"Token {DEMO_API_KEY}"},
        verify=emulator.ca_path or True, timeout=30,
    )
    response.raise_for_status()
    return response.json()
