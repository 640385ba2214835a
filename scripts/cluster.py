"""
Start the production-shaped local deployment and keep it running until Ctrl-C (``make cluster``).

PostgreSQL, Redis, an S3 store, the emulator of Muse and Rescale, and Airflow on CeleryExecutor
(API server, scheduler, DAG processor, two triggerers, two Celery workers), all on 127.0.0.1,
serving the example DAGs. Nothing is triggered. Ctrl-C (or SIGTERM) stops every process and
removes every temporary folder.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dev.cluster.cluster import LocalCluster  # noqa: E402
from dev.cluster.prerequisites import MissingPrerequisites  # noqa: E402
from hpc_emulator import EmulatorConfig, EmulatorServer  # noqa: E402

SECRET_FIELDS = ("password",)


def masked(connection: dict[str, Any]) -> str:
    """Return an Airflow connection (JSON form) with its secrets replaced by ``***``."""
    shown = {key: ("***" if key in SECRET_FIELDS and value else value) for key, value in connection.items()}
    return json.dumps(shown)


def main() -> int:
    """Start everything, print where it is, wait for Ctrl-C or SIGTERM, stop everything."""
    stop = threading.Event()
    # SIGTERM ends the wait as Ctrl-C does; neither interrupts the start or the stop half-way.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    work = Path(tempfile.mkdtemp(prefix="hpc-cluster-"))
    home = work / "airflow"
    home.mkdir()
    config = EmulatorConfig(data_dir=work / "emulator", time_scale=0.2, pending_seconds=1.0, muse_max_running=64)
    try:
        with EmulatorServer(config) as emulator:
            env = {**emulator.airflow_conn_env(), "RESCALE_EXAMPLE_POLL_SECONDS": "2", "CHAIN_EXAMPLE_POLL_SECONDS": "2"}
            print("Starting PostgreSQL, Redis, S3 and Airflow (CeleryExecutor); this takes a minute ...", flush=True)
            cluster = LocalCluster(home, {"hpc_examples": ROOT / "example_dags"}, env)
            cluster.start()
            try:
                if not stop.is_set():
                    print(cluster.describe())
                    print(f"Emulator (Muse + Rescale)  {emulator.base_url}")
                    print(f"Connection muse_default    {masked(emulator.muse_connection('demo'))}")
                    print(f"Connection rescale_default {masked(emulator.rescale_connection())}")
                    print(f"Connection aws_default     {masked(cluster.s3.airflow_connection())}")
                    print(f"\nOpen {cluster.airflow.api_url} (no login needed). Ctrl-C stops everything.", flush=True)
                while not stop.wait(1.0):
                    pass
            finally:
                print("\nStopping ...", flush=True)
                leftovers = cluster.stop()
                if leftovers:
                    print(f"Killed {len(leftovers)} process(es) that outlived their group: {leftovers}")
    except MissingPrerequisites as missing:
        print(missing, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("Stopped; nothing left running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
