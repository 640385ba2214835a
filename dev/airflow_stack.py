"""
A real, private Airflow deployment for crash tests, the fault soak and the worker-cost benchmark:
API server, scheduler (LocalExecutor) and triggerer, each its own process group, on SQLite in a
temporary AIRFLOW_HOME, all on loopback.

Every process is started here and ended here by its own process group id; nothing else is touched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
AIRFLOW = Path(sys.executable).with_name("airflow")
START_TIMEOUT = 120.0


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def kill_by_environment(variable: str) -> list[int]:
    """SIGKILL every live process (but this one) whose environment holds ``variable`` (``NAME=value``); return their ids."""
    needle = variable.encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes() + b"\0":
                found.append(int(entry.name))
        except OSError:
            continue
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return found


class AirflowStack:
    """
    API server + scheduler + triggerer on a temporary home.

    :param home: the AIRFLOW_HOME folder (the database and logs go there).
    :param dags_folder: the folder of the DAG files to serve.
    :param extra_env: more environment (``AIRFLOW_CONN_*`` of the emulator...).
    """

    def __init__(self, home: Path, dags_folder: Path, extra_env: Mapping[str, str]) -> None:
        self.home = home
        self.dags_folder = dags_folder
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.generation: dict[str, int] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))}
        self.env = {
            **base,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": "reliability-tests-only",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            # A dead triggerer's waits are adopted after 4 s instead of 30 s.
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "4",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__HPC__RESULTS_BASE": str(home / "hpc-results"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **extra_env,
        }

    # ----- life cycle ----------------------------------------------------------------------------

    def run_cli(self, *args: str, timeout: float = 180) -> str:
        """Run one ``airflow`` command to its end; return its output."""
        done = subprocess.run([str(AIRFLOW), *args], env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"airflow {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    def start(self) -> AirflowStack:
        """Migrate the database, serialize the DAGs, start the three services; return once the API answers."""
        self.prepare()
        return self.start_services()

    def prepare(self) -> AirflowStack:
        """Migrate the database and serialize the DAGs, starting no service (the database can be adjusted then)."""
        self.run_cli("db", "migrate")
        self.run_cli("dags", "reserialize")
        return self

    def start_services(self) -> AirflowStack:
        """Start the API server, scheduler and triggerer of a prepared home; return once the API answers."""
        self.spawn("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.api_port))
        self.spawn("scheduler", "scheduler")
        self.spawn("triggerer", "triggerer")
        wait_for(self._api_up, START_TIMEOUT, "the API server")
        return self

    def _api_up(self) -> bool:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"airflow {name} exited with {process.returncode}:\n{self.log_tail(name)}")
        try:
            return requests.get(f"{self.api_url}/api/v2/monitor/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def spawn(self, name: str, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        """
        Start ``airflow ARGS`` in its own process group, its output in ``{name}-{n}.log``.

        :param env: this process's environment instead of the deployment's (a worker with its own
            AIRFLOW_HOME, as on another machine).
        :param cwd: its working folder instead of the deployment's home.
        """
        generation = self.generation.get(name, 0) + 1
        self.generation[name] = generation
        with (self.home / f"{name}-{generation}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                [str(AIRFLOW), *args], env=dict(env) if env is not None else self.env, cwd=cwd or self.home,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group of one service and reap it."""
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self) -> None:
        """End every service: SIGTERM to each group, SIGKILL to what remains after a grace period."""
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)
        self.processes.clear()

    def kill_leftovers(self) -> list[int]:
        """
        Kill (SIGKILL) the live processes whose environment names this deployment's AIRFLOW_HOME.

        Call it after :meth:`stop`: anything found then outlived the deployment. Returns their ids.
        """
        return kill_by_environment(f"AIRFLOW_HOME={self.home}")

    def log_text(self, name: str) -> str:
        """Return a service's latest log."""
        path = self.home / f"{name}-{self.generation.get(name, 1)}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, name: str, chars: int = 4000) -> str:
        """Return the end of a service's latest log."""
        return self.log_text(name)[-chars:]

    def executor_reported(self, dag_id: str, run_id: str, task_id: str, try_number: int, state: str) -> bool:
        """Tell whether the scheduler has taken in the executor's report that a try's workload ended."""
        key = f"TaskInstanceKey(dag_id='{dag_id}', task_id='{task_id}', run_id='{run_id}', try_number={try_number},"
        return f"Received executor event with state {state} for task instance {key}" in self.log_text("scheduler")

    # ----- DAG runs ------------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the REST API (every user is an admin in this deployment)."""
        answer = requests.request(method, f"{self.api_url}/api/v2/{path}", json=body, timeout=30)
        assert answer.status_code < 400, f"{method} {path}: {answer.status_code} {answer.text[:500]}"
        return answer.json()

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        """Unpause and trigger a DAG; return the run id."""
        self.api("PATCH", f"dags/{dag_id}", {"is_paused": False})
        return self.api("POST", f"dags/{dag_id}/dagRuns", {"logical_date": None, "conf": dict(conf or {})})["dag_run_id"]

    def mark_failed(self, dag_id: str, run_id: str, task_id: str) -> None:
        """Do what a user's "Mark as failed" does in the UI."""
        self.api("PATCH", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}", {"new_state": "failed"})

    def _query(self, sql: str, *params: Any) -> list[tuple]:
        with sqlite3.connect(self.home / "airflow.db", timeout=30) as db:
            return db.execute(sql, params).fetchall()

    def query(self, sql: str, *params: Any) -> list[tuple]:
        """Run one SQL statement on the metadata database (SQLite); return its rows."""
        return self._query(sql, *params)

    def execute_script(self, sql: str) -> None:
        """Run SQL statements on the metadata database (SQLite) and commit them."""
        with sqlite3.connect(self.home / "airflow.db", timeout=30) as db:
            db.executescript(sql)

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """Return the state of every task instance of a run, by task id."""
        rows = self._query("SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return dict(rows)

    def try_numbers(self, dag_id: str, run_id: str) -> dict[str, int]:
        """Return the try number of every task instance of a run."""
        return dict(self._query("SELECT task_id, try_number FROM task_instance WHERE dag_id = ? AND run_id = ?", dag_id, run_id))

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        """Return the state of a DAG run."""
        rows = self._query("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return rows[0][0] if rows else None

    def assigned_triggers(self, dag_id: str, run_id: str) -> int:
        """Return how many of the run's deferred task instances have a trigger a triggerer picked up."""
        rows = self._query(
            "SELECT COUNT(*) FROM task_instance ti JOIN trigger t ON ti.trigger_id = t.id "
            "WHERE ti.dag_id = ? AND ti.run_id = ? AND ti.state = 'deferred' AND t.triggerer_id IS NOT NULL",
            dag_id, run_id,
        )
        return rows[0][0]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """Return one XCom value of a run, decoded."""
        rows = self._query(
            'SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ? AND "key" = ?', dag_id, run_id, task_id, key
        )
        if not rows:
            raise KeyError(f"{task_id}/{key}")
        value = rows[0][0]
        while isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError:
                break
        return value

    def wait_run_finished(self, dag_id: str, run_id: str, timeout: float) -> str:
        """Wait until a DAG run ends; return its state."""
        def finished() -> str | None:
            state = self.run_state(dag_id, run_id)
            return state if state in ("success", "failed") else None

        try:
            return wait_for(finished, timeout, f"DAG run {dag_id}/{run_id}")
        except AssertionError:
            raise AssertionError(
                f"{dag_id}/{run_id} did not finish: {self.task_states(dag_id, run_id)}\n"
                f"--- scheduler ---\n{self.log_tail('scheduler')}\n--- triggerer ---\n{self.log_tail('triggerer')}"
            ) from None

    def all_logs(self) -> str:
        """Return every log this deployment wrote: services and task logs."""
        texts = [p.read_text(errors="replace") for p in self.home.glob("*.log")]
        texts += [p.read_text(errors="replace") for p in (self.home / "logs").rglob("*.log")]
        return "\n".join(texts)
