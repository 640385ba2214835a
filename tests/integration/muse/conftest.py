"""Fixtures of the Muse integration tests: the emulator behind ``muse_default``, results in a temporary folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_emulator import EmulatorConfig, EmulatorServer
from hpc_emulator.config import MuseUser
from airflow_provider_hpc.triggers.muse import MuseJobTrigger

from muse_support import PASSWORD, MemoryStateStore


@pytest.fixture
def emulator_config(tmp_path: Path) -> EmulatorConfig:
    """The emulator of these tests: fast queue, a fixed seed, one ``user`` account with a real password."""
    return EmulatorConfig(
        data_dir=tmp_path / "emulator",
        muse_users={"demo": MuseUser(PASSWORD, "user")},
        time_scale=0.05,
        pending_seconds=0.2,
        seed=7,
    )


@pytest.fixture
def muse(emulator_conns: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmulatorServer:
    """The emulator behind ``muse_default``, with ``[hpc] results_base`` in the test's own folder."""
    monkeypatch.setenv("AIRFLOW__HPC__RESULTS_BASE", str(tmp_path / "results"))
    return emulator_conns


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    """The local folder ``[hpc] results_base`` points at in these tests."""
    return tmp_path / "results"


@pytest.fixture
def state_store() -> MemoryStateStore:
    """A fresh in-memory task state store."""
    return MemoryStateStore()


@pytest.fixture
def task_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Collect every line the provider's operators, sensors and triggers log (formatted)."""
    lines: list[str] = []

    def record(level: str) -> Callable[..., None]:
        def log(self: Any, message: str, *args: Any, **kwargs: Any) -> None:
            lines.append(f"{level}: " + (message % args if args else message))

        return log

    class Recorder:
        """A logger stand-in keeping each formatted line."""

        debug = record("debug")
        info = record("info")
        warning = record("warning")
        error = record("error")
        exception = record("error")

    recorder = Recorder()
    from airflow_provider_hpc.operators.muse import MuseGetResultOperator, MuseRunOperator
    from airflow_provider_hpc.sensors.muse import MuseJobSensor

    for cls in (MuseRunOperator, MuseGetResultOperator, MuseJobSensor, MuseJobTrigger):
        monkeypatch.setattr(cls, "log", recorder, raising=False)
    yield lines
