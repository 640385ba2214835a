"""
Scenario 1: the example DAGs on the production-shaped deployment, and a result handed from one
Celery worker to another through S3.

Every example DAG is triggered through the REST API and must succeed on CeleryExecutor with
PostgreSQL, its results under ``[hpc] results_base = s3://...`` and read back downstream; the
asset the chain produces must start its downstream DAG. Then a producer pinned to worker A hands
a Muse result to a consumer pinned to worker B: they must have run on different workers, the
object must be on S3, and both task logs must be readable from the API server (remote logging),
though the workers share no disk.
"""

from __future__ import annotations

from typing import Any

import pytest
from dev.airflow_stack import wait_for

pytestmark = pytest.mark.system

RUN_TIMEOUT = 480.0
# The Rescale example's run lasts 2 minutes: it must still be running when the snapshot task
# starts, which a loaded two-core machine (five DAGs at once) can delay by a minute or more.
RESCALE_STEPS = 60
EXAMPLES: dict[str, dict[str, Any]] = {
    "example_muse_single": {},
    "example_muse_sweep": {},
    "example_muse_runzip": {},
    "example_rescale_harvest": {"steps": RESCALE_STEPS, "step_seconds": 2.0},
    "example_chain_muse_rescale": {},
}


def _s3_key(cluster: Any, path: str) -> str:
    """Turn ``s3://aws_default@bucket/key`` into ``key``, checking it names the deployment's store."""
    prefix = f"s3://aws_default@{cluster.s3.bucket}/"
    assert path.startswith(prefix + "results/"), path
    return path[len(prefix):]


def _assert_on_s3(cluster: Any, *paths: str) -> None:
    keys = set(cluster.s3.keys("results/"))
    for path in paths:
        assert _s3_key(cluster, path) in keys, (path, sorted(keys)[:50])


def test_the_example_dags_succeed_with_results_on_s3(cluster: Any) -> None:
    airflow = cluster.airflow
    # Scheduled on the chain's asset: it runs only if unpaused (DAGs start paused).
    airflow.api("PATCH", "dags/example_chain_downstream", {"is_paused": False})
    runs = {dag_id: airflow.trigger(dag_id, conf) for dag_id, conf in EXAMPLES.items()}
    states = {dag_id: airflow.wait_run_finished(dag_id, run_id, RUN_TIMEOUT) for dag_id, run_id in runs.items()}
    assert states == dict.fromkeys(EXAMPLES, "success"), {
        dag_id: airflow.task_states(dag_id, runs[dag_id]) for dag_id in EXAMPLES
    }

    assert airflow.xcom("example_muse_single", runs["example_muse_single"], "show") == 9.0
    assert airflow.xcom("example_muse_sweep", runs["example_muse_sweep"], "total") == 3.0 + 7.0 + 11.5
    assert airflow.xcom("example_muse_runzip", runs["example_muse_runzip"], "read_stdout") == "59.0"
    runzip = airflow.xcom("example_muse_runzip", runs["example_muse_runzip"], "add")

    summary = airflow.xcom("example_rescale_harvest", runs["example_rescale_harvest"], "summarize")
    assert summary["steps"] == RESCALE_STEPS, summary

    table = airflow.xcom("example_chain_muse_rescale", runs["example_chain_muse_rescale"], "table")
    assert [(row["prepared"], row["solved"]) for row in table] == [("3.0", "9"), ("7.0", "49"), ("11.5", "132.25")], table
    _assert_on_s3(cluster, runzip["file"]["path"], summary["path"])

    # The chain's asset starts its downstream DAG.
    def downstream_succeeded() -> bool:
        rows = airflow.query("SELECT state FROM dag_run WHERE dag_id = ?", "example_chain_downstream")
        return any(state == "success" for (state,) in rows)

    wait_for(downstream_succeeded, 120, "example_chain_downstream to run on the chain's asset", interval=1.0)


def _task_log(airflow: Any, dag_id: str, run_id: str, task_id: str) -> str:
    answer = airflow.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1")
    return "\n".join(str(line.get("event", "")) if isinstance(line, dict) else str(line) for line in answer["content"])


def test_a_result_crosses_workers_through_s3(cluster: Any) -> None:
    airflow = cluster.airflow
    dag_id = "system_cross_worker"
    run_id = airflow.trigger(dag_id)
    assert airflow.wait_run_finished(dag_id, run_id, RUN_TIMEOUT) == "success", airflow.task_states(dag_id, run_id)

    # Each task ran where its queue sent it.
    assert airflow.hostnames(dag_id, run_id) == {"produce": "worker-a", "consume": "worker-b"}
    produced = airflow.xcom(dag_id, run_id, "produce")
    consumed = airflow.xcom(dag_id, run_id, "consume")
    assert consumed == {"path": produced["file"]["path"], "text": "42.0"}, (produced, consumed)
    _assert_on_s3(cluster, produced["file"]["path"])
    # Nor could it have come through a disk: worker B's folders hold no copy of the result.
    assert not [p for p in (cluster.home / "worker-b").rglob("*") if p.name == "stdout.txt"]

    # Both logs are read by the API server from S3 (the workers serve none); uploads end just after the task.
    for task_id in ("produce", "consume"):
        source = f"s3://{cluster.s3.bucket}/logs/dag_id={dag_id}/"
        wait_for(lambda: source in _task_log(airflow, dag_id, run_id, task_id), 60, f"the log of {task_id} on S3",
                 interval=1.0)
        assert "Pre Execute" in _task_log(airflow, dag_id, run_id, task_id)  # the worker's own lines
