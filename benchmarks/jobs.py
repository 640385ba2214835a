"""Submitting the benchmark's jobs to the emulator, fast and outside the measured process."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import requests

from benchmarks.emulator import EmulatorProcess

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
        f"{emulator.muse_url}jwt/obtain/", data={"username": "demo", "password": "demo"},
        verify=emulator.ca_path or True, timeout=30,
    )
    response.raise_for_status()
    return response.json()["token"]


async def _submit_all(emulator: EmulatorProcess, muse: Sequence[float], rescale: Sequence[float]) -> list[SubmittedJob]:
    token = muse_token(emulator) if muse else ""
    gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)
    context = _ssl(emulator)
    jobs: list[SubmittedJob | None] = [None] * (len(muse) + len(rescale))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=SUBMIT_CONCURRENCY)) as session:

        async def submit_muse(index: int, length: float) -> None:
            form = {"jwt": token, "cmd": f"sleep {length:.3f}", "returned_type": "stdout", "todownload": "no"}
            async with gate:
                async with session.post(f"{emulator.muse_url}software/muse/run/{MUSE_SOFTWARE}/", data=form) as response:
                    answer = await response.json()
            match = _KEY.search(str(answer.get("url", "")))
            if not match:
                raise RuntimeError(f"The emulator refused a Muse submission: {answer}")
            jobs[index] = SubmittedJob("muse", match.group(1), length, time.time())

        async def submit_rescale(index: int, length: float) -> None:
            headers = {"Authorization": "Token demo"}
            body = {"name": "bench", "jobanalyses": [{"command": f"sleep {length:.3f}"}]}
            async with gate:
                async with session.post(f"{emulator.base_url}/api/v2/jobs/", json=body, headers=headers) as response:
                    job_id = (await response.json())["id"]
                async with session.post(f"{emulator.base_url}/api/v2/jobs/{job_id}/submit/", headers=headers) as response:
                    response.raise_for_status()
            jobs[index] = SubmittedJob("rescale", job_id, length, time.time())

        tasks = [submit_muse(i, length) for i, length in enumerate(muse)]
        tasks += [submit_rescale(len(muse) + i, length) for i, length in enumerate(rescale)]
        await asyncio.gather(*tasks)
    return [job for job in jobs if job is not None]


def submit_jobs(emulator: EmulatorProcess, muse: Sequence[float] = (), rescale: Sequence[float] = ()) -> list[SubmittedJob]:
    """Submit Muse jobs (``sleep LENGTH``) and one-run Rescale jobs of the given lengths; return them in order."""
    return asyncio.run(_submit_all(emulator, muse, rescale))


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
        answer = requests.get(url, headers={"Authorization": "Token demo"}, verify=emulator.ca_path or True, timeout=30).json()
        if any(entry["status"] == "Completed" for entry in answer["results"]):
            return
        time.sleep(0.25)
    raise TimeoutError(f"Rescale job {job_id} did not complete within {timeout:.0f}s")


def rescale_run(emulator: EmulatorProcess, job_id: str, run_id: str = "1") -> dict[str, Any]:
    """Return a Rescale run as the API answers it."""
    response = requests.get(
        f"{emulator.base_url}/api/jobs/{job_id}/runs/{run_id}/", headers={"Authorization": "Token demo"},
        verify=emulator.ca_path or True, timeout=30,
    )
    response.raise_for_status()
    return response.json()
