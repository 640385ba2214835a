"""
What the soak runs: the Rescale jobs of both phases, and phase 2's plan of DAG tasks.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Any


def rescale_job_spec(index: int, runs: int, fail: bool) -> dict[str, Any]:
    command = (
        "mkdir -p out/deep && head -c $(( (RANDOM % 64 + 1) * 4096 )) /dev/urandom > out/data.bin"
        " && echo \"$x\" > out/deep/value.txt && for i in 1 2 3; do echo line $i >> log.txt; done"
    )
    if fail:
        command += " && exit 3"
    return {
        "name": f"soak-{index}",
        "jobanalyses": [{"command": command}],
        "runs": [{"variables": {"x": float(index * 10 + r)}} for r in range(runs)],
    }



@dataclass
class AirflowPlan:
    """What the soak DAG runs: the mapped Muse tasks and the Rescale runs, with what each should give."""

    muse: list[dict[str, Any]]
    rescale_jobs: list[dict[str, Any]]
    settings: dict[str, Any]

    def dag_plan(self) -> dict[str, Any]:
        """Return the plan the DAG file reads (``soak_plan.json``)."""
        return {
            "muse": [{"cmd": m["cmd"], "returned_type": m["returned_type"]} for m in self.muse],
            "rescale_runs": sum(job["runs"] for job in self.rescale_jobs),
            "settings": self.settings,
        }



def airflow_plan(args: argparse.Namespace) -> AirflowPlan:
    """Draw the Muse commands (about one in seven fails) and the Rescale jobs (the last one fails)."""
    rng = random.Random(args.seed + 1)
    count = args.airflow_muse_runs
    bad = set(rng.sample(range(count), max(1, round(count * 0.15)))) if count else set()
    muse = []
    for index in range(count):
        b = 1000 + rng.randint(0, 999)
        sleep = rng.choice([1, 2, 4, 6, 8])
        muse.append({
            "cmd": f"sleep {sleep}; python /add.py {index} {'oops' if index in bad else b}",
            "returned_type": rng.choice(["stdout", "stdout", "stdout", "stdout.txt"]),
            "expected": None if index in bad else f"{float(index + b)}",
        })
    # The last job fails (when there are two or more): every other one is watched and harvested.
    last = args.airflow_rescale_jobs - 1
    jobs = [{"fail": index == last and last > 0, "runs": 2} for index in range(args.airflow_rescale_jobs)]
    settings = {
        "poll_interval": 1.0, "max_poll_interval": 3.0, "max_poll_failures": 8, "retry_delay": 2,
        "muse_retries": 3, "rescale_wait_retries": 1, "harvest_retries": 3, "rescale_timeout": 600,
        "max_active_tasks": 256,
    }
    return AirflowPlan(muse, jobs, settings)



def airflow_rescale_spec(index: int, runs: int, fail: bool) -> dict[str, Any]:
    """A Rescale job whose runs last long enough for their waits to be deferred."""
    spec = rescale_job_spec(1000 + index, runs, fail)
    spec["jobanalyses"][0]["command"] = f"sleep {10 + 5 * index} && " + spec["jobanalyses"][0]["command"]
    return spec

