"""
``airflow dags test example_rescale_harvest`` against the emulator, end to end.

The DAG starts its own solver job, waits until its run is well under way, snapshots it, watches
it to completion in the triggerer while its log is tailed into the task log, harvests its
outputs to object storage, and a downstream task reads one of them.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from hpc_emulator import EmulatorConfig, EmulatorServer

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "example_rescale_harvest"
#: Long enough to be snapshotted midway.
STEPS = 16
STEP_SECONDS = 0.4
LOG_PATH = "logs/solver.log"
SUMMARY_PATH = "results/summary.csv"
TASKS = ("start", "midway", "snapshot", "watch", "harvest", "summarize")
CREATE_ROUTE = "POST /api/v2/jobs/"
SUBMIT_ROUTE = "POST /api/v2/jobs/{job_id}/submit/"
#: Long enough for the secrets masker, and easy to look for in the output.
API_KEY = "rk-dag-test-0123456789-SECRET"


@pytest.fixture
def emulator_config(tmp_path: Path) -> EmulatorConfig:
    """The shared emulator settings, with an API key no output may show."""
    return EmulatorConfig(
        data_dir=tmp_path / "emulator", time_scale=0.05, pending_seconds=0.2, seed=7, rescale_api_keys=frozenset({API_KEY})
    )


def test_example_rescale_harvest(dag_runner, airflow_home, emulator: EmulatorServer) -> None:
    api_key = API_KEY
    env = {**emulator.airflow_conn_env(), "RESCALE_EXAMPLE_POLL_SECONDS": "0.5"}
    run = dag_runner(DAG_ID, env=env, conf={"steps": STEPS, "step_seconds": STEP_SECONDS})

    assert run.returncode == 0, run.output[-8000:]
    assert {run.states[(task, -1)] for task in TASKS} == {"success"}, run.states

    # The DAG started one job, once, and did not wait for it in that task.
    started = run.value("start")
    job_id, run_id = started["job_id"], "1"
    assert started["status"] == "submitted" and started["run_ids"] == [run_id]
    requests = emulator.counters.snapshot()["requests"]
    assert requests[CREATE_ROUTE] == requests[SUBMIT_ROUTE] == 1

    # The wait was deferred: the trigger ran (inline, as `dags test` runs triggers).
    assert "[DAG TEST] running trigger in line" in run.output
    watched = run.value("watch")
    assert watched["status"] == "success" and watched["job_id"] == job_id and watched["run_id"] == run_id
    assert watched["outcome"]["history"][-1] == "Completed"

    # Each line of the log was shown once, in order, in the task log.
    shown = re.findall(rf"\[{re.escape(LOG_PATH)}\] (step \d+) of {STEPS}", run.output)
    assert shown == [f"step {i}" for i in range(1, STEPS + 1)]

    # The snapshot was taken midway and is among the run's output files.
    snapshot = run.value("snapshot")
    assert snapshot["file"]["relative_path"].startswith("snapshots/")
    assert emulator.counters.snapshot()["requests"]["POST /api/jobs/{job_id}/runs/{run_id}/snapshot/"] == 1

    # Every output file was harvested and checked; the manifest came through XCom.
    harvest = run.value("harvest")
    relative = {f["relative_path"] for f in harvest["files"]}
    assert {LOG_PATH, SUMMARY_PATH, "post/report.txt", snapshot["file"]["relative_path"]} <= relative
    assert f"results/fields/field_{STEPS:03d}.dat" in relative
    assert harvest["downloaded"] == harvest["file_count"] == len(relative)
    for entry in harvest["files"]:
        data = Path(entry["path"].removeprefix("file://")).read_bytes()
        assert hashlib.md5(data).hexdigest() == entry["md5"] and len(data) == entry["size"]
    # The snapshot holds the log as it was midway.
    archive_entry = next(f for f in harvest["files"] if f["relative_path"] == snapshot["file"]["relative_path"])
    with zipfile.ZipFile(archive_entry["path"].removeprefix("file://")) as archive:
        midway_lines = archive.read(LOG_PATH).decode().splitlines()
    assert 3 <= len(midway_lines) < STEPS

    # With no output_path, the files went to the task's own folder under [hpc] results_base.
    assert Path(harvest["output_path"].removeprefix("file://")).is_relative_to(airflow_home.results_base / DAG_ID)

    # The downstream task read one of the harvested files.
    summary = run.value("summarize")
    assert summary["steps"] == STEPS
    assert summary["path"].endswith(SUMMARY_PATH)

    # The UI's extra link points at the job on the connection's platform; no stop was sent.
    link = f"{emulator.rescale_url}/jobs/{job_id}/"
    assert all(run.value(task, "_link_RescaleJobLink") == link for task in ("start", "snapshot", "watch", "harvest"))
    assert not emulator.counters.snapshot().get("rescale_stops")
    assert api_key not in run.output


RETRY_DAGS = REPO / "tests" / "integration" / "rescale" / "dags"
SNAPSHOT_ROUTE = "POST /api/jobs/{job_id}/runs/{run_id}/snapshot/"


def test_a_snapshot_retry_after_a_lost_worker_takes_no_second_snapshot(dag_runner, emulator: EmulatorServer) -> None:
    env = {**emulator.airflow_conn_env(), "AIRFLOW__CORE__DAGS_FOLDER": str(RETRY_DAGS)}

    run = dag_runner("rescale_snapshot_retry", env=env)

    assert run.returncode == 0 and run.states[("snapshot", -1)] == "success", run.output[-6000:]
    assert "worker lost right after the snapshot request was answered" in run.output
    assert "already took the snapshot" in run.output
    assert emulator.counters.snapshot()["requests"][SNAPSHOT_ROUTE] == 1
    assert run.value("snapshot")["file"]["relative_path"].startswith("snapshots/")
    assert API_KEY not in run.output
