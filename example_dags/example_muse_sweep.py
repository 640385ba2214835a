"""
A parameter sweep on Muse: one cluster run per input, mapped dynamically, then a reduce.

``make_inputs`` writes one ``stdin.txt`` per case to object storage (under ``[hpc] results_base``,
which may be ``s3://...``); each mapped ``MuseRunOperator`` uploads its file (its log names the
file, its size and where it came from, before the submit) and runs ``python /add.py``, which reads
the numbers from it; ``total`` adds the results up.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param, task

from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.storage import results_base

# Poll every 10 s or more on the real services (docs/errors.md, "A deferred task failed with no
# error in its log"); only the demo and the tests set MUSE_EXAMPLE_POLL_SECONDS lower, for the
# emulator's runs of a second.
POLL_SECONDS = float(os.environ.get("MUSE_EXAMPLE_POLL_SECONDS", "10"))
# Every deferrable task has retries: a Muse retry re-attaches to the run its first try submitted
# and returns its result, without a second submission.
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=5)}

with DAG(
    dag_id="example_muse_sweep",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["example", "muse"],
    doc_md=__doc__,
    params={"cases": Param([[1, 2], [3, 4], [5, 6.5]], type="array", description="numbers added by each run")},
):

    @task
    def make_inputs(params: dict[str, Any], run_id: str) -> list[list[str]]:
        """Write one stdin.txt per case to object storage; return each run's list of files."""
        folder = results_base() / "example_muse_sweep" / run_id.replace(":", "_").replace("+", "_") / "inputs"
        inputs = []
        for index, numbers in enumerate(params["cases"]):
            path = folder / f"case_{index}" / "stdin.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(" ".join(str(n) for n in numbers) + "\n")
            # Which file each run gets (its name, size and place; the add task logs it again as it sends it).
            print(f"case_{index}: {path.name}, {path.stat().st_size} bytes, at {path}")
            inputs.append([str(path)])
        return inputs

    runs = MuseRunOperator.partial(
        task_id="add",
        name="sw_example",
        cmd="python /add.py",
        files_order=["stdin.txt"],
        returned_type="stdout",
        poll_interval=POLL_SECONDS,
        max_poll_interval=30,
        timeout=3600,
        **RETRIES,
        # Label each mapped run in the UI by its case folder ("case_0", "case_1", ...).
        map_index_template="{{ task.files[0].rstrip('/').split('/')[-2] }}",
    ).expand(files=make_inputs())

    @task
    def total(results: list[dict[str, Any]]) -> float:
        """Add the sums of every case up."""
        sums = [float(result["stdout"]) for result in results]
        for result, value in zip(results, sums):
            print(f"case run {result['key']}: {value}")
        print(f"total of {len(sums)} runs: {sum(sums)}")
        return sum(sums)

    total(runs.output)
