"""
The metadata rows of the real-triggerer benchmark, written and read inside its Airflow deployment.

``python -m benchmarks.trigger_rows create PLAN``: the DAG run the plan names, triggered as
``airflow dags trigger`` does with the keys as its conf (10,000 keys do not fit on a command
line), then for each Muse key one mapped task instance of ``bench_triggerer`` (task ``watch`` or
``anchor``), deferred on its own trigger row. The rows are those the execution API writes when a task defers
(``ti_update_state``): a ``trigger`` row holding the trigger's encrypted kwargs, then the task
instance set to ``deferred`` with ``trigger_id``, ``next_method`` and ``trigger_timeout``. The
triggers are built with the arguments the deferring sensors give them (``MuseJobSensor.execute``,
``HttpSensor.execute``), except that the first poll comes at once: no worker looked at the run
before.

``python -m benchmarks.trigger_rows events PLAN OUT``: every task instance of the run, its state,
when it was last updated (the moment the triggerer resumed it, for one resumed by an event) and
the event's payload, decoded as a worker would.

Run with the deployment's environment (``AIRFLOW_HOME``, database, Fernet key), as a service is.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from typing import Any

TIMEOUT_S = 3600.0


def _trigger(plan: dict[str, Any], key: str) -> Any:
    interval = plan["interval"]
    if plan["task_id"] == "watch":
        from airflow_provider_hpc.triggers.muse import MuseJobTrigger

        return MuseJobTrigger(
            muse_conn_id="muse_default", name=plan["software"], key=key, poll_interval=interval,
            max_poll_interval=interval, deadline=time.time() + TIMEOUT_S,
        )
    from airflow.providers.http.triggers.http import HttpSensorTrigger

    return HttpSensorTrigger(
        endpoint=f"api/software/muse/state/{plan['software']}/{key}/", http_conn_id=plan["http_conn_id"],
        method="GET", poke_interval=interval,
    )


def create(plan: dict[str, Any]) -> None:
    """Write one deferred task instance and its trigger row per key of the plan."""
    from sqlalchemy import delete

    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models.dag_version import DagVersion
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger
    from airflow.utils import timezone
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType

    with create_session() as session:
        trigger_dag(
            plan["dag_id"], triggered_by=DagRunTriggeredByType.CLI, run_id=plan["run_id"],
            conf={"keys": plan["keys"]}, session=session,
        )
        dag = SerializedDagModel.get_dag(plan["dag_id"], session=session)
        version = DagVersion.get_latest_version(plan["dag_id"], session=session)
        if dag is None or version is None:
            raise SystemExit(f"{plan['dag_id']} is not serialized in this deployment")
        task = dag.get_task(plan["task_id"])
        # The run's creation left the mapped task as one unexpanded instance (map index -1); the
        # expansion replaces it with one instance per key, as here.
        session.execute(
            delete(TaskInstance).where(
                TaskInstance.dag_id == plan["dag_id"], TaskInstance.run_id == plan["run_id"],
                TaskInstance.task_id == plan["task_id"], TaskInstance.map_index == -1,
            )
        )
        triggers = [Trigger.from_object(_trigger(plan, key)) for key in plan["keys"]]
        session.add_all(triggers)
        session.flush()
        now = timezone.utcnow()
        for index, trigger in enumerate(triggers):
            ti = TaskInstance(task, dag_version_id=version.id, run_id=plan["run_id"], map_index=index)
            ti.try_number = 1
            ti.start_date = now
            ti.state = TaskInstanceState.DEFERRED
            ti.trigger_id = trigger.id
            ti.next_method = "execute_complete"
            ti.next_kwargs = {}
            ti.trigger_timeout = now + timedelta(seconds=TIMEOUT_S)
            session.add(ti)


def events(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every task instance of the plan's task in its run: state, last update, event payload."""
    from sqlalchemy import select

    from airflow.models.taskinstance import TaskInstance
    from airflow.sdk.serde import deserialize
    from airflow.utils.session import create_session

    found = []
    with create_session() as session:
        rows = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == plan["dag_id"], TaskInstance.run_id == plan["run_id"],
                TaskInstance.task_id == plan["task_id"], TaskInstance.map_index >= 0,
            )
        )
        for ti in rows:
            event = deserialize(ti.next_kwargs).get("event") if ti.next_kwargs else None
            found.append({
                "key": plan["keys"][ti.map_index],
                "state": ti.state,
                "updated_at": ti.updated_at.timestamp() if ti.updated_at else None,
                "event": event,
            })
    return found


def main(argv: list[str]) -> int:
    """``create PLAN`` or ``events PLAN OUT``."""
    command, plan_path, *rest = argv
    with open(plan_path) as handle:
        plan = json.load(handle)
    if command == "create":
        create(plan)
    elif command == "events":
        with open(rest[0], "w") as handle:
            json.dump(events(plan), handle)
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
