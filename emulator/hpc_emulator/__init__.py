"""
A local emulator of the Muse and Rescale APIs: the ground of the demo, the tests and the benchmarks.

Start it with ``python -m hpc_emulator`` (or ``hpc-emulator``), or in a test::

    from hpc_emulator import EmulatorConfig, EmulatorServer

    with EmulatorServer(EmulatorConfig(data_dir=tmp_path)) as emulator:
        env = emulator.airflow_conn_env()  # AIRFLOW_CONN_MUSE_DEFAULT, AIRFLOW_CONN_RESCALE_DEFAULT
"""

from __future__ import annotations

from hpc_emulator.config import DEMO_API_KEY, DEMO_PASSWORD, DEMO_USER, Counters, EmulatorConfig, MuseUser
from hpc_emulator.server import EmulatorServer

__all__ = ["DEMO_API_KEY", "DEMO_PASSWORD", "DEMO_USER", "Counters", "EmulatorConfig", "EmulatorServer", "MuseUser"]
