"""
The example DAGs a user copies: every deferrable task has retries, and the Muse examples poll at the
interval the docs ask for on the real services unless the demo or a test says otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from airflow.dag_processing.dagbag import DagBag

EXAMPLES = Path(__file__).resolve().parents[2] / "example_dags"
MUSE_EXAMPLES = ("example_muse_single", "example_muse_sweep", "example_muse_runzip")
#: The interval docs/errors.md asks for on the real services (the race of "A deferred task failed
#: with no error in its log" needs one under about 5 s).
REAL_SERVICE_INTERVAL = 10.0


def load_dags(name: str) -> list[Any]:
    """Parse one example file as the DAG processor does; return its DAGs."""
    bag = DagBag(dag_folder=str(EXAMPLES / f"{name}.py"), safe_mode=False)
    assert not bag.import_errors, bag.import_errors
    return list(bag.dags.values())


def setting(task: Any, name: str) -> Any:
    """Return a task's argument, mapped (``partial``) or not."""
    partial = getattr(task, "partial_kwargs", None)
    return partial.get(name) if partial is not None and name in partial else getattr(task, name, None)


def deferrable_tasks(dag: Any) -> list[Any]:
    """Return the tasks that defer (a mapped one through its operator class)."""
    return [
        task for task in dag.tasks
        if setting(task, "deferrable") or hasattr(getattr(task, "operator_class", type(task)), "execute_complete")
    ]


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("example_*.py")))
def test_every_deferrable_task_of_an_example_has_retries(name: str) -> None:
    tasks = [task for dag in load_dags(name) for task in deferrable_tasks(dag)]
    assert tasks, f"{name} has no deferrable task"
    missing = [task.task_id for task in tasks if not setting(task, "retries")]
    assert not missing, f"{name}: deferrable tasks without retries: {missing}"


@pytest.mark.parametrize("name", MUSE_EXAMPLES)
def test_the_muse_examples_poll_every_10_s_unless_the_demo_says_otherwise(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MUSE_EXAMPLE_POLL_SECONDS", raising=False)
    intervals = {task.task_id: setting(task, "poll_interval") for dag in load_dags(name) for task in deferrable_tasks(dag)}
    assert intervals and all(v >= REAL_SERVICE_INTERVAL for v in intervals.values()), intervals

    monkeypatch.setenv("MUSE_EXAMPLE_POLL_SECONDS", "0.5")
    fast = {task.task_id: setting(task, "poll_interval") for dag in load_dags(name) for task in deferrable_tasks(dag)}
    assert set(fast.values()) == {0.5}
