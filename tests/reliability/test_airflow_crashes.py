"""
Crash recovery with real Airflow processes (API server, scheduler with LocalExecutor, triggerer).

- The task process is killed (SIGKILL) right after the Muse submit, before the deferral: the
  retry re-attaches to the same run; one submission in all; the result is delivered.
- A deferred Rescale wait is marked failed by the user: the triggerer's ``on_kill`` stops the run,
  exactly once.
- The triggerer is killed (SIGKILL, whole process group) while waits are deferred, then started
  again: every wait completes, nothing is submitted twice, nothing is stopped.

One deployment serves the three scenarios; each scenario is bounded (about a minute).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from airflow_stack import AirflowStack, wait_for

from airflow_provider_hpc.emulator import EmulatorConfig, EmulatorServer
from airflow_provider_hpc.emulator.config import MuseUser

pytestmark = pytest.mark.slow

STACK_PASSWORD = "stack-pw-Hq93-SECRET"
STACK_KEY = "stack-rk-0c77e2-SECRET"
SCENARIO_TIMEOUT = 90.0

DAGS = '''
from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor

FAST = {"poll_interval": 0.5, "max_poll_interval": 1.0}


class KillAfterSubmit(MuseRunOperator):
    """Dies by SIGKILL on its first try, right after the submit (the key is already persisted)."""

    def _resume_or_submit(self, context):
        found = super()._resume_or_submit(context)
        if context["ti"].try_number == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return found


with DAG("rel_kill_after_submit", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    KillAfterSubmit(task_id="run", name="sw_example", cmd="sleep 6; python /add.py 4 5", deferrable=True,
                    retries=1, retry_delay=timedelta(seconds=1), **FAST)

with DAG("rel_mark_failed", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    RescaleRunSensor(task_id="wait", job_id="{{ dag_run.conf['job_id'] }}", run_id="1", deferrable=True,
                     timeout=300, **FAST)

with DAG("rel_triggerer_restart", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    for i in range(3):
        MuseRunOperator(task_id=f"muse_{i}", name="sw_example", cmd=f"sleep 15; python /add.py {i} 100",
                        deferrable=True, **FAST)
    for i in range(2):
        RescaleRunSensor(task_id=f"rescale_{i}", job_id="{{ dag_run.conf['job_ids'][%d] }}" % i, run_id="1",
                         deferrable=True, timeout=300, outcome_wait=10, **FAST)
'''


@pytest.fixture(scope="module")
def emulator_for_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorServer]:
    """The emulator the deployment talks to, with distinctive secrets to look for in the logs."""
    config = EmulatorConfig(
        data_dir=tmp_path_factory.mktemp("stack-emulator"),
        muse_users={"alice": MuseUser(STACK_PASSWORD, "user")},
        rescale_api_keys=frozenset({STACK_KEY}),
        time_scale=1.0,
        pending_seconds=0.3,
        seed=13,
    )
    with EmulatorServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def stack(emulator_for_stack: EmulatorServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowStack]:
    """A running private deployment serving the DAGs above."""
    home = tmp_path_factory.mktemp("airflow-crash-home")
    dags = home / "dags"
    dags.mkdir()
    (dags / "reliability_dags.py").write_text(DAGS)
    deployment = AirflowStack(home, dags, emulator_for_stack.airflow_conn_env())
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


def _start_rescale_job(server: EmulatorServer, command: str) -> str:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {STACK_KEY}"
    body = {"name": "crash", "jobanalyses": [{"command": command}]}
    job_id = session.post(f"{server.rescale_url}/api/v2/jobs/", json=body, timeout=10).json()["id"]
    session.post(f"{server.rescale_url}/api/v2/jobs/{job_id}/submit/", timeout=10).raise_for_status()
    return job_id


def _counters(server: EmulatorServer) -> dict[str, dict[str, int]]:
    return server.counters.snapshot()


def test_a_task_killed_after_submit_reattaches_on_retry(stack: AirflowStack, emulator_for_stack: EmulatorServer) -> None:
    dag_id = "rel_kill_after_submit"
    run_id = stack.trigger(dag_id)
    assert stack.wait_run_finished(dag_id, run_id, SCENARIO_TIMEOUT) == "success", stack.task_states(dag_id, run_id)
    assert stack.try_numbers(dag_id, run_id)["run"] == 2  # the first try really died
    submissions = _counters(emulator_for_stack).get("muse_submissions", {})
    assert submissions.get("sleep 6; python /add.py 4 5") == 1, submissions
    value = stack.xcom(dag_id, run_id, "run")
    assert value["stdout"].strip() == "9.0", value


def test_a_deferred_rescale_wait_marked_failed_stops_the_run_once(
    stack: AirflowStack, emulator_for_stack: EmulatorServer
) -> None:
    dag_id = "rel_mark_failed"
    job_id = _start_rescale_job(emulator_for_stack, "sleep 120")
    run_id = stack.trigger(dag_id, {"job_id": job_id})
    wait_for(lambda: stack.assigned_triggers(dag_id, run_id) == 1, SCENARIO_TIMEOUT / 2, "the wait to be deferred and picked up")
    time.sleep(1.0)  # the trigger is polling
    stack.mark_failed(dag_id, run_id, "wait")
    stop_key = f"{job_id}/1"
    wait_for(lambda: _counters(emulator_for_stack).get("rescale_stops", {}).get(stop_key), 30,
             f"the triggerer to stop run {stop_key}")
    time.sleep(4.0)  # a second stop would come from a repeated on_kill or a restarted trigger
    assert _counters(emulator_for_stack)["rescale_stops"][stop_key] == 1
    assert stack.task_states(dag_id, run_id)["wait"] == "failed"


def test_a_killed_triggerer_loses_no_wait(stack: AirflowStack, emulator_for_stack: EmulatorServer) -> None:
    dag_id = "rel_triggerer_restart"
    job_ids = [_start_rescale_job(emulator_for_stack, "sleep 15; echo ok > out.txt") for _ in range(2)]
    stops_before = sum(_counters(emulator_for_stack).get("rescale_stops", {}).values())
    run_id = stack.trigger(dag_id, {"job_ids": job_ids})
    wait_for(lambda: stack.assigned_triggers(dag_id, run_id) == 5, SCENARIO_TIMEOUT / 2,
             "the five waits to be deferred and picked up")
    stack.kill("triggerer", signal.SIGKILL)
    time.sleep(1.0)
    stack.spawn("triggerer", "triggerer")
    assert stack.wait_run_finished(dag_id, run_id, SCENARIO_TIMEOUT) == "success", stack.task_states(dag_id, run_id)

    submissions = _counters(emulator_for_stack).get("muse_submissions", {})
    for i in range(3):
        assert submissions.get(f"sleep 15; python /add.py {i} 100") == 1, submissions
        assert stack.xcom(dag_id, run_id, f"muse_{i}")["stdout"].strip() == f"{i + 100}.0"
    for i in range(2):
        assert stack.xcom(dag_id, run_id, f"rescale_{i}")["status"] == "success"
    assert sum(_counters(emulator_for_stack).get("rescale_stops", {}).values()) == stops_before
    # The new triggerer really took the waits over: each task has a trigger log of its own.
    task_logs = stack.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    jobs = [row[0] for row in stack._query("SELECT id FROM job WHERE job_type = 'TriggererJob' ORDER BY id")]
    assert len(jobs) == 2, jobs
    for task in [f"muse_{i}" for i in range(3)] + [f"rescale_{i}" for i in range(2)]:
        assert list((task_logs / f"task_id={task}").glob(f"*.trigger.{jobs[-1]}.log")), task


def test_no_secret_in_any_log_of_the_deployment(stack: AirflowStack) -> None:
    # Runs last in this module: every scenario above has written its task and service logs.
    logs = stack.all_logs()
    assert "rel_kill_after_submit" in logs or len(logs) > 1000
    for secret in (STACK_PASSWORD, STACK_KEY):
        assert secret not in logs
    # Nor in the serialized trigger kwargs kept in the database.
    rows = stack._query("SELECT kwargs FROM trigger")
    assert STACK_PASSWORD not in json.dumps(rows) and STACK_KEY not in json.dumps(rows)
