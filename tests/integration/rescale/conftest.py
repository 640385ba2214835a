"""
Fixtures of the Rescale integration tests: the emulator with a long API key, a client of it, and
a task context.

Every test gets its own emulator on a free loopback port (``emulator_conns``), so jobs, counters
and fault rules never leak from one test into another.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from hpc_emulator import EmulatorConfig, EmulatorServer

# The tests import their helpers as ``tests.integration.rescale.support``, whatever the working folder.
REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.rescale.support import API_KEY, FakeTaskInstance, RescaleApi  # noqa: E402


@pytest.fixture
def emulator_config(tmp_path: Path) -> EmulatorConfig:
    """The shared emulator settings, with an API key no output may ever show."""
    return EmulatorConfig(
        data_dir=tmp_path / "emulator", time_scale=0.05, pending_seconds=0.2, seed=7, rescale_api_keys=frozenset({API_KEY})
    )


@pytest.fixture
def api(emulator_conns: EmulatorServer) -> Iterator[RescaleApi]:
    """A client of the emulator whose ``rescale_default`` connection the tasks use."""
    session = requests.Session()
    session.headers["Authorization"] = f"Token {API_KEY}"
    try:
        yield RescaleApi(emulator_conns, session)
    finally:
        session.close()


@pytest.fixture
def context() -> dict[str, Any]:
    """A task context holding a :class:`FakeTaskInstance`."""
    return {"ti": FakeTaskInstance()}
