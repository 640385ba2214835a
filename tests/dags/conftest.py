"""
What every ``airflow dags test`` test shares: one Airflow home per test session, and a runner.

The home is a temporary folder with a SQLite database migrated once; ``dags_folder`` points at
``example_dags/`` and results go under the home. Each DAG runs in a real ``airflow dags test``
subprocess (so triggers run in-process after a real ``serialize()`` round trip), and its XCom
values are read back from the database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DAGS = REPO / "example_dags"
AIRFLOW = Path(sys.executable).with_name("airflow")
DAG_TEST_TIMEOUT = 120


@dataclass
class AirflowHome:
    """
    A migrated Airflow home for the test session.

    :param path: the AIRFLOW_HOME folder.
    :param env: the environment every Airflow command of the session runs with.
    """

    path: Path
    env: dict[str, str]

    @property
    def database(self) -> Path:
        """The SQLite metadata database."""
        return self.path / "airflow.db"

    @property
    def results_base(self) -> Path:
        """Where the provider's results go (``[hpc] results_base``)."""
        return self.path / "hpc-results"


@dataclass
class DagTestRun:
    """
    What one ``airflow dags test`` left behind.

    :param returncode: the process's exit code.
    :param output: its stdout and stderr, merged.
    :param run_id: the DAG run's id.
    :param xcom: XCom values by ``(task_id, map_index, key)``.
    :param states: task instance states by ``(task_id, map_index)``.
    """

    returncode: int
    output: str
    run_id: str | None
    xcom: dict[tuple[str, int, str], Any] = field(default_factory=dict)
    states: dict[tuple[str, int], str] = field(default_factory=dict)

    def value(self, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """Return one XCom value (``KeyError`` when the task did not push it)."""
        return self.xcom[(task_id, map_index, key)]

    def mapped_values(self, task_id: str, key: str = "return_value") -> list[Any]:
        """Return the values pushed by every mapped instance of a task, by map index."""
        found = sorted((m, v) for (t, m, k), v in self.xcom.items() if t == task_id and k == key and m >= 0)
        return [v for _, v in found]


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> AirflowHome:
    """Create a temporary Airflow home with SQLite and migrate its database once per session."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLE_DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__HPC__RESULTS_BASE": str(home / "hpc-results"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [str(AIRFLOW), "db", "migrate"], env=env, cwd=home, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"airflow db migrate failed:\n{done.stdout}\n{done.stderr}"
    return AirflowHome(path=home, env=env)


def run_dag_test(
    home: AirflowHome,
    dag_id: str,
    *,
    env: Mapping[str, str] | None = None,
    conf: Mapping[str, Any] | None = None,
    timeout: float = DAG_TEST_TIMEOUT,
) -> DagTestRun:
    """
    Run ``airflow dags test DAG_ID`` in ``home`` and read back its XCom values and task states.

    :param home: the session's Airflow home.
    :param dag_id: the DAG to run.
    :param env: extra environment, e.g. the emulator's ``AIRFLOW_CONN_*`` variables.
    :param conf: the DAG run's conf (``-c``), e.g. the params to use.
    :param timeout: seconds before the run is abandoned (the test then fails).
    """
    command = [str(AIRFLOW), "dags", "test", dag_id]
    if conf:
        command += ["-c", json.dumps(dict(conf))]
    done = subprocess.run(
        command,
        env={**home.env, **(env or {})},
        cwd=home.path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    run_id = _latest_run_id(home.database, dag_id)
    run = DagTestRun(returncode=done.returncode, output=output, run_id=run_id)
    if run_id:
        run.xcom = _xcom_values(home.database, dag_id, run_id)
        run.states = _task_states(home.database, dag_id, run_id)
    return run


def _latest_run_id(database: Path, dag_id: str) -> str | None:
    with sqlite3.connect(database) as db:
        row = db.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,)).fetchone()
    return row[0] if row else None


def _xcom_values(database: Path, dag_id: str, run_id: str) -> dict[tuple[str, int, str], Any]:
    with sqlite3.connect(database) as db:
        rows = db.execute(
            'SELECT task_id, map_index, "key", value FROM xcom WHERE dag_id = ? AND run_id = ?', (dag_id, run_id)
        ).fetchall()
    return {(task_id, map_index, key): _decode(value) for task_id, map_index, key, value in rows}


def _task_states(database: Path, dag_id: str, run_id: str) -> dict[tuple[str, int], str]:
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)
        ).fetchall()
    return {(task_id, map_index): state for task_id, map_index, state in rows}


def _decode(value: Any) -> Any:
    # The JSON column holds the serialized value; a string value may be JSON-encoded once more.
    while isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except (TypeError, ValueError):
            break
    return value


@pytest.fixture(scope="session")
def dag_runner(airflow_home: AirflowHome):
    """Return ``run(dag_id, env=None, conf=None)`` bound to the session's Airflow home."""

    def run(
        dag_id: str,
        *,
        env: Mapping[str, str] | None = None,
        conf: Mapping[str, Any] | None = None,
        timeout: float = DAG_TEST_TIMEOUT,
    ) -> DagTestRun:
        return run_dag_test(airflow_home, dag_id, env=env, conf=conf, timeout=timeout)

    return run
