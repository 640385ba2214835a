"""``airflow dags test example_chain_muse_rescale``: Muse prepares, Rescale solves, a reduce reads both."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from hpc_emulator import EmulatorServer

CREATE_ROUTE = "POST /api/v2/jobs/"
SUBMIT_ROUTE = "POST /api/v2/jobs/{job_id}/submit/"
UPLOAD_ROUTE = "POST /api/v2/files/contents/"


def test_example_chain_muse_rescale(dag_runner: Any, emulator: EmulatorServer, airflow_home: Any, tmp_path: Path) -> None:
    events_file = tmp_path / "openlineage.jsonl"
    lineage = {  # OpenLineage's file transport: one JSON event per line
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events_file), "append": True}),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "chain-test",
    }
    run = dag_runner("example_chain_muse_rescale", env={**emulator.airflow_conn_env(), "CHAIN_EXAMPLE_POLL_SECONDS": "0.5", **lineage})

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

    # OpenLineage: each Rescale job read the Muse result it was fed, each harvest wrote a folder,
    # and every event names its remote job.
    completed = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    completed = [e for e in completed if e["eventType"] == "COMPLETE"]

    def of(task: str) -> list[dict[str, Any]]:
        return [e for e in completed if e["job"]["name"].endswith(f".{task}")]

    prepared_files = sorted(row["path"] for row in [run.value("prepare", map_index=i)["file"] for i in range(3)])
    solve_inputs = sorted(d["name"] for e in of("solve") for d in e["inputs"])
    assert len(of("solve")) == 3 and solve_inputs == sorted(p.removeprefix("file://") for p in prepared_files)
    assert sorted(e["job"]["facets"]["hpcJob"]["jobId"] for e in of("solve")) == sorted(row["rescale_job"] for row in rows)
    assert {e["run"]["facets"]["externalQuery"]["source"] for e in of("solve")} == {"rescale"}
    prepare_outputs = sorted(f"file://{d['name']}" for e in of("prepare") for d in e["outputs"])
    assert prepare_outputs == prepared_files
    assert sorted(e["job"]["facets"]["hpcJob"]["jobId"] for e in of("prepare")) == sorted(row["muse_key"] for row in rows)
    harvest_outputs = [d for e in of("harvest") for d in e["outputs"]]
    assert len(harvest_outputs) == 3 and {d["namespace"] for d in harvest_outputs} == {"file"}
