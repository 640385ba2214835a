"""
Scenario 3: a Celery worker's machine dies between a Muse submit and the deferral.

The first try of ``system_worker_crash`` runs on worker A (queue ``worker_a``), submits, persists
the run's key in ``task_state_store`` and blocks (``dags/system_worker_crash.py``). The test then
kills -9 worker A's process group and every other process of its machine (the task process has a
group of its own), and hands the ``worker_a`` queue to worker B, as an operator would: a retry
keeps its task's queue. Airflow must notice the lost task by its missing heartbeats (the
scheduler runs with ``task_instance_heartbeat_timeout`` lowered from 300 s for this test) and
retry it; the retry, on worker B, must re-attach to the run: one submission in all, a success on
try 2, the result on S3 the very bytes the emulator computed.

The run waits for a gate file opened once the scheduler has taken in the end of the retry's
deferring workload (see tests/reliability/test_airflow_crashes.py: a trigger that fires before it
makes Airflow 3.3 fail the resumed task as killed externally). Worker A, its queues and the
scheduler's settings are restored at the end, for the tests that follow in the session.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cluster_faults import (
    add_queue,
    crash_machine,
    kill_if_alive,
    remove_queue,
    scheduler_settings,
    start_worker_again,
    worker_named,
)
from dev.airflow_stack import wait_for

from hpc_emulator import EmulatorServer

pytestmark = pytest.mark.system

DAG_ID = "system_worker_crash"
TASK_ID = "run"
CMD = "until [ -e {gate} ]; do sleep 0.2; done; python /add.py 20 22"
#: Seconds without a heartbeat after which the scheduler fails a running task (Airflow's default is 300).
HEARTBEAT_TIMEOUT = 20
SCHEDULER_SETTINGS = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
}
STEP_TIMEOUT = 120.0
MUSE_SUBMIT_ROUTE_SUFFIX = "/software/muse/run/{name}/"


def _muse_submit_requests(server: EmulatorServer) -> int:
    """Return how many requests reached the emulator's Muse submit route (``POST .../software/muse/run/{name}/``)."""
    requests_by_route = server.counters.snapshot().get("requests", {})
    return sum(count for route, count in requests_by_route.items()
               if route.startswith("POST ") and route.endswith(MUSE_SUBMIT_ROUTE_SUFFIX))


def _s3_object(cluster: Any, path: str) -> bytes:
    """Read ``s3://aws_default@bucket/key`` straight from the deployment's store."""
    prefix = f"s3://aws_default@{cluster.s3.bucket}/"
    assert path.startswith(prefix + "results/"), path
    answer = cluster.s3.client().get_object(Bucket=cluster.s3.bucket, Key=path[len(prefix):])
    return answer["Body"].read()


def test_a_worker_killed_after_submit_the_retry_reattaches_on_the_other_worker(
    cluster: Any, system_emulator: EmulatorServer, tmp_path: Path
) -> None:
    airflow = cluster.airflow
    worker_a, worker_b = worker_named("worker-a"), worker_named("worker-b")
    gate, marker = tmp_path / "gate", tmp_path / "submitted.json"
    cmd = CMD.format(gate=gate)
    submits_before = _muse_submit_requests(system_emulator)
    started = time.monotonic()

    with scheduler_settings(airflow, SCHEDULER_SETTINGS):
        run_id = airflow.trigger(DAG_ID, {"gate": str(gate), "submitted_marker": str(marker)})
        wait_for(marker.exists, STEP_TIMEOUT, "try 1 to submit and block", interval=0.5)
        note = json.loads(marker.read_text())
        assert note["host"] == worker_a.name, note
        blocked_try = note["try"]
        if blocked_try != 1:
            print(f"\ntry {blocked_try} submitted and blocked: the tries before it failed to start (a loaded machine)")
        assert airflow.task_states(DAG_ID, run_id)[TASK_ID] == "running"
        assert system_emulator.counters.snapshot()["muse_submissions"].get(cmd) == 1

        node_b = None
        try:
            killed = crash_machine(airflow, worker_a.name)
            killed_at = time.monotonic()
            assert note["pid"] in killed, (note, killed)  # the blocked task process died with its machine
            print(f"\nkilled {worker_a.name} (pids {killed}) {killed_at - started:.1f} s after the trigger")
            node_b = add_queue(airflow, worker_b, worker_a.queue)

            def retried_and_deferred() -> bool:
                return (airflow.try_numbers(DAG_ID, run_id).get(TASK_ID) == blocked_try + 1
                        and airflow.assigned_triggers(DAG_ID, run_id) == 1)

            wait_for(retried_and_deferred, HEARTBEAT_TIMEOUT + STEP_TIMEOUT,
                     "the lost try to be detected and the retry to re-attach and defer", interval=0.5)
            print(f"try {blocked_try + 1} re-attached and deferred {time.monotonic() - killed_at:.1f} s after the kill "
                  f"(task_instance_heartbeat_timeout {HEARTBEAT_TIMEOUT} s)")
            wait_for(lambda: airflow.executor_reported(DAG_ID, run_id, TASK_ID, blocked_try + 1, "success"), STEP_TIMEOUT,
                     "the scheduler to take in the end of the retry's deferring workload", interval=0.5)
            gate.touch()
            state = airflow.wait_run_finished(DAG_ID, run_id, STEP_TIMEOUT)
            assert state == "success", airflow.task_states(DAG_ID, run_id)
            print(f"the run succeeded {time.monotonic() - started:.1f} s after the trigger")
        finally:
            # Leave the deployment as the session's other tests expect it, and no blocked task behind.
            kill_if_alive(note["pid"])
            if node_b is not None:
                remove_queue(airflow, node_b, worker_a.queue)
            if worker_a.name not in airflow.processes:
                start_worker_again(airflow, worker_a)

    # One submission: the retry re-attached to the run its dead predecessor started.
    assert system_emulator.counters.snapshot()["muse_submissions"].get(cmd) == 1
    assert _muse_submit_requests(system_emulator) - submits_before == 1
    key = airflow.xcom(DAG_ID, run_id, TASK_ID, "muse_key")
    assert key == note["key"], (key, note)

    # The try after the killed one succeeded, on the other worker; the killed one (in the history)
    # ran on worker A and failed. Normally that is try 2 after try 1.
    assert airflow.try_numbers(DAG_ID, run_id)[TASK_ID] == blocked_try + 1
    assert airflow.hostnames(DAG_ID, run_id)[TASK_ID] == worker_b.name
    history = airflow.query(
        "SELECT try_number, hostname, state FROM task_instance_history WHERE dag_id = ? AND run_id = ? AND task_id = ? "
        "ORDER BY try_number", DAG_ID, run_id, TASK_ID,
    )
    killed_try = [row for row in history if row[0] == blocked_try]
    assert [(try_number, hostname) for try_number, hostname, _ in killed_try] == [(blocked_try, worker_a.name)], history
    assert killed_try[0][2] in ("failed", "up_for_retry"), history

    # The result on S3 is what the emulator computed for that run, byte for byte.
    value = airflow.xcom(DAG_ID, run_id, TASK_ID)
    stored = _s3_object(cluster, value["file"]["path"])
    computed = (Path(system_emulator.config.data_dir) / "muse" / "jobs" / key / "run" / "__WS__stdout.txt").read_bytes()
    assert stored == computed, (stored, computed)
    assert float(stored.decode().strip()) == 42.0, stored
    print(f"scenario done in {time.monotonic() - started:.1f} s (scheduler and {worker_a.name} restored)")
