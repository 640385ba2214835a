"""
The soak's side of the emulator: its set-up requests (spared by the faults), the truth it keeps, and the counting.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
from hpc_emulator import DEMO_API_KEY, EmulatorServer

def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()



class Harness:
    """The emulator, the set-up requests that faults spare, and the truth read from the emulator."""

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {DEMO_API_KEY}"

    def create_rescale_job(self, spec: dict[str, Any]) -> str:
        base = self.server.rescale_url
        job_id = self.session.post(f"{base}/api/v2/jobs/", json=spec, timeout=30).json()["id"]
        self.session.post(f"{base}/api/v2/jobs/{job_id}/submit/", timeout=30).raise_for_status()
        return job_id

    def muse_jobs(self) -> list[dict[str, Any]]:
        return self.session.get(f"{self.server.base_url}/_emulator/muse/jobs", timeout=30).json()

    def rescale_work_files(self, job_id: str, run_id: str) -> dict[str, str]:
        work = self.server.config.data_dir / "rescale" / "jobs" / job_id / "runs" / run_id / "work"
        return {p.relative_to(work).as_posix(): md5_file(p) for p in work.rglob("*") if p.is_file() and not p.is_symlink()}

    def rescale_final_reason(self, job_id: str) -> str | None:
        # The harness's own reads go around the faults by retrying until they get an answer.
        for _ in range(50):
            try:
                answer = self.session.get(f"{self.server.rescale_url}/api/v2/jobs/{job_id}/statuses/", timeout=30)
                if answer.status_code == 200:
                    statuses = sorted(answer.json()["results"], key=lambda s: s["statusDate"])
                    completed = [s for s in statuses if s["status"] == "Completed"]
                    return completed[-1]["statusReason"] if completed else None
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"could not read the statuses of job {job_id}")



def count_outcome(figures: Counter[str], problems: list[str], agrees: bool, succeeded: bool, problem: str) -> bool:
    """
    Count one run's outcome against the emulator's decision; return whether they agree.

    :param agrees: whether what the client (or Airflow) saw is what the emulator decided.
    :param succeeded: whether the emulator decided success: a disagreement then lost a result.
    :param problem: what to report when they disagree.
    """
    if agrees:
        figures["outcomes_as_decided"] += 1
        return True
    figures["outcomes_not_as_decided"] += 1
    problems.append(problem)
    if succeeded:
        figures["lost_results"] += 1
    return False

