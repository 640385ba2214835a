"""
The Muse example DAGs, and a retry after a lost worker, run by ``airflow dags test`` against the emulator.

``airflow dags test`` runs each deferred task's trigger in-process after rebuilding it from its
serialized form, so every Muse task below goes through a real ``serialize()`` round trip, a real
``task_state_store`` and real XCom.
"""

from __future__ import annotations

import json
import sqlite3
import zipfile
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import ObjectStoragePath

from hpc_emulator import EmulatorServer

RETRY_DAGS = Path(__file__).resolve().parents[1] / "integration" / "muse" / "dags"
TRIGGER_RAN = "[DAG TEST] running trigger in line"


def muse_env(emulator: EmulatorServer, **extra: str) -> dict[str, str]:
    """The environment pointing ``muse_default`` at the test's emulator, the examples polling fast."""
    return {**emulator.airflow_conn_env(), "MUSE_EXAMPLE_POLL_SECONDS": "1", **extra}


def assert_succeeded(run: Any) -> None:
    """Fail with the end of the output when the DAG run did not succeed."""
    failed = {ti: state for ti, state in run.states.items() if state != "success"}
    assert run.returncode == 0 and run.states and not failed, f"{failed}\n{run.output[-6000:]}"


def local(path_text: str) -> Path:
    """Return the local path of a ``file://`` storage path."""
    return Path(ObjectStoragePath(path_text).path)


def query(database: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run a read-only query on the session's metadata database."""
    with sqlite3.connect(database) as db:
        return db.execute(sql, args).fetchall()


def test_example_muse_single(dag_runner: Any, emulator: EmulatorServer, airflow_home: Any) -> None:
    run = dag_runner("example_muse_single", env=muse_env(emulator))

    assert_succeeded(run)
    result = run.value("add")
    assert result["stdout"] == "9.0" and result["state"] == "COMPLETED"
    assert run.value("show") == 9.0
    assert run.value("add", key="muse_key") == result["key"]
    assert run.value("add", key="_link_MuseJobStateLink") == result["state_url"]
    assert run.output.count(TRIGGER_RAN) == 1
    assert emulator.counters.get("muse_submissions", "") == 1
    assert local(result["output_path"]).is_relative_to(airflow_home.results_base)
    assert "eyJ" not in run.output, "a JWT reached the task logs"


def test_example_muse_sweep(dag_runner: Any, emulator: EmulatorServer, airflow_home: Any) -> None:
    run = dag_runner("example_muse_sweep", env=muse_env(emulator))

    assert_succeeded(run)
    results = run.mapped_values("add")
    assert [r["stdout"] for r in results] == ["3.0", "7.0", "11.5"]
    assert len({r["key"] for r in results}) == 3
    assert [r["returned_type"] for r in results] == ["stdout"] * 3
    assert run.value("total") == pytest.approx(21.5)
    assert run.output.count(TRIGGER_RAN) == 3
    assert emulator.counters.get("muse_submissions", "") == 3
    # Each mapped run has its own results folder, and a readable label in the UI.
    assert len({r["output_path"] for r in results}) == 3
    labels = query(
        airflow_home.database,
        "SELECT rendered_map_index FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id = 'add' ORDER BY map_index",
        "example_muse_sweep",
        run.run_id,
    )
    assert [label for (label,) in labels] == ["case_0", "case_1", "case_2"]


def test_example_muse_runzip(dag_runner: Any, emulator: EmulatorServer, airflow_home: Any) -> None:
    run = dag_runner("example_muse_runzip", env=muse_env(emulator))

    assert_succeeded(run)
    result = run.value("add")
    archive = local(result["file"]["path"])
    assert archive.name == "run.zip" and archive.is_relative_to(airflow_home.results_base)
    assert archive.stat().st_size == result["file"]["size"]
    with zipfile.ZipFile(archive) as zipped:
        assert zipped.read("__WS__stdout.txt").decode().strip() == "59.0"
    # The runner decodes XCom values as JSON, so the returned text "59.0" reads back as a number.
    assert run.value("read_stdout") == 59.0
    assert run.output.count(TRIGGER_RAN) == 1
    extras = [
        json.loads(extra)
        for (extra,) in query(
            airflow_home.database,
            "SELECT extra FROM asset_event WHERE source_dag_id = ? AND source_run_id = ?",
            "example_muse_runzip",
            run.run_id,
        )
    ]
    assert [extra["key"] for extra in extras] == [result["key"]]
    assert extras[0]["file"] == result["file"]["path"]


def test_a_retry_after_a_lost_worker_re_attaches_without_resubmitting(
    dag_runner: Any, emulator: EmulatorServer
) -> None:
    run = dag_runner("muse_retry_reattach", env=muse_env(emulator, AIRFLOW__CORE__DAGS_FOLDER=str(RETRY_DAGS)))

    assert_succeeded(run)
    assert "worker lost right after storing 'muse_run'" in run.output
    assert "Re-attaching to the previous try's Muse run" in run.output
    assert run.value("show") == 9.0
    assert emulator.counters.get("muse_submissions", "") == 1
    assert emulator.counters.get("requests", "POST /api/software/muse/run/{name}/") == 1


def submissions(emulator: EmulatorServer) -> int:
    """The Muse cluster runs the emulator was asked for."""
    return emulator.counters.get("requests", "POST /api/software/muse/run/{name}/")


def test_a_worker_lost_after_collecting_is_followed_by_a_second_collect_not_a_second_run(
    dag_runner: Any, emulator: EmulatorServer
) -> None:
    run = dag_runner("muse_lost_after_collect", env=muse_env(emulator, AIRFLOW__CORE__DAGS_FOLDER=str(RETRY_DAGS)))

    assert_succeeded(run)
    assert "worker lost after collecting the result" in run.output
    assert "already ended well: fetching its result" in run.output
    assert run.value("add")["stdout"] == "9.0"
    assert submissions(emulator) == 1


def test_a_state_store_that_refuses_writes_does_not_cost_a_second_run(dag_runner: Any, emulator: EmulatorServer) -> None:
    run = dag_runner("muse_store_down", env=muse_env(emulator, AIRFLOW__CORE__DAGS_FOLDER=str(RETRY_DAGS)))

    assert_succeeded(run)
    assert "Could not keep Muse run sw_example/" in run.output and "going on with it" in run.output
    assert run.value("add")["stdout"] == "9.0"
    assert submissions(emulator) == 1


def test_a_retry_whose_inputs_changed_submits_anew_and_says_why(dag_runner: Any, emulator: EmulatorServer) -> None:
    run = dag_runner("muse_inputs_changed", env=muse_env(emulator, AIRFLOW__CORE__DAGS_FOLDER=str(RETRY_DAGS)))

    assert_succeeded(run)
    assert "was submitted with other inputs" in run.output
    assert run.value("add")["stdout"] == "7.0"  # the retry's own command: 2 + 5
    assert submissions(emulator) == 2
