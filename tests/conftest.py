"""
What every test shares: a private Airflow home, and the local emulator on a free loopback port.

The emulator fixtures start a real HTTP server per test (a fraction of a second), so counters,
fault rules and jobs never leak from one test into another.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# A private AIRFLOW_HOME keeps the tests from reading (or writing) the user's own Airflow set-up.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="hpc-tests-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

import pytest  # noqa: E402

from hpc_emulator import EmulatorConfig, EmulatorServer  # noqa: E402


@pytest.fixture
def emulator_config(tmp_path: Path) -> EmulatorConfig:
    """Emulator settings for a test: its own data folder, delays scaled down, a fixed seed."""
    return EmulatorConfig(data_dir=tmp_path / "emulator", time_scale=0.05, pending_seconds=0.2, seed=7)


@pytest.fixture
def emulator(emulator_config: EmulatorConfig) -> Iterator[EmulatorServer]:
    """A running emulator on 127.0.0.1 and a free port, stopped (job commands ended) after the test."""
    with EmulatorServer(emulator_config) as server:
        yield server


@pytest.fixture
def emulator_conns(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> EmulatorServer:
    """The emulator, with ``muse_default`` and ``rescale_default`` pointing at it for this test."""
    for name, value in emulator.airflow_conn_env().items():
        monkeypatch.setenv(name, value)
    return emulator
