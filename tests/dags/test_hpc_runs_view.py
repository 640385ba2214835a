"""
The "HPC runs" view against a real metadata database: a real ``airflow dags test`` run is listed,
with its key, SLURM job, state, result and links, and only for users who may read its DAG.

The view's FastAPI app is called in a process of the session's Airflow home, with the user and
the auth manager the API server would give it replaced by a user allowed to read a given set of
DAGs (the permission check itself is the auth manager's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from hpc_emulator import EmulatorServer

CALL_VIEW = r"""
import json, sys
from fastapi.testclient import TestClient
from airflow.api_fastapi.core_api.security import get_user
from airflow_provider_hpc.plugins.runs_view import app, auth_manager

readable = set(json.loads(sys.argv[1]))

class AuthManager:
    def get_authorized_dag_ids(self, *, user, method="GET", session=None):
        assert method == "GET"
        return readable

app.dependency_overrides[get_user] = lambda: object()
app.dependency_overrides[auth_manager] = lambda: AuthManager()
client = TestClient(app)
answer = {"json": client.get("/runs.json", params=json.loads(sys.argv[2])).json(), "page": client.get("/runs").text}
print(json.dumps(answer))
"""


def call_view(airflow_home: Any, readable: list[str], params: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CALL_VIEW, json.dumps(readable), json.dumps(params or {})],
        env=airflow_home.env, cwd=airflow_home.path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_finished_muse_run_is_listed_for_those_who_may_read_its_dag(dag_runner: Any, airflow_home: Any, emulator: EmulatorServer) -> None:
    run = dag_runner("example_muse_single", env={**emulator.airflow_conn_env(), "MUSE_EXAMPLE_POLL_SECONDS": "1"})
    assert run.returncode == 0, run.output[-4000:]
    result = run.value("add")

    seen = call_view(airflow_home, ["example_muse_single"], {"dag_id": "example_muse_single"})

    rows = [r for r in seen["json"]["runs"] if r["run_id"] == run.run_id]
    assert len(rows) == 1, seen["json"]
    row = rows[0]
    assert (row["service"], row["software"], row["remote_id"]) == ("muse", "sw_example", result["key"])
    assert (row["slurm_job_id"], row["state"], row["task_state"]) == (str(result["job_id"]), result["state"], "success")
    assert row["remote_url"] == result["state_url"] and row["since"]
    assert row["task_instance_path"] == f"dags/example_muse_single/runs/{run.run_id.replace(':', '%3A').replace('+', '%2B')}/tasks/add"
    assert result["key"] in seen["page"] and 'target="_blank"' in seen["page"]

    # A user who may not read the DAG sees none of it, even when asking for it by name.
    hidden = call_view(airflow_home, ["another_dag"], {"dag_id": "example_muse_single"})
    assert hidden["json"]["runs"] == [] and result["key"] not in hidden["page"]
    # The state filter is the task instance's.
    assert call_view(airflow_home, ["example_muse_single"], {"state": "deferred"})["json"]["runs"] == []
