"""
Scenario 4: the metadata database (PostgreSQL) goes away for 15 s while 30 waits are deferred.

20 Muse runs and 10 Rescale runs (``dags/system_database_outage.py``) are deferred (over both
triggerers, as they pick them up); PostgreSQL is then stopped (fast shutdown) and started again 15 s later on
the same port and data folder. The remote runs wait for a gate file opened in the middle of the
outage, so they end while the database is down and every wait can complete only after it is back.
Services that exit meanwhile are started again, as a production supervisor (systemd, Kubernetes)
would; the test prints which, and how long the deployment took to recover: every service alive and
serving, every wait completed. Then: one submission per Muse run, the right results, no Rescale
run stopped, every task instance a success on try 1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import requests
from cluster_faults import ServiceSupervisor, start_database, stop_database
from dev.airflow_stack import wait_for
from dev.cluster.deployment import TRIGGERERS
from system_support import SYSTEM_KEY

from hpc_emulator import EmulatorServer

pytestmark = pytest.mark.system

DAG_ID = "system_database_outage"
# As in dags/system_database_outage.py.
MUSE_WAITS = 20
RESCALE_WAITS = 10
WAITS = MUSE_WAITS + RESCALE_WAITS
OUTAGE_SECONDS = 15.0
DEFER_TIMEOUT = 240.0
RECOVERY_TIMEOUT = 240.0


def _muse_command(gate: Path, i: int) -> str:
    return f"until [ -e {gate} ]; do sleep 1; done; python /add.py {i} 300"


def _start_gated_rescale_jobs(server: EmulatorServer, gate: Path, count: int) -> list[str]:
    """Create and submit ``count`` one-run Rescale jobs that end once ``gate`` exists; return their ids."""
    session = requests.Session()
    session.headers["Authorization"] = f"Token {SYSTEM_KEY}"
    body = {"name": "db-outage", "jobanalyses": [{"command": f"until [ -e {gate} ]; do sleep 1; done; echo ok > out.txt"}]}
    ids = []
    for _ in range(count):
        job_id = session.post(f"{server.rescale_url}/api/v2/jobs/", json=body, timeout=10).json()["id"]
        session.post(f"{server.rescale_url}/api/v2/jobs/{job_id}/submit/", timeout=10).raise_for_status()
        ids.append(job_id)
    return ids


def _retried(airflow: Any, run_id: str) -> dict[str, Any]:
    """Describe each task instance that needed more than one try: its tries' hosts and states."""
    retried = {task: n for task, n in airflow.try_numbers(DAG_ID, run_id).items() if n != 1}
    if not retried:
        return {}
    history = airflow.query(
        "SELECT task_id, try_number, hostname, state FROM task_instance_history WHERE dag_id = ? AND run_id = ? "
        "ORDER BY task_id, try_number", DAG_ID, run_id,
    )
    return {task: {"tries": n, "history": [row[1:] for row in history if row[0] == task]} for task, n in retried.items()}


def test_deferred_waits_ride_out_a_database_outage(
    cluster: Any, system_emulator: EmulatorServer, tmp_path: Path
) -> None:
    airflow = cluster.airflow
    gate = tmp_path / "go"
    job_ids = _start_gated_rescale_jobs(system_emulator, gate, RESCALE_WAITS)
    stops_before = sum(system_emulator.counters.snapshot().get("rescale_stops", {}).values())
    run_id = airflow.trigger(DAG_ID, {"job_ids": job_ids, "gate": str(gate)})

    started = time.monotonic()
    wait_for(lambda: airflow.assigned_triggers(DAG_ID, run_id) == WAITS, DEFER_TIMEOUT,
             f"the {WAITS} waits to be deferred and picked up", interval=1.0)
    print(f"\n{WAITS} waits deferred and picked up in {time.monotonic() - started:.0f} s")
    live = airflow.live_triggerers()
    assert sorted(live) == sorted(TRIGGERERS), live
    trigger_ids = [trigger_id for (trigger_id,) in airflow.query(
        "SELECT trigger_id FROM task_instance WHERE dag_id = ? AND run_id = ? AND trigger_id IS NOT NULL", DAG_ID, run_id)]
    shares = airflow.triggers_by_triggerer(trigger_ids)
    # Whichever triggerer asks first takes the waits (28 and 2 in one run): both hold some as a
    # rule, but the scenario is the database's outage, and both triggerers live through it anyway.
    print("triggers per triggerer job before the outage:", {name: shares.get(job) for name, job in live.items()})

    supervisor = ServiceSupervisor(airflow)
    port = cluster.postgres.port
    stop_database(cluster)
    outage_started = time.monotonic()
    try:
        while time.monotonic() - outage_started < OUTAGE_SECONDS:
            if not gate.exists() and time.monotonic() - outage_started >= OUTAGE_SECONDS / 2:
                gate.touch()  # the remote runs end while the database is down
            supervisor.check()
            time.sleep(0.5)
    finally:
        start_database(cluster)
    back_at = time.monotonic()
    assert cluster.postgres.port == port
    died_during_outage = sorted(supervisor.restarts)
    print(f"PostgreSQL down {back_at - outage_started:.1f} s, back on port {port}; "
          f"services that exited during the outage: {died_during_outage or 'none'}")

    # Recovery: every service alive and serving, and every wait completed.
    def recovered() -> bool:
        supervisor.check()
        return supervisor.all_alive()

    wait_for(recovered, RECOVERY_TIMEOUT, "every service to be alive and serving again", interval=1.0)
    services_back = time.monotonic() - back_at

    def finished() -> str | None:
        supervisor.check()  # a service that exits late is started again too
        state = airflow.run_state(DAG_ID, run_id)
        return state if state in ("success", "failed") else None

    try:
        state = wait_for(finished, RECOVERY_TIMEOUT, f"{DAG_ID}/{run_id} to finish", interval=1.0)
    except AssertionError:
        raise AssertionError(
            f"{DAG_ID}/{run_id} did not finish: {airflow.task_states(DAG_ID, run_id)}\n{airflow.service_log_tails()}"
        ) from None
    waits_done = time.monotonic() - back_at
    wait_for(recovered, RECOVERY_TIMEOUT, "every service to be alive and serving at the end", interval=1.0)
    print(f"recovery after PostgreSQL came back: services alive and serving in {services_back:.1f} s, "
          f"all {WAITS} waits completed in {waits_done:.1f} s; {supervisor.summary()}")
    assert state == "success", {k: v for k, v in airflow.task_states(DAG_ID, run_id).items() if v != "success"}

    # Nothing twice: one submission per Muse run, no Rescale run stopped, the right results.
    counters = system_emulator.counters.snapshot()
    submissions = counters.get("muse_submissions", {})
    for i in range(MUSE_WAITS):
        assert submissions.get(_muse_command(gate, i)) == 1, (i, submissions.get(_muse_command(gate, i)))
        assert airflow.xcom(DAG_ID, run_id, f"muse_{i}")["stdout"].strip() == f"{i + 300}.0"
    for i in range(RESCALE_WAITS):
        value = airflow.xcom(DAG_ID, run_id, f"rescale_{i}")
        assert value["status"] == "success" and value["job_id"] == job_ids[i], value
    assert sum(counters.get("rescale_stops", {}).values()) == stops_before, counters.get("rescale_stops")
    retried = _retried(airflow, run_id)
    assert not retried, f"task instances needed a retry: {retried}"
