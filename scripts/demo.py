"""
Run the example DAGs end to end against the local emulator (``make demo``).

Starts the emulator on 127.0.0.1 (a free port), points the ``muse_default`` and
``rescale_default`` connections at it, migrates an embedded SQLite metadata database under
``.demo/airflow``, runs every example DAG with ``airflow dags test``, and prints what each task
returned. The full Airflow output of each DAG goes to ``.demo/logs/<dag_id>.log``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpc_emulator.config import EmulatorConfig  # noqa: E402
from hpc_emulator.server import EmulatorServer  # noqa: E402

DEMO = ROOT / ".demo"
MUSE_DAGS = ["example_muse_single", "example_muse_sweep", "example_muse_runzip"]


def airflow_env(emulator: EmulatorServer) -> dict[str, str]:
    """Return the environment every ``airflow`` command of the demo runs with."""
    env = dict(os.environ)
    env.update(emulator.airflow_conn_env())
    env.update(
        {
            "AIRFLOW_HOME": str(DEMO / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__HPC__RESULTS_BASE": f"file://{DEMO / 'results'}",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            # The emulator's runs last seconds: the examples poll faster than the 10 s or more
            # they need on the real services (their tasks have retries for the race it risks).
            "MUSE_EXAMPLE_POLL_SECONDS": "2",
            "RESCALE_EXAMPLE_POLL_SECONDS": "1",
            "CHAIN_EXAMPLE_POLL_SECONDS": "1",
        }
    )
    return env


def run_dag(dag_id: str, env: dict[str, str], conf: dict | None = None) -> bool:
    """Run one DAG with ``airflow dags test``; return whether it succeeded."""
    log_path = DEMO / "logs" / f"{dag_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "airflow", "dags", "test", dag_id]
    if conf:
        command += ["-c", json.dumps(conf)]
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    state = last_run_state(env, dag_id)
    ok = process.returncode == 0 and state == "success"
    print(f"\n== {dag_id}: {state or 'no run'} in {time.monotonic() - started:.0f}s (log: {log_path.relative_to(ROOT)})")
    for task_id, map_index, value in return_values(env, dag_id):
        label = task_id if map_index < 0 else f"{task_id}[{map_index}]"
        print(f"   {label:<28} -> {value}")
    return ok


def _database(env: dict[str, str]) -> sqlite3.Connection:
    return sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")


def last_run_state(env: dict[str, str], dag_id: str) -> str | None:
    """Return the state of the DAG's latest run, read from the SQLite metadata database."""
    with _database(env) as db:
        row = db.execute("SELECT state FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,)).fetchone()
    return row[0] if row else None


def return_values(env: dict[str, str], dag_id: str, *, full: bool = False) -> list[tuple[str, int, str]]:
    """Return each task's XCom ``return_value`` of the DAG's latest run (cut for printing unless ``full``)."""
    with _database(env) as db:
        rows = db.execute(
            "SELECT x.task_id, x.map_index, x.value FROM xcom x JOIN dag_run r ON x.dag_run_id = r.id "
            "WHERE r.id = (SELECT max(id) FROM dag_run WHERE dag_id = ?) AND x.key = 'return_value' "
            "ORDER BY x.timestamp, x.map_index",
            (dag_id,),
        ).fetchall()
    shown = (lambda value: value.decode() if isinstance(value, bytes) else str(value)) if full else _short
    return [(task_id, map_index, shown(value)) for task_id, map_index, value in rows]


def print_chain_table(env: dict[str, str]) -> None:
    """Print the table the chain's last task returned: each case, prepared on Muse and solved on Rescale."""
    rows = next((json.loads(v) for t, _, v in return_values(env, "example_chain_muse_rescale", full=True) if t == "table"), [])
    if not rows:
        return
    print(f"\n   {'case':>4}  {'Muse key':<36}  {'prepared':>8}  {'Rescale job':<11}  {'solved':>8}")
    for row in rows:
        print(f"   {row['case']:>4}  {row['muse_key']:<36}  {row['prepared']:>8}  {row['rescale_job']:<11}  {row['solved']:>8}")


def _short(value: object) -> str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text if len(text) <= 300 else text[:300] + "..."


def main() -> int:
    """Start the emulator, run the example DAGs, print their results; exit 1 if any failed."""
    config = EmulatorConfig(data_dir=DEMO / "emulator", time_scale=0.2, pending_seconds=1.0)
    with EmulatorServer(config) as emulator:
        env = airflow_env(emulator)
        print(f"Emulator: Muse {emulator.muse_url}  Rescale {emulator.rescale_url}")
        print("Preparing the Airflow metadata database (SQLite) under .demo/airflow ...")
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        results = [run_dag(dag_id, env) for dag_id in (*MUSE_DAGS, "example_rescale_harvest", "example_chain_muse_rescale")]
        print_chain_table(env)
        print("\nEmulator requests:", json.dumps(emulator.counters.snapshot().get("requests", {}), indent=1)[:2000])
    failed = results.count(False)
    print(f"\n{len(results) - failed} of {len(results)} example DAGs succeeded.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
