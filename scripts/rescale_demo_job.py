"""
Create and submit a small Rescale job on the local emulator, for the demo and the DAG tests.

The job's single run behaves like a little solver: for ``steps`` steps it appends one line to
``logs/solver.log`` (and prints it, so ``process_output.log`` grows too), waiting
``step_seconds`` between lines, then writes its results in subfolders::

    logs/solver.log                  one line per step
    results/fields/field_001.dat     one small file per step
    results/summary.csv              step,residual for every step
    post/report.txt                  a few words about the run

``steps`` and ``step_seconds`` travel as the run's variables, as a parameter sweep's would.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests

#: The route a DAG's first look at the demo run asks (the emulator counts its requests by route).
RUN_ROUTE = "GET /api/jobs/{job_id}/runs/{run_id}/"

#: The job's command: plain POSIX shell, so it runs wherever the emulator runs.
DEMO_COMMAND = r"""
set -e
mkdir -p logs results/fields post
echo "step,residual" > results/summary.csv
i=1
while [ "$i" -le "$steps" ]; do
  residual=$((99999 / (i * i)))
  line="step $i of $steps: residual 0.$(printf '%05d' "$residual")"
  echo "$line" >> logs/solver.log
  echo "$line"
  printf 'field %s\n%s\n' "$i" "$residual" > "results/fields/field_$(printf '%03d' "$i").dat"
  echo "$i,0.$(printf '%05d' "$residual")" >> results/summary.csv
  sleep "$step_seconds"
  i=$((i + 1))
done
echo "solver converged after $steps steps" >> logs/solver.log
printf 'run %s of job %s: %s steps\n' "$RESCALE_RUN_ID" "$RESCALE_JOB_ID" "$steps" > post/report.txt
sleep "$step_seconds"
""".strip()

#: The file the demo's run writes line by line (the one to tail).
DEMO_LOG_PATH = "logs/solver.log"
#: The file a downstream task reads once the outputs are harvested.
DEMO_SUMMARY_PATH = "results/summary.csv"


def demo_job_body(*, steps: int = 40, step_seconds: float = 0.5, name: str = "airflow-demo-solver") -> dict[str, Any]:
    """
    Return the body of ``POST /api/v2/jobs/`` for the demo job.

    :param steps: how many lines the run writes to its log (and field files it writes).
    :param step_seconds: seconds between two lines.
    :param name: the job's name.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if step_seconds < 0:
        raise ValueError("step_seconds must not be negative")
    return {
        "name": name,
        "jobanalyses": [{"command": DEMO_COMMAND}],
        "runs": [{"variables": {"steps": int(steps), "step_seconds": float(step_seconds)}, "type": 3}],
    }


def create_demo_job(
    rescale_url: str, api_key: str, *, steps: int = 40, step_seconds: float = 0.5, timeout: float = 30.0
) -> tuple[str, str]:
    """
    Create the demo job without starting it; return ``(job_id, run_id)``.

    :param rescale_url: the platform URL, e.g. the emulator's ``rescale_url`` (``http://127.0.0.1:PORT``).
    :param api_key: an API key the platform accepts.
    :param steps: how many lines the run writes to ``logs/solver.log``.
    :param step_seconds: seconds between two lines.
    :param timeout: seconds each HTTP request may take.
    """
    with _session(api_key) as session:
        body = demo_job_body(steps=steps, step_seconds=step_seconds)
        created = session.post(f"{rescale_url.rstrip('/')}/api/v2/jobs/", json=body, timeout=timeout)
        _check(created, "create the demo job")
        return str(created.json()["id"]), "1"


def submit_job(rescale_url: str, api_key: str, job_id: str, *, timeout: float = 30.0) -> None:
    """
    Start a created job (``POST /api/v2/jobs/{job_id}/submit/``).

    :param rescale_url: the platform URL.
    :param api_key: an API key the platform accepts.
    :param job_id: the job to start.
    :param timeout: seconds the request may take.
    """
    with _session(api_key) as session:
        answer = session.post(f"{rescale_url.rstrip('/')}/api/v2/jobs/{job_id}/submit/", timeout=timeout)
        _check(answer, f"submit job {job_id}")


def create_demo_run(
    rescale_url: str,
    api_key: str,
    *,
    steps: int = 40,
    step_seconds: float = 0.5,
    timeout: float = 30.0,
) -> tuple[str, str]:
    """
    Create the demo job on a Rescale platform (the emulator), submit it, and return ``(job_id, run_id)``.

    The run starts after the platform's queue wait and lasts about ``steps * step_seconds``
    seconds (20 s by default: long enough for ``airflow dags test`` to start and snapshot it midway).

    :param rescale_url: the platform URL, e.g. the emulator's ``rescale_url`` (``http://127.0.0.1:PORT``).
    :param api_key: an API key the platform accepts.
    :param steps: how many lines the run writes to ``logs/solver.log``.
    :param step_seconds: seconds between two lines.
    :param timeout: seconds each HTTP request may take.
    """
    job_id, run_id = create_demo_job(rescale_url, api_key, steps=steps, step_seconds=step_seconds, timeout=timeout)
    submit_job(rescale_url, api_key, job_id, timeout=timeout)
    return job_id, run_id


@contextmanager
def submitted_when_watched(emulator: Any, api_key: str, job_id: str) -> Iterator[None]:
    """
    Submit ``job_id`` on the emulator as soon as someone reads one of its runs (the DAG has started).

    ``airflow dags test`` takes seconds to start, more on a busy machine: a job submitted before it
    could complete before the DAG snapshots it midway.

    :param emulator: the running emulator (its request counters tell when the run is first read).
    :param api_key: an API key it accepts.
    :param job_id: the created, not yet submitted, job.
    """
    done = threading.Event()

    def submit_once_watched() -> None:
        while not done.is_set():
            if emulator.counters.snapshot().get("requests", {}).get(RUN_ROUTE):
                submit_job(emulator.rescale_url, api_key, job_id)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=submit_once_watched, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)


def _session(api_key: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {api_key}"
    return session


def _check(answer: requests.Response, what: str) -> None:
    """Raise a clear error (status and the server's words, never the key) when a request failed."""
    if answer.status_code >= 400:
        raise RuntimeError(f"Could not {what}: HTTP {answer.status_code}: {answer.text[:300]}")


if __name__ == "__main__":  # python scripts/rescale_demo_job.py http://127.0.0.1:PORT [API_KEY]
    if len(sys.argv) < 2:
        sys.exit("usage: rescale_demo_job.py RESCALE_URL [API_KEY]")
    job, run = create_demo_run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "demo")
    print(f"job {job} run {run}")
