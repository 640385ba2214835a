"""
Crash recovery with real Airflow processes (API server, scheduler with LocalExecutor, triggerer).

- The task process is killed (SIGKILL) right after the Muse submit, before the deferral: the
  retry re-attaches to the same run; one submission in all; the result is delivered.
- A deferred Rescale wait is marked failed by the user: the triggerer's ``on_kill`` stops the run,
  exactly once.
- The triggerer is killed (SIGKILL, whole process group) while 50 waits are deferred, then started
  again: every wait completes, nothing is submitted twice, nothing is stopped (half the Rescale
  waits end in the triggerer, ``end_from_trigger``).
- The service is unreachable for 30 s while waits are deferred (a TCP proxy in front of the
  emulator refuses connections and cuts open ones): the waits ride the outage out with the default
  retry budget, then succeed.

The runs of every scenario but the Rescale wait marked failed wait for a gate file the test
creates, so they end only once the crash or the outage is over, however long the deployment took
to defer every wait. In the first scenario the gate opens
once the scheduler has taken in the end of the retry's deferring workload: Airflow 3.3 can report
it seconds late, and a trigger that fires before it makes the scheduler fail the resumed task as
killed externally (apache/airflow#71580, #72716), which is not what this scenario is about.
One deployment serves every scenario; each scenario is bounded (a few minutes at most).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dev.airflow_stack import AirflowStack, wait_for
from reliability_support import TcpProxy

from hpc_emulator import EmulatorConfig, EmulatorServer
from hpc_emulator.config import MuseUser

pytestmark = pytest.mark.slow

STACK_PASSWORD = "stack-pw-Hq93-SECRET"
STACK_KEY = "stack-rk-0c77e2-SECRET"
SCENARIO_TIMEOUT = 90.0
# The figures: 50 waits deferred when the triggerer dies, 30 s without the service.
RESTART_MUSE_WAITS = 40
RESTART_RESCALE_WAITS = 10
OUTAGE_SECONDS = 30.0

DAGS = '''
from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor

FAST = {"poll_interval": 0.5, "max_poll_interval": 1.0}
RESTART_MUSE_WAITS = __RESTART_MUSE_WAITS__
RESTART_RESCALE_WAITS = __RESTART_RESCALE_WAITS__


class KillAfterSubmit(MuseRunOperator):
    """Dies by SIGKILL on its first try, right after the submit (the key is already persisted)."""

    def _resume_or_submit(self, context):
        found = super()._resume_or_submit(context)
        if context["ti"].try_number == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return found


with DAG("rel_kill_after_submit", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    KillAfterSubmit(task_id="run", name="sw_example", deferrable=True, retries=1, retry_delay=timedelta(seconds=1),
                    cmd="until [ -e {{ dag_run.conf['gate'] }} ]; do sleep 0.2; done; python /add.py 4 5", **FAST)

with DAG("rel_mark_failed", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    RescaleRunSensor(task_id="wait", job_id="{{ dag_run.conf['job_id'] }}", run_id="1", deferrable=True,
                     timeout=300, **FAST)

with DAG("rel_triggerer_restart", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
         max_active_tasks=64):
    gate = "{{ dag_run.conf['gate'] }}"
    for i in range(RESTART_MUSE_WAITS):
        MuseRunOperator(task_id=f"muse_{i}", name="sw_example",
                        cmd="until [ -e %s ]; do sleep 0.2; done; python /add.py %d 100" % (gate, i),
                        deferrable=True, **FAST)
    for i in range(RESTART_RESCALE_WAITS):
        # Half of them end in the triggerer: the new triggerer must end those tasks itself.
        RescaleRunSensor(task_id=f"rescale_{i}", job_id="{{ dag_run.conf['job_ids'][%d] }}" % i, run_id="1",
                         deferrable=True, timeout=600, outcome_wait=10, end_from_trigger=i % 2 == 0, **FAST)

# The same waits through connections behind a proxy, with the default retry budget.
with DAG("rel_outage", schedule=None, start_date=datetime(2024, 1, 1), catchup=False):
    gate = "{{ dag_run.conf['gate'] }}"
    for i in range(3):
        MuseRunOperator(task_id=f"muse_{i}", muse_conn_id="muse_outage", name="sw_example",
                        cmd="until [ -e %s ]; do sleep 0.2; done; python /add.py %d 200" % (gate, i),
                        deferrable=True, **FAST)
    for i in range(2):
        RescaleRunSensor(task_id=f"rescale_{i}", rescale_conn_id="rescale_outage",
                         job_id="{{ dag_run.conf['job_ids'][%d] }}" % i, run_id="1",
                         deferrable=True, timeout=600, outcome_wait=10, **FAST)
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
def outage_proxy(emulator_for_stack: EmulatorServer) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the emulator, which the outage scenario takes down."""
    proxy = TcpProxy(emulator_for_stack.port)
    proxy.up()
    yield proxy
    proxy.down()


def _proxied_connections(server: EmulatorServer, proxy: TcpProxy) -> dict[str, str]:
    """``muse_outage`` and ``rescale_outage``: the emulator's connections, through the proxy."""
    direct = f"127.0.0.1:{server.port}"
    muse = {**server.muse_connection("alice"), "host": server.muse_url.replace(direct, f"127.0.0.1:{proxy.port}")}
    rescale = {**server.rescale_connection(), "host": server.rescale_url.replace(direct, f"127.0.0.1:{proxy.port}")}
    return {"AIRFLOW_CONN_MUSE_OUTAGE": json.dumps(muse), "AIRFLOW_CONN_RESCALE_OUTAGE": json.dumps(rescale)}


@pytest.fixture(scope="module")
def stack(
    emulator_for_stack: EmulatorServer, outage_proxy: TcpProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowStack]:
    """A running private deployment serving the DAGs above."""
    home = tmp_path_factory.mktemp("airflow-crash-home")
    dags = home / "dags"
    dags.mkdir()
    (dags / "reliability_dags.py").write_text(
        DAGS.replace("__RESTART_MUSE_WAITS__", str(RESTART_MUSE_WAITS))
        .replace("__RESTART_RESCALE_WAITS__", str(RESTART_RESCALE_WAITS))
    )
    env = {**emulator_for_stack.airflow_conn_env(), **_proxied_connections(emulator_for_stack, outage_proxy)}
    deployment = AirflowStack(home, dags, env)
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


def test_a_task_killed_after_submit_reattaches_on_retry(
    stack: AirflowStack, emulator_for_stack: EmulatorServer, tmp_path: Path
) -> None:
    dag_id = "rel_kill_after_submit"
    gate = tmp_path / "gate"
    run_id = stack.trigger(dag_id, {"gate": str(gate)})
    wait_for(lambda: stack.try_numbers(dag_id, run_id).get("run") == 2 and stack.assigned_triggers(dag_id, run_id) == 1,
             SCENARIO_TIMEOUT, "the retry to re-attach and defer")
    wait_for(lambda: stack.executor_reported(dag_id, run_id, "run", 2, "success"), SCENARIO_TIMEOUT,
             "the scheduler to take in the end of the deferring workload")
    gate.touch()
    state = stack.wait_run_finished(dag_id, run_id, SCENARIO_TIMEOUT)
    assert state == "success", (stack.task_states(dag_id, run_id), stack.log_tail("scheduler"))
    assert stack.try_numbers(dag_id, run_id)["run"] == 2  # the first try really died
    submissions = _counters(emulator_for_stack).get("muse_submissions", {})
    assert submissions.get(f"until [ -e {gate} ]; do sleep 0.2; done; python /add.py 4 5") == 1, submissions
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


def _gated(server: EmulatorServer, gate: Path, count: int) -> list[str]:
    """Start ``count`` one-run Rescale jobs that end once ``gate`` exists; return their ids."""
    return [_start_rescale_job(server, f"until [ -e {gate} ]; do sleep 0.2; done; echo ok > out.txt") for _ in range(count)]


def test_a_killed_triggerer_loses_no_wait(stack: AirflowStack, emulator_for_stack: EmulatorServer, tmp_path: Path) -> None:
    dag_id = "rel_triggerer_restart"
    waits = RESTART_MUSE_WAITS + RESTART_RESCALE_WAITS
    gate = tmp_path / "go"
    job_ids = _gated(emulator_for_stack, gate, RESTART_RESCALE_WAITS)
    stops_before = sum(_counters(emulator_for_stack).get("rescale_stops", {}).values())
    run_id = stack.trigger(dag_id, {"job_ids": job_ids, "gate": str(gate)})
    wait_for(lambda: stack.assigned_triggers(dag_id, run_id) == waits, 4 * SCENARIO_TIMEOUT,
             f"the {waits} waits to be deferred and picked up")
    stack.kill("triggerer", signal.SIGKILL)
    time.sleep(1.0)
    stack.spawn("triggerer", "triggerer")
    gate.touch()  # the runs end only now: each event must come from the new triggerer
    assert stack.wait_run_finished(dag_id, run_id, 4 * SCENARIO_TIMEOUT) == "success", stack.task_states(dag_id, run_id)

    submissions = _counters(emulator_for_stack).get("muse_submissions", {})
    for i in range(RESTART_MUSE_WAITS):
        assert submissions.get(f"until [ -e {gate} ]; do sleep 0.2; done; python /add.py {i} 100") == 1, submissions
        assert stack.xcom(dag_id, run_id, f"muse_{i}")["stdout"].strip() == f"{i + 100}.0"
    for i in range(RESTART_RESCALE_WAITS):
        value = stack.xcom(dag_id, run_id, f"rescale_{i}")
        assert value["status"] == "success" and value["job_id"] == job_ids[i], value
    assert sum(_counters(emulator_for_stack).get("rescale_stops", {}).values()) == stops_before
    # The new triggerer really took the waits over: each task has a trigger log of its own.
    task_logs = stack.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    jobs = [row[0] for row in stack.query("SELECT id FROM job WHERE job_type = 'TriggererJob' ORDER BY id")]
    assert len(jobs) == 2, jobs
    tasks = [f"muse_{i}" for i in range(RESTART_MUSE_WAITS)] + [f"rescale_{i}" for i in range(RESTART_RESCALE_WAITS)]
    for task in tasks:
        assert list((task_logs / f"task_id={task}").glob(f"*.trigger.{jobs[-1]}.log")), task


def test_waits_ride_out_a_30_second_outage(
    stack: AirflowStack, emulator_for_stack: EmulatorServer, outage_proxy: TcpProxy, tmp_path: Path
) -> None:
    dag_id = "rel_outage"
    gate = tmp_path / "go"
    job_ids = _gated(emulator_for_stack, gate, 2)
    stops_before = sum(_counters(emulator_for_stack).get("rescale_stops", {}).values())
    run_id = stack.trigger(dag_id, {"job_ids": job_ids, "gate": str(gate)})
    wait_for(lambda: stack.assigned_triggers(dag_id, run_id) == 5, 2 * SCENARIO_TIMEOUT,
             "the five waits to be deferred and picked up")
    time.sleep(1.0)  # the triggers are polling
    outage_proxy.down()
    try:
        time.sleep(OUTAGE_SECONDS)
        # Still waiting: no wait gave up during the outage.
        assert all(state == "deferred" for state in stack.task_states(dag_id, run_id).values()), \
            stack.task_states(dag_id, run_id)
    finally:
        outage_proxy.up()
    gate.touch()
    assert stack.wait_run_finished(dag_id, run_id, 2 * SCENARIO_TIMEOUT) == "success", stack.task_states(dag_id, run_id)

    submissions = _counters(emulator_for_stack).get("muse_submissions", {})
    for i in range(3):
        assert submissions.get(f"until [ -e {gate} ]; do sleep 0.2; done; python /add.py {i} 200") == 1, submissions
        assert stack.xcom(dag_id, run_id, f"muse_{i}")["stdout"].strip() == f"{i + 200}.0"
    for i in range(2):
        assert stack.xcom(dag_id, run_id, f"rescale_{i}")["status"] == "success"
    assert sum(_counters(emulator_for_stack).get("rescale_stops", {}).values()) == stops_before
    # The waits really met the outage: their trigger logs hold the transport's retries.
    trigger_logs = "".join(
        path.read_text(errors="replace")
        for path in (stack.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}").rglob("*.trigger.*.log")
    )
    assert "retry 1 of 4" in trigger_logs, trigger_logs[-3000:]


def test_no_secret_in_any_log_of_the_deployment(stack: AirflowStack) -> None:
    # Runs last in this module: every scenario above has written its task and service logs.
    logs = stack.all_logs()
    assert "rel_kill_after_submit" in logs or len(logs) > 1000
    for secret in (STACK_PASSWORD, STACK_KEY):
        assert secret not in logs
    # Nor in the serialized trigger kwargs kept in the database.
    rows = stack.query("SELECT kwargs FROM trigger")
    assert STACK_PASSWORD not in json.dumps(rows) and STACK_KEY not in json.dumps(rows)
