"""
Scenario 2: triggerer failover. 200 deferred waits are spread over both triggerers; one is killed
(SIGKILL, its whole process group); the other must adopt its triggers within Airflow's triggerer
health-check threshold (plus a margin for a loaded two-core machine), and every wait must then
complete: no Muse run submitted twice, no Rescale run stopped (a redistributed trigger must not
call its ``on_kill``).

Every remote command waits for a gate file the test creates only once the failover is over, so
each event comes from the surviving triggerer. The killed triggerer is started again at the end,
so the deployment has two for whatever runs next.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from dev.airflow_stack import wait_for
from dev.cluster.deployment import TRIGGERER_HEALTH_CHECK_THRESHOLD, TRIGGERERS
from system_support import SYSTEM_KEY

from hpc_emulator import EmulatorServer

pytestmark = pytest.mark.system

# As in dags/system_failover.py.
MUSE_WAITS = 100
RESCALE_WAITS = 100
WAITS = MUSE_WAITS + RESCALE_WAITS
# 200 worker runs to defer take 4 to 6 minutes on two quiet cores, much longer on a shared one:
# the wait fails when no wait deferred for STALL_TIMEOUT, or after DEFER_TIMEOUT in all.
STALL_TIMEOUT = 180.0
DEFER_TIMEOUT = 1200.0
FINISH_TIMEOUT = 900.0
# Beyond the threshold: the survivor's next heartbeat loop, loading 100 triggers, a loaded machine.
ADOPTION_MARGIN = 20.0
#: Each triggerer must hold at least this many of the waits before the kill: really spread.
MIN_SHARE = 20


def _start_gated_rescale_jobs(server: EmulatorServer, gate: Path, count: int) -> list[str]:
    """Create and submit ``count`` one-run Rescale jobs that end once ``gate`` exists; return their ids."""
    session = requests.Session()
    session.headers["Authorization"] = f"Token {SYSTEM_KEY}"
    body = {"name": "failover", "jobanalyses": [{"command": f"until [ -e {gate} ]; do sleep 1; done; echo ok > out.txt"}]}
    ids = []
    for _ in range(count):
        job_id = session.post(f"{server.rescale_url}/api/v2/jobs/", json=body, timeout=10).json()["id"]
        session.post(f"{server.rescale_url}/api/v2/jobs/{job_id}/submit/", timeout=10).raise_for_status()
        ids.append(job_id)
    return ids


def _trigger_ids(airflow: Any, dag_id: str, run_id: str) -> list[int]:
    rows = airflow.query(
        "SELECT trigger_id FROM task_instance WHERE dag_id = ? AND run_id = ? AND trigger_id IS NOT NULL", dag_id, run_id
    )
    return [trigger_id for (trigger_id,) in rows]


def _muse_command(gate: Path, i: int) -> str:
    return f"until [ -e {gate} ]; do sleep 1; done; python /add.py {i} 100"


def test_a_killed_triggerer_s_waits_are_adopted_and_complete(
    cluster: Any, system_emulator: EmulatorServer, tmp_path: Path
) -> None:
    airflow = cluster.airflow
    dag_id = "system_failover"
    gate = tmp_path / "go"
    job_ids = _start_gated_rescale_jobs(system_emulator, gate, RESCALE_WAITS)
    stops_before = sum(system_emulator.counters.snapshot().get("rescale_stops", {}).values())
    run_id = airflow.trigger(dag_id, {"job_ids": job_ids, "gate": str(gate)})

    progress = {"count": -1, "at": time.monotonic()}

    def all_deferred() -> bool:
        # A wait that failed before deferring would keep the count short until the timeout: say so at once.
        failed = sorted(task for task, state in airflow.task_states(dag_id, run_id).items()
                        if state in ("failed", "upstream_failed"))
        assert not failed, f"failed before the failover: {failed}"
        count = airflow.assigned_triggers(dag_id, run_id)
        if count != progress["count"]:
            progress.update(count=count, at=time.monotonic())
        stalled = time.monotonic() - progress["at"]
        assert stalled < STALL_TIMEOUT, f"no wait deferred for {stalled:.0f} s, {count} of {WAITS} deferred"
        return count == WAITS

    started = time.monotonic()
    wait_for(all_deferred, DEFER_TIMEOUT, f"the {WAITS} waits to be deferred and picked up", interval=2.0)
    print(f"\n{WAITS} waits deferred and picked up in {time.monotonic() - started:.0f} s")

    # Spread over both triggerers.
    live = airflow.live_triggerers()
    assert sorted(live) == sorted(TRIGGERERS), live
    triggers = _trigger_ids(airflow, dag_id, run_id)
    assert len(triggers) == WAITS
    shares = airflow.triggers_by_triggerer(triggers)
    print("triggers per triggerer job before the kill:", {name: shares.get(job) for name, job in live.items()})
    assert all(shares.get(job, 0) >= MIN_SHARE for job in live.values()), (live, shares)

    # Kill the one holding the most: the survivor must take every one of them over.
    victim = max(live, key=lambda name: shares.get(live[name], 0))
    survivor = next(name for name in live if name != victim)
    victim_triggers = airflow.query(
        "SELECT id FROM trigger WHERE triggerer_id = ? AND id = ANY(?)", live[victim], triggers
    )
    victim_ids = [trigger_id for (trigger_id,) in victim_triggers]
    airflow.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    def adopted() -> bool:
        return airflow.triggers_by_triggerer(victim_ids) == {live[survivor]: len(victim_ids)}

    limit = TRIGGERER_HEALTH_CHECK_THRESHOLD + ADOPTION_MARGIN
    wait_for(adopted, limit + 30, f"{survivor} to adopt the {len(victim_ids)} triggers of {victim}", interval=0.25)
    adoption = time.monotonic() - killed_at
    print(f"{survivor} adopted the {len(victim_ids)} triggers of {victim} {adoption:.1f} s after the kill "
          f"(health-check threshold {TRIGGERER_HEALTH_CHECK_THRESHOLD} s)")
    assert adoption <= limit, f"adoption took {adoption:.1f} s, over {limit:.0f} s"
    assert airflow.triggers_by_triggerer(triggers) == {live[survivor]: WAITS}

    gate.touch()  # the runs end only now: every event comes from the survivor
    state = airflow.wait_run_finished(dag_id, run_id, FINISH_TIMEOUT)
    assert state == "success", {k: v for k, v in airflow.task_states(dag_id, run_id).items() if v != "success"}

    counters = system_emulator.counters.snapshot()
    submissions = counters.get("muse_submissions", {})
    for i in range(MUSE_WAITS):
        assert submissions.get(_muse_command(gate, i)) == 1, (i, submissions.get(_muse_command(gate, i)))
        assert airflow.xcom(dag_id, run_id, f"muse_{i}")["stdout"].strip() == f"{i + 100}.0"
    for i in range(RESCALE_WAITS):
        value = airflow.xcom(dag_id, run_id, f"rescale_{i}")
        assert value["status"] == "success" and value["job_id"] == job_ids[i], value
    assert sum(counters.get("rescale_stops", {}).values()) == stops_before, counters.get("rescale_stops")
    assert all(try_number == 1 for try_number in airflow.try_numbers(dag_id, run_id).values())

    # Two triggerers again for what runs next.
    airflow.start_triggerer(victim)
    wait_for(lambda: len(airflow.live_triggerers()) == len(TRIGGERERS), 120, f"{victim} to start again")
