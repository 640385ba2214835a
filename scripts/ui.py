"""
Watch the example DAGs in the real Airflow UI on this machine (``make ui``).

Starts the emulator and a private Airflow (API server, scheduler, DAG processor, triggerer;
SQLite, LocalExecutor) on 127.0.0.1 under ``.demo/ui`` (made afresh each time), with the example
DAGs unpaused and the ``muse_default`` / ``rescale_default`` connections pointing at the emulator,
then prints the UI's address. Every user is an admin: no password to type. Ctrl-C (or SIGTERM)
stops everything.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dev.ui_stack import UiDeployment  # noqa: E402

HOME = ROOT / ".demo" / "ui"


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the deployment is stopped in the finally below.
    raise KeyboardInterrupt


def main() -> int:
    """Start the deployment, print where it is, and keep it up until interrupted."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    shutil.rmtree(HOME, ignore_errors=True)
    deployment = UiDeployment(HOME)
    print("Starting the emulator and Airflow (API server, scheduler, DAG processor, triggerer) ...", flush=True)
    try:
        deployment.start()
        assert deployment.emulator is not None
        print(
            f"\nAirflow UI:  {deployment.url}/   (every user is an admin: no password to type)\n"
            f"REST API:    {deployment.url}/api/v2/dags\n"
            f"Emulator:    Muse {deployment.emulator.muse_url}  Rescale {deployment.emulator.rescale_url}\n"
            f"DAGs:        {', '.join(deployment.dag_ids())} (unpaused: press Trigger)\n"
            f"Connections: muse_default, rescale_default (Admin -> Connections)\n"
            f"Logs:        {HOME / 'airflow'}\n"
            "\nCtrl-C stops everything.",
            flush=True,
        )
        while (dead := deployment.alive()) is None:
            time.sleep(1)
        print(f"\nairflow {dead} exited; its log:\n{deployment.airflow.log_tail(dead)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping ...", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not cut the stop short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        leftovers = deployment.stop()
        if leftovers:
            print(f"Killed processes that outlived the stop: {leftovers}", flush=True)
        print("Stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
