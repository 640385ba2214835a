"""``airflow dags test example_chain_muse_rescale``: Muse prepares, Rescale solves, a reduce reads both."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from hpc_emulator import EmulatorServer

CREATE_ROUTE = "POST /api/v2/jobs/"
SUBMIT_ROUTE = "POST /api/v2/jobs/{job_id}/submit/"
UPLOAD_ROUTE = "POST /api/v2/files/contents/"


def test_example_chain_muse_rescale(dag_runner: Any, emulator: EmulatorServer, airflow_home: Any) -> None:
    run = dag_runner("example_chain_muse_rescale", env={**emulator.airflow_conn_env(), "CHAIN_EXAMPLE_POLL_SECONDS": "0.5"})

    failed = {ti: state for ti, state in run.states.items() if state != "success"}
    assert run.returncode == 0 and run.states and not failed, f"{failed}\n{run.output[-6000:]}"
    rows = run.value("table")
    assert [(row["prepared"], row["solved"]) for row in rows] == [("3.0", "9"), ("7.0", "49"), ("11.5", "132.25")]
    assert len({row["rescale_job"] for row in rows}) == 3
    # One job created and submitted per case, each fed the Muse result it was mapped on.
    requests = emulator.counters.snapshot().get("requests", {})
    assert (requests.get(CREATE_ROUTE), requests.get(SUBMIT_ROUTE), requests.get(UPLOAD_ROUTE)) == (3, 3, 3)
    assert "[DAG TEST] running trigger in line" in run.output
    # The harvest announced the asset: one event per mapped harvest, with its job.
    with sqlite3.connect(airflow_home.database) as db:
        extras = [
            json.loads(extra)
            for (extra,) in db.execute(
                "SELECT e.extra FROM asset_event e JOIN asset a ON e.asset_id = a.id "
                "WHERE a.name = 'hpc-chain-results' AND e.source_run_id = ?",
                (run.run_id,),
            )
        ]
    assert sorted(extra["job_id"] for extra in extras) == sorted(row["rescale_job"] for row in rows)
