"""
The example DAGs in the real Airflow UI on this machine (``make ui``, and the browser tests).

The emulator, then a private Airflow (:class:`dev.airflow_stack.AirflowStack`: API server,
scheduler, triggerer, LocalExecutor, SQLite) with a DAG processor, the example DAGs unpaused, and
``muse_default`` / ``rescale_default`` pointing at the emulator both in the environment and in the
metadata database (only the latter are listed under Admin -> Connections, where Test can be used).

Every process is started here and ended here: :meth:`UiDeployment.stop` leaves none behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import requests

from dev.airflow_stack import REPO, AirflowStack, wait_for
from hpc_emulator.config import EmulatorConfig
from hpc_emulator.server import EmulatorServer

EXAMPLE_DAGS = REPO / "example_dags"

#: The UI's settings: the Test button on, one parser, a DAG processor that looks at the folder often.
UI_ENV = {
    "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
    # The machine may be shared: one parsing process and one API worker are plenty for a few DAGs.
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
    "AIRFLOW__API__WORKERS": "1",
    # An edited example shows in the UI within seconds rather than the default 5 minutes.
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
}

DEFAULT_CONN_IDS = {"muse": "muse_default", "rescale": "rescale_default"}


def ui_connection(form: Mapping[str, Any]) -> dict[str, Any]:
    """
    Return an emulator connection (JSON form) as the UI's Test button needs it stored: with its URL's port.

    Airflow 3.3.1-3.3.2's connection list sends ``port: 0`` for a connection without a port and
    its API refuses such a test (docs/connections.md, "The Test button"). Port 0 would not do: a
    connection read from JSON turns 0 into no port. The hooks use the port only with a bare host.
    """
    parts = urlsplit(str(form["host"]))
    return {**form, "port": parts.port or (443 if parts.scheme == "https" else 80)}


class UiDeployment:
    """
    The emulator and a private Airflow serving the example DAGs, for a person or a browser test.

    :param home: a folder for the deployment (AIRFLOW_HOME, the emulator's data, results).
    :param emulator_config: the emulator's settings; the demo's (fast runs) when not given.
    :param dags_folder: the DAG files to serve; the example DAGs when not given.
    :param extra_env: more environment for every Airflow process.
    """

    def __init__(
        self,
        home: Path,
        *,
        emulator_config: EmulatorConfig | None = None,
        dags_folder: Path = EXAMPLE_DAGS,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.home = home
        self.dags_folder = dags_folder
        self.emulator_config = emulator_config or EmulatorConfig(
            data_dir=home / "emulator", time_scale=0.2, pending_seconds=1.0
        )
        self.extra_env = dict(extra_env or {})
        self.emulator: EmulatorServer | None = None
        self.airflow: AirflowStack | None = None

    @property
    def url(self) -> str:
        """The UI's address (the API server's root)."""
        assert self.airflow is not None, "the deployment is not started"
        return self.airflow.api_url

    def connections(self) -> dict[str, dict[str, Any]]:
        """Return the two default connections pointing at the emulator (JSON form, secrets included)."""
        assert self.emulator is not None, "the deployment is not started"
        env = self.emulator.airflow_conn_env()
        return {
            conn_id: ui_connection(json.loads(env[f"AIRFLOW_CONN_{conn_id.upper()}"]))
            for conn_id in DEFAULT_CONN_IDS.values()
        }

    def start(self) -> UiDeployment:
        """Start the emulator and Airflow, add the connections, unpause the examples; return once the UI answers."""
        self.home.mkdir(parents=True, exist_ok=True)
        Path(self.emulator_config.data_dir).mkdir(parents=True, exist_ok=True)
        # One log line per emulator request would bury the script's own lines.
        logging.getLogger("hpc_emulator").setLevel(logging.WARNING)
        try:
            self.emulator = EmulatorServer(self.emulator_config).start()
            connections = self.connections()
            # The examples poll at their own intervals (10 s), as a user's copy would: the demo's
            # faster ones run into Airflow 3.3's deferral race under a real scheduler (docs/errors.md).
            env = {
                # The same connections as the database's: tasks read these (the environment is
                # searched before the database), the UI lists and tests the database's.
                **{f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(form) for conn_id, form in connections.items()},
                **UI_ENV,
                **self.extra_env,
            }
            airflow_home = self.home / "airflow"
            airflow_home.mkdir(exist_ok=True)
            self.airflow = AirflowStack(airflow_home, self.dags_folder, env)
            # db migrate + dags reserialize: the DAGs are in the database before the UI is first opened.
            self.airflow.prepare()
            self.airflow.start_services()
            # Airflow 3's scheduler parses nothing: without a DAG processor an edited or new DAG
            # file would never reach the UI (reserialize above parsed them once).
            self.airflow.spawn("dag-processor", "dag-processor")
            for conn_id, form in connections.items():
                self.add_connection(conn_id, form)
            self.unpause_all()
        except BaseException:
            self.stop()
            raise
        return self

    def add_connection(self, conn_id: str, form: Mapping[str, Any]) -> None:
        """Create (or replace) a connection in the metadata database through the REST API."""
        assert self.airflow is not None
        body = {"connection_id": conn_id, **form}
        if isinstance(body.get("extra"), dict):
            body["extra"] = json.dumps(body["extra"]) if body["extra"] else None
        answer = requests.post(f"{self.url}/api/v2/connections", json=body, timeout=30)
        if answer.status_code == 409:
            answer = requests.patch(f"{self.url}/api/v2/connections/{conn_id}", json=body, timeout=30)
        # The body holds a secret: report the status and the server's words only.
        assert answer.status_code < 400, f"adding connection {conn_id}: {answer.status_code} {answer.text[:300]}"

    def dag_ids(self) -> list[str]:
        """Return the ids of the DAGs the deployment serves."""
        assert self.airflow is not None
        return sorted(dag["dag_id"] for dag in self.airflow.api("GET", "dags?limit=100")["dags"])

    def unpause_all(self) -> list[str]:
        """Unpause every DAG (they are created paused); return their ids."""
        assert self.airflow is not None
        dag_ids = wait_for(self.dag_ids, 60, "the example DAGs in the database")
        for dag_id in dag_ids:
            self.airflow.api("PATCH", f"dags/{dag_id}", {"is_paused": False})
        return dag_ids

    def alive(self) -> str | None:
        """Return the name of a service that has exited, or ``None`` while all run."""
        if self.airflow is None:
            return "airflow"
        for name, process in self.airflow.processes.items():
            if process.poll() is not None:
                return name
        return None

    def stop(self) -> list[int]:
        """Stop Airflow, then the emulator; return the ids of processes that had to be killed afterwards."""
        leftovers: list[int] = []
        if self.airflow is not None:
            self.airflow.stop()
            leftovers = self.airflow.kill_leftovers()
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None
        return leftovers

    def __enter__(self) -> UiDeployment:
        """Start the deployment; the block's end stops it."""
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the deployment, whatever happened in the block."""
        self.stop()
