"""RescaleStopRunOperator, RescaleSnapshotRunOperator and RescaleListRunsOperator against the emulator."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_hpc.exceptions import HpcApiError, RescaleApiError
from airflow_provider_hpc.operators.rescale import (
    RescaleListRunsOperator,
    RescaleSnapshotRunOperator,
    RescaleStopRunOperator,
)
from tests.integration.rescale.support import API_KEY, FAST_RETRY, RescaleApi, run_deferrable

FAST = {"poll_interval": 0.05, "max_poll_interval": 0.2, "wait_timeout": 30, "retry": FAST_RETRY}
#: Writes a line to ``progress.log`` every 0.1 s for about 30 s.
LONG_COMMAND = 'mkdir -p out; for i in $(seq 1 300); do echo "line $i" >> out/progress.log; sleep 0.1; done'


def stop(job_id: str, **kwargs: Any) -> RescaleStopRunOperator:
    """A stop task on run 1 of ``job_id``."""
    return RescaleStopRunOperator(task_id="stop", job_id=job_id, run_id="1", **{**FAST, **kwargs})


def snapshot(job_id: str, **kwargs: Any) -> RescaleSnapshotRunOperator:
    """A snapshot task on run 1 of ``job_id``."""
    return RescaleSnapshotRunOperator(task_id="snapshot", job_id=job_id, run_id="1", **{**FAST, **kwargs})


# ----- stop --------------------------------------------------------------------------------------


def test_stop_a_running_run(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("sleep 30")
    api.wait_started(job_id)

    result = stop(job_id).execute(context)

    assert result["stopped"] is True and result["job_id"] == job_id and result["run_id"] == "1"
    assert api.stops(job_id) == 1
    assert api.wait_job_completed(job_id)[-2:] == ["Stopping", "Completed"]
    assert context["ti"].xcom["_link_RescaleJobLink"] == f"{api.server.rescale_url}/jobs/{job_id}/"


def test_stop_and_wait_in_the_triggerer(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job(LONG_COMMAND)
    api.wait_started(job_id)
    # The run has produced something before the stop (its process starts a few ms before its
    # first line): a stop sent at once could otherwise beat the command's first write.
    api.wait_lines(job_id, "1", "out/progress.log", 1)

    result, event = run_deferrable(stop(job_id, wait_for_completion=True, deferrable=True), context, api_key=API_KEY)

    assert event["status"] == "success"  # a stopped run is what was asked for
    assert result["stopped"] is True
    assert result["run"]["date_completed"]
    assert api.stops(job_id) == 1
    # What the run produced before the stop became an output file.
    files = api.session.get(api.url(f"jobs/{job_id}/runs/1/files/"), timeout=10).json()["results"]
    assert "out/progress.log" in {f["relativePath"] for f in files}


def test_stop_and_wait_in_the_worker(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("sleep 30")
    api.wait_started(job_id)

    result = stop(job_id, wait_for_completion=True, deferrable=False).execute(context)

    assert result["stopped"] is True and result["run"]["date_completed"]
    assert api.stops(job_id) == 1


def test_stop_a_completed_run_is_not_an_error(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("true")
    api.wait_job_completed(job_id)

    first = stop(job_id, wait_for_completion=True).execute(context)
    again = stop(job_id).execute(context)

    assert first["stopped"] is False and again["stopped"] is False
    assert first["run"]["date_completed"]
    assert api.stops(job_id) == 0, "a completed run needs no stop request"
    assert api.wait_job_completed(job_id)[-1] == "Completed"


def test_stop_twice_is_harmless(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("sleep 30")
    api.wait_started(job_id)

    stop(job_id).execute(context)
    api.wait_completed(job_id)
    again = stop(job_id).execute(context)

    assert again["stopped"] is False
    assert api.stops(job_id) == 1


# ----- snapshot ----------------------------------------------------------------------------------


def test_snapshot_appears_among_the_run_files(api: RescaleApi, context: dict[str, Any], tmp_path: Path) -> None:
    job_id = api.start_job(LONG_COMMAND)
    api.wait_lines(job_id, "1", "out/progress.log", 3)

    result, event = run_deferrable(
        snapshot(job_id, wait_for_file=True, output_path=str(tmp_path / "snap"), deferrable=True), context, api_key=API_KEY
    )

    assert event["status"] == "success"
    assert result["exitcode"] == 0 and result["last_snapshot_id"] is None
    file = result["file"]
    assert file["relative_path"].startswith("snapshots/") and file["relative_path"].endswith(".zip")
    listed = api.session.get(api.url(f"jobs/{job_id}/runs/1/files/"), timeout=10).json()["results"]
    assert file["id"] in {f["id"] for f in listed}
    # Downloaded and checked: the archive holds the log as it was midway.
    local = Path(result["path"].removeprefix("file://"))
    data = local.read_bytes()
    assert hashlib.md5(data).hexdigest() == file["md5"] and len(data) == file["decrypted_size"]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert "out/progress.log" in archive.namelist()
        assert archive.read("out/progress.log").startswith(b"line 1\n")


def test_second_snapshot_in_the_worker_finds_the_new_file(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job(LONG_COMMAND)
    api.wait_lines(job_id, "1", "out/progress.log", 2)

    first = snapshot(job_id, wait_for_file=True, deferrable=False).execute(context)
    second = snapshot(job_id, wait_for_file=True, deferrable=False).execute(context)

    # Rescale answers the previous snapshot's id; the task reports the file it asked for.
    assert second["last_snapshot_id"] == first["file"]["id"]
    assert second["file"]["id"] != first["file"]["id"]
    assert api.requests_to("POST /api/jobs/{job_id}/runs/{run_id}/snapshot/") == 2


def test_snapshot_without_waiting(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job(LONG_COMMAND)
    api.wait_started(job_id)
    api.wait_file(job_id, "1", "out/progress.log")

    result = snapshot(job_id).execute(context)

    assert result["exitcode"] == 0 and result["file"] is None


def test_snapshot_of_a_completed_run_is_refused(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("true")
    api.wait_job_completed(job_id)

    with pytest.raises(RescaleApiError, match="already completed"):
        snapshot(job_id, wait_for_file=True).execute(context)
    assert api.requests_to("POST /api/jobs/{job_id}/runs/{run_id}/snapshot/") == 0


# ----- list runs ---------------------------------------------------------------------------------


def test_list_runs_on_every_page(api: RescaleApi, context: dict[str, Any]) -> None:
    runs = [{"variables": {"x": float(i)}, "isOptimal": i == 3} for i in range(1, 8)]
    job_id = api.start_job('test "$x" != 7 || sleep 30', runs=runs)
    api.wait_completed(job_id, "1")
    for run_id in ("2", "3", "4", "5", "6"):
        api.wait_completed(job_id, run_id)

    every = RescaleListRunsOperator(task_id="runs", job_id=job_id, page_size=2, retry=FAST_RETRY).execute(context)
    done = RescaleListRunsOperator(task_id="runs", job_id=job_id, page_size=2, completed_only=True).execute(context)
    best = RescaleListRunsOperator(task_id="runs", job_id=job_id, optimal_only=True).execute(context)

    assert [r["id"] for r in every] == [str(i) for i in range(1, 8)]
    assert every[2]["variables"] == {"x": 3.0} and every[2]["is_optimal"] is True
    assert [r["id"] for r in done] == ["1", "2", "3", "4", "5", "6"]
    assert [r["id"] for r in best] == ["3"]
    assert api.requests_to("GET /api/jobs/{job_id}/runs/") >= 4 * 2
    api.session.post(api.url(f"jobs/{job_id}/stop/"), timeout=10)


def test_list_runs_refuses_more_than_max_runs(api: RescaleApi, context: dict[str, Any]) -> None:
    job_id = api.start_job("true", runs=[{"variables": {"x": 1}}, {"variables": {"x": 2}}])

    with pytest.raises(HpcApiError, match="max_runs"):
        RescaleListRunsOperator(task_id="runs", job_id=job_id, max_runs=1).execute(context)
